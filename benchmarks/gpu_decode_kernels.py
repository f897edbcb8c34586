"""The decode step's kernels one by one at the real shapes, then whole CUDA-graph steps per launch variant, then the
kernels of one replayed step (issue 17: mamba2-130m and mamba-130m decode at batch 1).

Launch variants are the entries of ``ssmkit.ops.decode_launch.VARIANTS`` (programmatic dependent launch, GEMV tile
and warps, the Mamba-2 step kernel's programs, the fused greedy head, Mamba's out_proj GEMV), plus ``b64_step``:
the Mamba-2 convolution + state update kernel taken at batch 64 too (``decode_step.MAX_ROWS`` raised).

1. Kernels alone (``triton.testing.do_bench``: CUDA events, L2 flushed between calls, median µs): each decode kernel
   of mamba2-130m (d_model 768, d_inner 1536, 24 heads × 64, N 128, vocab 50288) and mamba-130m (d_inner 1536,
   N 16, vocab 50280) at batch 1 and 64, the unfused ops and the fused kernel under each relevant variant; bytes
   = what the kernel must read and write at least (weights, states in and out, activations), GB/s = bytes / time,
   "of peak" against 3.35 TB/s (H100 SXM HBM3).
2. Whole steps: greedy decode step captured in a CUDA graph (random bf16 weights, float32 states, after a 16-token
   prompt), tokens/s = batch × 100 replays / time, median of 3; kernels = kernels in one replay (torch.profiler);
   "same tokens" = the share of 16 greedy tokens a row that equal the default variant's from the same state.
3. One replayed step of mamba2-130m at batch 1, default and best: every kernel with its count and GPU time.

    python benchmarks/gpu_decode_kernels.py                        # everything (~2-3 min on an H100 incl. compiles)
    python benchmarks/gpu_decode_kernels.py --skip-kernels --variants default best
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ssmkit.generation.decode import DecodeState, GraphedStep
from ssmkit.generation.sampling import SamplingParams, make_generators
from ssmkit.models import LanguageModel, get_preset
from ssmkit.ops import decode_launch, decode_step, norm_linear, rms_norm_fn
from ssmkit.ops.decode_step import conv1d_selective_state_update, mamba_inner_step
from ssmkit.ops.norm_linear import rms_norm_linear, rms_norm_linear_argmax

PEAK = 3.35e12
GREEDY = SamplingParams(temperature=0)
STEPS = 100


class _B64Step:
    """The ``b64_step`` variant: the launch defaults with the Mamba-2 fused step allowed up to 64 rows."""

    def __enter__(self) -> None:
        self.saved = decode_step.MAX_ROWS
        decode_step.MAX_ROWS = 64

    def __exit__(self, *exc: object) -> None:
        decode_step.MAX_ROWS = self.saved


def _variant(name: str):
    """The settings of a variant's row ("unfused": the separate ops, which take no launch settings)."""
    return _B64Step() if name == "b64_step" else decode_launch.use("default" if name == "unfused" else name)


def _us(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3


def _row(label: str, variant: str, fn: Callable[[], object], nbytes: int) -> None:
    try:
        with _variant(variant):
            fn()
            us = _us(fn)
    except Exception as err:  # noqa: BLE001 - a variant that fails to compile or run is reported, not fatal
        print(f"{label:<46} {variant:<12} failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
        return
    gbs = nbytes / us / 1e3
    print(f"{label:<46} {variant:<12} {us:>8.1f} {nbytes / 1e6:>8.2f} {gbs:>8.0f} {gbs * 1e9 / PEAK:>7.0%}", flush=True)


def _bf(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(torch.bfloat16)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def kernel_table(batches: list[int], variants: list[str]) -> None:
    print("\n1. decode kernels alone, bf16 weights, float32 states and residual; µs (median), MB moved, GB/s, "
          "of 3.35 TB/s")
    header = f"{'kernel':<46} {'variant':<12} {'µs':>8} {'MB':>8} {'GB/s':>8} {'of peak':>7}"
    print(header + "\n" + "-" * len(header))
    gemv_variants = [v for v in variants if v in ("default", "wide", "best")]
    for b in batches:
        fused = gemv_variants if b <= norm_linear.MAX_ROWS else []
        _in_proj_rows(b, 3352, "mamba2-130m", fused)
        _in_proj_rows(b, 3072, "mamba-130m", fused)
        _out_proj_rows(b, fused)
        _step_rows(b, variants)
        _head_rows(b, 50288, "mamba2-130m", fused)
        _head_rows(b, 50280, "mamba-130m", fused)


def _in_proj_rows(b: int, n_out: int, name: str, fused: list[str]) -> None:
    """The block's RMSNorm + in_proj (float32 residual in)."""
    x, nw, w = torch.randn(b, 768, device="cuda"), _bf(768), _bf(n_out, 768, scale=0.03)
    moved = _nbytes(w, x) + b * n_out * 2
    label = f"{name} norm+in_proj 768->{n_out} b{b}"
    _row(label, "unfused", lambda: rms_norm_linear(x, nw, w, backend="chunked"), moved)
    for v in fused:
        _row(label, v, lambda: rms_norm_linear(x, nw, w, backend="triton"), moved)


def _out_proj_rows(b: int, fused: list[str]) -> None:
    """Mamba-2's gated norm + out_proj + residual add; Mamba's out_proj + residual add (no norm)."""
    y, z, nw, w, r = _bf(b, 1536), _bf(b, 1536), _bf(1536), _bf(768, 1536, scale=0.03), torch.randn(b, 768, device="cuda")
    moved = _nbytes(w, y, z, r) + b * 768 * 4
    label = f"mamba2-130m gated norm+out_proj+add b{b}"
    _row(label, "unfused", lambda: rms_norm_linear(y, nw, w, z=z, residual=r, backend="chunked"), moved)
    for v in fused:
        _row(label, v, lambda: rms_norm_linear(y, nw, w, z=z, residual=r, backend="triton"), moved)
    moved = _nbytes(w, y, r) + b * 768 * 4
    label = f"mamba-130m out_proj+add 1536->768 b{b}"
    _row(label, "unfused", lambda: r + F.linear(y, w), moved)
    for v in fused:
        _row(label, v, lambda: rms_norm_linear(y, None, w, residual=r, backend="triton"), moved)


def _head_rows(b: int, vocab: int, name: str, fused: list[str]) -> None:
    """The greedy head: final norm, head matmul, vocabulary mask (the last 3 rows padding), argmax."""
    x, nw, w = torch.randn(b, 768, device="cuda"), _bf(768), _bf(vocab, 768, scale=0.03)
    moved = _nbytes(w, x)

    def unfused() -> torch.Tensor:
        logits = F.linear(rms_norm_fn(x, nw, eps=1e-5).to(torch.bfloat16), w)
        logits[:, vocab - 3:] = -torch.inf
        return logits.float().argmax(-1)

    label = f"{name} norm+head+argmax 768x{vocab} b{b}"
    _row(label, "unfused", unfused, moved)
    for v in fused:
        _row(label, v, lambda: rms_norm_linear_argmax(x, nw, w, vocab_size=vocab - 3, backend="triton"), moved)


def _step_rows(b: int, variants: list[str]) -> None:
    """The fused decode-step kernels (Mamba-2 conv + state update, Mamba's whole inner step) and the separate ops."""
    dev = "cuda"
    xBC, conv, cw, cb = _bf(b, 1792), _bf(b, 1792, 4), _bf(1792, 4, scale=0.5), _bf(1792)
    state, dt, A = torch.randn(b, 24, 64, 128, device=dev) * 0.1, _bf(b, 24), -torch.rand(24, device=dev)
    D, bias = torch.randn(24, device=dev), torch.randn(24, device=dev)
    moved = 2 * _nbytes(state, conv) + _nbytes(xBC, cw, dt) + b * 1536 * 2

    def mamba2(backend: str) -> Callable[[], torch.Tensor]:
        return lambda: conv1d_selective_state_update(xBC, conv, cw, cb, state, dt, A, D, dt_bias=bias, backend=backend)

    label = f"mamba2-130m conv+state update b{b}"
    _row(label, "unfused", mamba2("chunked"), moved)
    for v in [v for v in variants if v in ("default", "wide", "best")] if b <= decode_step.MAX_ROWS else ["b64_step"]:
        _row(label, v, mamba2("triton"), moved)
    xz, conv1, cw1, cb1 = _bf(b, 3072), _bf(b, 1536, 4), _bf(1536, 4, scale=0.5), _bf(1536)
    xw, dtw, dtb = _bf(80, 1536, scale=0.03), _bf(1536, 48, scale=0.1), _bf(1536)
    state1, A1, D1 = torch.randn(b, 1536, 16, device=dev) * 0.1, -torch.rand(1536, 16, device=dev), torch.randn(1536, device=dev)
    moved = 2 * _nbytes(state1, conv1) + _nbytes(xz, cw1, xw, dtw, A1) + b * 1536 * 2

    def mamba1(backend: str) -> Callable[[], torch.Tensor]:
        return lambda: mamba_inner_step(xz, conv1, cw1, cb1, xw, dtw, dtb, state1, A1, D1, backend=backend)

    label = f"mamba-130m inner step (conv..state) b{b}"
    _row(label, "unfused", mamba1("chunked"), moved)
    if b <= decode_step.MAX_ROWS:
        for v in [v for v in variants if v in ("default", "best")]:
            _row(label, v, mamba1("triton"), moved)


def _base_state(model: LanguageModel, batch: int) -> tuple[DecodeState, torch.Tensor]:
    cache = model.allocate_cache(batch)
    torch.manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (batch, 16), device="cuda")
    with torch.no_grad():
        model(prompt, cache=cache)
    state = DecodeState(cache, GREEDY, model.config.vocab_size, make_generators(0, batch, "cuda"),
                        torch.zeros(0, dtype=torch.long, device="cuda"), torch.zeros(batch, dtype=torch.bool, device="cuda"),
                        None)
    return state, prompt[:, -1].clone()


def _replay_kernels(graphed: GraphedStep) -> tuple[int, dict[str, list[float]]]:
    """Kernels of one replay and their GPU times (µs) by name."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        graphed.replay()
        torch.cuda.synchronize()
    times: dict[str, list[float]] = defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.name].append(e.time_range.elapsed_us())
    return sum(len(v) for v in times.values()), times


def _graph_rate(model: LanguageModel, base: DecodeState, first: torch.Tensor, variant: str, reference: torch.Tensor | None):
    state = base.clone()
    with _variant(variant):
        graphed = GraphedStep(model, first, state)
        tokens = []
        for _ in range(16):
            graphed.replay()
            tokens.append(graphed.token.clone())
        tokens = torch.stack(tokens, 1)
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(STEPS):
                graphed.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        kernels, per_kernel = _replay_kernels(graphed)
    same = 1.0 if reference is None else (tokens == reference).float().mean().item()
    return first.shape[0] * STEPS / statistics.median(times), kernels, tokens, same, per_kernel


def step_table(models: list[str], batches: list[int], variants: list[str]) -> dict[str, dict[str, list[float]]]:
    print("\n2. greedy decode step in a CUDA graph, bf16 weights, float32 states; tokens/s")
    header = f"{'model':<12} {'batch':>5} {'variant':<12} {'tokens/s':>10} {'vs default':>10} {'kernels':>8} {'same tokens':>11}"
    print(header + "\n" + "-" * len(header))
    profiles = {}
    for name in models:
        torch.manual_seed(0)
        model = LanguageModel(get_preset(name), device="cuda", dtype=torch.bfloat16).eval()
        for batch in batches:
            base, first = _base_state(model, batch)
            reference, default_rate = None, None
            for variant in variants + (["b64_step"] if batch > 16 and name.startswith("mamba2") else []):
                try:
                    with torch.no_grad():
                        rate, kernels, tokens, same, per_kernel = _graph_rate(model, base, first, variant, reference)
                except Exception as err:  # noqa: BLE001 - reported, the other variants still run
                    print(f"{name:<12} {batch:>5} {variant:<12} failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
                    continue
                if variant == "default":
                    reference, default_rate = tokens, rate
                ratio = f"{rate / default_rate:.2f}x" if default_rate else "-"
                print(f"{name:<12} {batch:>5} {variant:<12} {rate:>10.0f} {ratio:>10} {kernels:>8} {same:>11.0%}", flush=True)
                if name == "mamba2-130m" and batch == 1:
                    profiles[variant] = per_kernel
        del model
        torch.cuda.empty_cache()
    print("targets (issue 17): mamba2-130m >= 5,000 tokens/s at batch 1 and >= 60,000 at batch 64; mamba-130m >= 4,000 at 1")
    return profiles


def profile_table(profiles: dict[str, dict[str, list[float]]]) -> None:
    for variant in ("default", "best"):
        if variant not in profiles:
            continue
        times = profiles[variant]
        total = sum(sum(v) for v in times.values())
        print(f"\n3. one replayed step, mamba2-130m batch 1, variant {variant}: {sum(len(v) for v in times.values())} "
              f"kernels, {total:.1f} µs of kernel time (kernels overlap under PDL)")
        header = f"{'kernel':<90} {'count':>5} {'total µs':>9} {'mean µs':>8}"
        print(header + "\n" + "-" * len(header))
        for kname, v in sorted(times.items(), key=lambda kv: -sum(kv[1])):
            print(f"{kname[:90]:<90} {len(v):>5} {sum(v):>9.1f} {sum(v) / len(v):>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description="decode kernels and steps per launch variant on a GPU")
    parser.add_argument("--models", nargs="+", default=["mamba2-130m", "mamba-130m"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--variants", nargs="+", default=list(decode_launch.VARIANTS), choices=list(decode_launch.VARIANTS))
    parser.add_argument("--skip-kernels", action="store_true", help="skip table 1 (kernels alone)")
    args = parser.parse_args()
    if "default" not in args.variants:
        args.variants.insert(0, "default")
    start = time.perf_counter()
    cap = torch.cuda.get_device_capability()
    print(f"device: {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}, "
          f"PDL available: {decode_launch.pdl_available(torch.device('cuda'))}")
    for name in args.variants:
        print(f"  variant {name}: {decode_launch.VARIANTS[name]}")
    if not args.skip_kernels:
        kernel_table(args.batches, args.variants)
        print(f"(table 1 done at {time.perf_counter() - start:.0f} s)", flush=True)
    profiles = step_table(args.models, args.batches, args.variants)
    print(f"(table 2 done at {time.perf_counter() - start:.0f} s)", flush=True)
    profile_table(profiles)
    print(f"\nwall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
