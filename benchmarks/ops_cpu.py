"""CPU benchmark of the core SSM ops at Mamba-130M / Mamba-2-130M layer shapes.

Compares, side by side in one run, ssmkit's chunked backend with its sequential reference and with
transformers' own torch fallbacks for the same functions (``mamba_selective_scan`` and
``mamba2_chunk_scan`` in transformers' modeling files) when transformers is installed. The projection
matmuls of the same layer are timed too, because the scan must not be a layer's bottleneck.

    python benchmarks/ops_cpu.py                 # L in {512, 2048, 8192}, forward and forward+backward
    python benchmarks/ops_cpu.py --quick         # L = 512 only, a smoke run
    python benchmarks/ops_cpu.py --json out.json

Shapes (batch 1, fp32): selective scan d_inner 1536, N 16 (d_model 768); SSD 24 heads x 64, N 128,
1 group, chunk 256 (d_model 768).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import torch

from ssmkit.ops import mamba_chunk_scan_combined, selective_scan_fn

D_MODEL = 768


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def with_backward(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for t in inputs:
            t.grad = None
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))

    return run


def scan_inputs(length: int, grad: bool) -> dict[str, torch.Tensor]:
    d, n = 2 * D_MODEL, 16
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, d, length, generator=g)
    delta = torch.randn(1, d, length, generator=g) * 0.5
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    B = torch.randn(1, n, length, generator=g)
    C = torch.randn(1, n, length, generator=g)
    D = torch.ones(d)
    z = torch.randn(1, d, length, generator=g)
    delta_bias = torch.full((d,), -3.0)
    out = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    return {k: v.requires_grad_(grad) for k, v in out.items()}


def ssd_inputs(length: int, grad: bool) -> dict[str, torch.Tensor]:
    h, p, n = 24, 64, 128
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, length, h, p, generator=g)
    dt = torch.randn(1, length, h, generator=g)
    A = -torch.linspace(1, 16, h)
    B = torch.randn(1, length, 1, n, generator=g)
    C = torch.randn(1, length, 1, n, generator=g)
    D = torch.ones(h)
    dt_bias = torch.full((h,), -3.0)
    out = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias)
    return {k: v.requires_grad_(grad) for k, v in out.items()}


def hf_functions() -> tuple[Callable | None, Callable | None]:
    try:
        from transformers.models.mamba.modeling_mamba import mamba_selective_scan
        from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan
    except ImportError:
        return None, None
    return mamba_selective_scan, mamba2_chunk_scan


def scan_candidates(length: int, grad: bool, with_reference: bool) -> dict[str, Callable]:
    a = scan_inputs(length, grad)
    kw = dict(D=a["D"], z=a["z"], delta_bias=a["delta_bias"], delta_softplus=True)
    args = (a["u"], a["delta"], a["A"], a["B"], a["C"])
    hf_scan, _ = hf_functions()
    fns = {"chunked": lambda: selective_scan_fn(*args, **kw, backend="chunked")}
    if with_reference:
        fns["reference"] = lambda: selective_scan_fn(*args, **kw, backend="reference")
    if hf_scan is not None:
        fns["transformers"] = lambda: hf_scan(*args, **kw)
    inputs = [t for t in a.values() if t.requires_grad]
    return {k: with_backward(f, inputs) if grad else f for k, f in fns.items()}


def ssd_candidates(length: int, grad: bool, with_reference: bool) -> dict[str, Callable]:
    a = ssd_inputs(length, grad)
    args = (a["x"], a["dt"], a["A"], a["B"], a["C"], 256)
    kw = dict(D=a["D"], dt_bias=a["dt_bias"], dt_softplus=True)
    _, hf_ssd = hf_functions()
    fns = {"chunked": lambda: mamba_chunk_scan_combined(*args, **kw, backend="chunked")}
    if with_reference:
        fns["reference"] = lambda: mamba_chunk_scan_combined(*args, **kw, backend="reference")
    if hf_ssd is not None:
        fns["transformers"] = lambda: hf_ssd(*args, **kw)
    inputs = [t for t in a.values() if t.requires_grad]
    return {k: with_backward(f, inputs) if grad else f for k, f in fns.items()}


def projection_candidates(length: int, grad: bool, d_in_proj: int, d_inner: int) -> dict[str, Callable]:
    """The in/out projections of the same layer (Mamba: 768 -> 3072, 1536 -> 768)."""
    x = torch.randn(length, D_MODEL, requires_grad=grad)
    w_in = torch.randn(d_in_proj, D_MODEL, requires_grad=grad)
    y = torch.randn(length, d_inner, requires_grad=grad)
    w_out = torch.randn(D_MODEL, d_inner, requires_grad=grad)

    def fn() -> torch.Tensor:
        return (x @ w_in.T).sum() + (y @ w_out.T).sum()

    return {"projections": with_backward(fn, [x, w_in, y, w_out]) if grad else fn}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--quick", action="store_true", help="L = 512 only, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-max-len", type=int, default=2048, help="skip the sequential reference above this L")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    lengths = [512] if args.quick else args.lengths
    repeats = 1 if args.quick else args.repeats
    passes = [False] if args.no_backward else [False, True]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    header = f"{'op':<14}{'L':>6} {'pass':<8}{'chunked s':>11}{'reference s':>13}{'transf. s':>11}{'ref/ch':>8}{'tf/ch':>8}{'proj s':>9}{'scan/proj':>10}"
    print(header)
    print("-" * len(header))
    rows = []
    for op, make, proj_dims in (
        ("selective_scan", scan_candidates, (4 * D_MODEL, 2 * D_MODEL)),
        ("ssd", ssd_candidates, (2 * 1536 + 2 * 128 + 24, 1536)),
    ):
        for length in lengths:
            for grad in passes:
                with_ref = length <= args.reference_max_len
                reps = repeats if length <= 2048 else 1
                times = {k: best_time(f, reps) for k, f in make(length, grad, with_ref).items()}
                times.update({k: best_time(f, reps) for k, f in projection_candidates(length, grad, *proj_dims).items()})
                row = dict(op=op, length=length, backward=grad, **{f"{k}_s": v for k, v in times.items()})
                rows.append(row)
                ch = times["chunked"]
                ref, tf, proj = times.get("reference"), times.get("transformers"), times["projections"]
                fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
                ratio = lambda v: f"{v / ch:.1f}x" if v is not None else "-"  # noqa: E731
                print(
                    f"{op:<14}{length:>6} {'fwd+bwd' if grad else 'fwd':<8}{fmt(ch):>11}{fmt(ref):>13}{fmt(tf):>11}"
                    f"{ratio(ref):>8}{ratio(tf):>8}{fmt(proj):>9}{ch / proj:>9.2f}x",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
