"""A whole Mamba-2 layer against causal attention of the same width (issue #5), forward and forward+backward.

Shapes of the issue: bf16, batch 8, width 2048 = 16 heads x 128, L 2048, 8192 and 32768. Timed (median ms
of ``triton.testing.do_bench``):

* Mamba-2 layer: ``ssmkit.layers.Mamba2(2048)`` with its defaults (expand 2, headdim 64, so 64 heads,
  d_state 128, 1 group, chunk 256), bf16 weights (A_log, D and dt_bias stay float32, as in mamba_ssm),
  backend "auto" (Triton on CUDA): in_proj, causal conv, SSD scan, gated RMSNorm, out_proj.
* SDPA op: ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``, q, k, v (8, 16, L, 128), under
  ``sdpa_kernel(CUDNN_ATTENTION)``: the issue's anchor ("cuDNN took 1.2 / 14.8 / 223 ms"; those figures
  match forward+backward at 400-550 TFLOP/s, so they stand beside that column). Where cuDNN attention
  fails, FLASH_ATTENTION; the backend column says which ran.
* Attention layer: ``ssmkit.layers.Attention(2048, num_heads=16)`` (full causal, no rotary, no bias):
  q, k, v, o projections around the same SDPA call, under the same SDPA backend as the op.

Forward runs under ``no_grad``; forward+backward back-propagates a fixed random output gradient to the
input and every weight (gradients set to None between calls). Ratios: Mamba-2 layer forward+backward time
over the other's (< 1: the Mamba-2 layer is faster). A cell that runs out of memory prints "OOM".

FLOP floors at the peak dense bf16 rate (``--peak-tflops``, default 989: the H100/H200 SXM spec sheet).
Causal attention forward: 2·b·h·L²·d (QKᵀ and PV, 2·b·h·L²·d each, half of the pairs masked); forward+
backward 3.5x that (FlashAttention's convention: the backward's five matmuls count 2.5x the forward, the
recomputed QKᵀ not counted). Layers add their projections, 2·tokens·in·out each forward, 3x with backward;
the Mamba-2 floor counts its projections only (not the SSD scan): a lower bound.

    PYTHONPATH=$PWD python benchmarks/gpu_layer_attention.py
    PYTHONPATH=$PWD python benchmarks/gpu_layer_attention.py --lengths 2048 8192 --batch 4
    PYTHONPATH=$PWD python benchmarks/gpu_layer_attention.py --device cpu   # smoke run: b1, L 64 128
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ssmkit.layers import Attention, Mamba2

HEAD_DIM = 128
# The issue's cuDNN causal SDPA times at b8, 16 heads x 128, bf16 (ms, forward+backward).
ISSUE_CUDNN_MS = {2048: 1.2, 8192: 14.8, 32768: 223.0}
SDPA_BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION)
# do_bench budgets (ms): the 32K attention forward+backward takes ~0.25 s, so it gets a handful of calls.
WARMUP_MS, REP_MS = 100, 500
CPU_REPEATS = 3


def bench(fn: Callable[[], object], grads: list[torch.Tensor], device: str) -> float:
    """Median ms of ``fn``: do_bench on CUDA; on CPU one warm-up call, then the median of a few timings."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, grad_to_none=grads, return_mode="median")
    fn()
    times = []
    for _ in range(CPU_REPEATS):
        for t in grads:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_module(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor],
                device: str) -> tuple[float | str, float | str]:
    """(forward ms, forward+backward ms) of ``module(x)``, x (b, l, d); "OOM" where it ran out of memory."""
    grad = torch.randn_like(x)
    grads = [x, *weights]

    def forward() -> None:
        with torch.no_grad():
            module(x)

    def forward_backward() -> None:
        module(x).backward(grad)

    result = []
    for fn in (forward, forward_backward):
        try:
            result.append(bench(fn, grads, device))
        except torch.cuda.OutOfMemoryError:
            result.append("OOM")
        free_memory(device)
    return result[0], result[1]


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def attention_inputs(batch: int, heads: int, length: int, device: str) -> list[torch.Tensor]:
    """q, k, v (b, h, l, p) bf16, requiring gradients."""
    shape = (batch, heads, length, HEAD_DIM)
    return [torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]


def sdpa_backend(batch: int, heads: int, length: int, device: str) -> SDPBackend | None:
    """The first of SDPA_BACKENDS whose forward and backward run at this shape; None if none does."""
    q, k, v = attention_inputs(batch, heads, length, device)
    for backend in SDPA_BACKENDS:
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            return backend
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:
            print(f"L {length}: SDPA backend {backend.name} unavailable ({str(e).splitlines()[0][:120]})")
    return None


def linear_flops(module: nn.Module, tokens: int) -> int:
    """Forward FLOPs of every nn.Linear in ``module`` over ``tokens`` rows."""
    return sum(2 * tokens * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def causal_attention_flops(batch: int, heads: int, length: int) -> int:
    """Forward FLOPs of causal attention: QKᵀ and PV over the unmasked half of the (L, L) pairs."""
    return 2 * batch * heads * length * length * HEAD_DIM


def fmt(ms: float | str) -> str:
    return ms if isinstance(ms, str) else f"{ms:.3f}"


def ratio(a: float | str, b: float | str) -> str:
    return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) else "—"


def measure(length: int, batch: int, width: int, mamba: Mamba2, attention: Attention, device: str) -> dict:
    """Every cell of one table row (ms; "OOM", or "n/a" where no SDPA backend ran), and the SDPA backend."""
    heads = width // HEAD_DIM
    row: dict = {"backend": "none", "sdpa": ("n/a", "n/a"), "attn": ("n/a", "n/a")}
    backend = None
    try:
        backend = sdpa_backend(batch, heads, length, device)
    except torch.cuda.OutOfMemoryError:
        row["backend"] = "OOM"
    free_memory(device)
    if backend is not None:
        row["backend"] = backend.name
        with sdpa_kernel(backend):
            q, k, v = attention_inputs(batch, heads, length, device)
            row["sdpa"] = time_module(lambda _: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                      q, [k, v], device)
            del q, k, v
            x = torch.randn(batch, length, width, device=device, dtype=torch.bfloat16, requires_grad=True)
            row["attn"] = time_module(attention, x, list(attention.parameters()), device)
            del x
        free_memory(device)
    x = torch.randn(batch, length, width, device=device, dtype=torch.bfloat16, requires_grad=True)
    row["mamba"] = time_module(mamba, x, list(mamba.parameters()), device)
    del x
    free_memory(device)
    return row


def print_tables(rows: dict[int, dict], batch: int, width: int, mamba: Mamba2, attention: Attention,
                 peak: float) -> None:
    heads = width // HEAD_DIM
    issue_shape = batch == 8 and width == 2048
    print("\nmedian ms; ratios = Mamba-2 layer fwd+bwd / the other's fwd+bwd (< 1: Mamba-2 faster)\n")
    print("| L | SDPA backend | Mamba-2 layer fwd | Mamba-2 layer fwd+bwd | SDPA op fwd | SDPA op fwd+bwd "
          "| issue's cuDNN fwd+bwd | attention layer fwd | attention layer fwd+bwd | Mamba-2 / SDPA op "
          "| Mamba-2 / attention layer |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for length, r in rows.items():
        issue = ISSUE_CUDNN_MS.get(length) if issue_shape else None
        print(f"| {length} | {r['backend']} | {fmt(r['mamba'][0])} | {fmt(r['mamba'][1])} | {fmt(r['sdpa'][0])} "
              f"| {fmt(r['sdpa'][1])} | {'—' if issue is None else issue} | {fmt(r['attn'][0])} "
              f"| {fmt(r['attn'][1])} | {ratio(r['mamba'][1], r['sdpa'][1])} "
              f"| {ratio(r['mamba'][1], r['attn'][1])} |")

    print(f"\nFLOP floors at {peak / 1e12:.0f} TFLOP/s dense bf16 (ms); measured TFLOP/s of the SDPA op "
          f"(causal attention fwd 2·b·h·L²·d, fwd+bwd 3.5x; projections 2·tokens·in·out, 3x with bwd)\n")
    print("| L | attention op floor fwd | fwd+bwd | SDPA op TFLOP/s fwd | fwd+bwd | % of peak fwd+bwd "
          "| attention layer floor fwd+bwd | Mamba-2 projections floor fwd+bwd |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for length, r in rows.items():
        tokens = batch * length
        attn_fwd = causal_attention_flops(batch, heads, length)
        sdpa_fwd, sdpa_both = r["sdpa"]
        tflops_fwd = f"{attn_fwd / sdpa_fwd / 1e9:.0f}" if isinstance(sdpa_fwd, float) else "—"
        tflops_both = f"{3.5 * attn_fwd / sdpa_both / 1e9:.0f}" if isinstance(sdpa_both, float) else "—"
        of_peak = f"{3.5 * attn_fwd / (sdpa_both * 1e-3) / peak * 100:.0f}%" if isinstance(sdpa_both, float) else "—"
        layer_both = 3.5 * attn_fwd + 3 * linear_flops(attention, tokens)
        mamba_both = 3 * linear_flops(mamba, tokens)
        print(f"| {length} | {attn_fwd / peak * 1e3:.3f} | {3.5 * attn_fwd / peak * 1e3:.3f} | {tflops_fwd} "
              f"| {tflops_both} | {of_peak} | {layer_both / peak * 1e3:.3f} | {mamba_both / peak * 1e3:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a smoke run of the same code, perf_counter timing (default b1, L 64 128)")
    parser.add_argument("--lengths", type=int, nargs="+", help="default 2048 8192 32768 (cpu: 64 128)")
    parser.add_argument("--batch", type=int, help="default 8 (cpu: 1)")
    parser.add_argument("--width", type=int, default=2048, help=f"d_model, a multiple of {HEAD_DIM}")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="peak dense bf16 TFLOP/s for the floors (989: H100/H200 SXM)")
    args = parser.parse_args()
    cpu = args.device == "cpu"
    lengths = args.lengths or ([64, 128] if cpu else [2048, 8192, 32768])
    batch = args.batch or (1 if cpu else 8)
    if args.width % HEAD_DIM or args.width < HEAD_DIM:
        parser.error(f"--width must be a positive multiple of {HEAD_DIM}, got {args.width}")
    if batch < 1 or min(lengths) < 1:
        parser.error("--batch and --lengths must be positive")
    if not cpu and not torch.cuda.is_available():
        parser.error("no CUDA device (use --device cpu for a smoke run)")

    torch.manual_seed(0)
    mamba = Mamba2(args.width, device=args.device, dtype=torch.bfloat16)
    attention = Attention(args.width, num_heads=args.width // HEAD_DIM, device=args.device, dtype=torch.bfloat16)
    name = torch.cuda.get_device_name() if not cpu else "CPU (smoke run: times mean nothing)"
    cudnn = torch.backends.cudnn.version() if not cpu else None
    print(f"device: {name}; torch {torch.__version__}; cuDNN {cudnn}")
    print(f"bf16, batch {batch}, width {args.width}: attention {args.width // HEAD_DIM} heads x {HEAD_DIM}; "
          f"Mamba-2 {mamba.nheads} heads x {mamba.headdim}, d_state {mamba.d_state}, chunk {mamba.chunk_size}")
    rows = {}
    for length in lengths:
        rows[length] = measure(length, batch, args.width, mamba, attention, args.device)
        r = rows[length]
        print(f"L {length}: Mamba-2 {fmt(r['mamba'][0])} / {fmt(r['mamba'][1])} ms, SDPA {fmt(r['sdpa'][0])} / "
              f"{fmt(r['sdpa'][1])} ms, attention layer {fmt(r['attn'][0])} / {fmt(r['attn'][1])} ms", flush=True)
    print_tables(rows, batch, args.width, mamba, attention, args.peak_tflops * 1e12)


if __name__ == "__main__":
    main()
