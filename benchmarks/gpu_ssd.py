"""Mamba-2 SSD (``mamba_chunk_scan_combined``) on a GPU: ssmkit's Triton backend, its chunked PyTorch
path and mamba_ssm's Triton kernels, side by side.

Shapes of the issue's target: batch 8, 32 heads x 64, N 128, 1 group, bf16, chunk 256, L 2048 and 8192,
with D, dt_bias and softplus (a Mamba-2 layer's call; its z gate goes to the gated RMSNorm instead).
Printed: median ms (triton.testing.do_bench) of forward and forward+backward, ratios, the number of
GPU kernels each call launches (torch.profiler), and the HBM floor: the bytes that must be read and
written (inputs, outputs, gradients; nothing else) at the copy bandwidth measured on this device.

mamba_ssm's source distribution (unpacked under ``.ext/``, nothing of it committed) is imported without
its package ``__init__`` (which would load the compiled CUDA scan); "n/a" when that fails.

    python benchmarks/gpu_ssd.py
    python benchmarks/gpu_ssd.py --sweep     # ssmkit's launch configs (ssd.launch.CONFIGS) at L 8192
    python benchmarks/gpu_ssd.py --profile --lengths 8192   # per-kernel GPU time, forward and backward apart
    python benchmarks/gpu_ssd.py --heads 64 --groups 8 --lengths 8192   # another shape
"""

from __future__ import annotations

import sys

import torch
from mamba_ssm_source import import_from_source

from ssmkit.ops.ssd import SSDLaunch, mamba_chunk_scan_combined
from ssmkit.ops.ssd.launch import CONFIGS

BATCH, HEADS, HEADDIM, GROUPS, STATE, CHUNK = 8, 32, 64, 1, 128, 256
LENGTHS = (2048, 8192)


def make_inputs(length: int, requires_grad: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    b, h, p, g, n, dev, bf16 = BATCH, HEADS, HEADDIM, GROUPS, STATE, "cuda", torch.bfloat16
    inp = {
        "x": torch.randn(b, length, h, p, device=dev, dtype=bf16),
        "dt": torch.randn(b, length, h, device=dev, dtype=bf16) - 1.0,
        "A": -torch.rand(h, device=dev) * 2 - 0.1,
        "B": torch.randn(b, length, g, n, device=dev, dtype=bf16),
        "C": torch.randn(b, length, g, n, device=dev, dtype=bf16),
        "D": torch.randn(h, device=dev),
        "dt_bias": torch.randn(h, device=dev) * 0.5,
    }
    return {k: v.requires_grad_(requires_grad) for k, v in inp.items()}


def callers(theirs, launch: SSDLaunch | None = None) -> dict[str, object]:
    def ours(backend):
        return lambda inp: mamba_chunk_scan_combined(**inp, chunk_size=CHUNK, dt_softplus=True, backend=backend,
                                                     launch=launch)

    out = {"ssmkit triton": ours("triton"), "ssmkit chunked": ours("chunked")}
    if theirs is not None:
        out["mamba_ssm"] = lambda inp: theirs(**inp, chunk_size=CHUNK, dt_softplus=True)
    return out


def fwd_bwd(fn, inp, grad):
    out = fn(inp)
    torch.autograd.backward(out, grad)


def kernel_count(thunk) -> int:
    """GPU kernels (and memsets/copies) one call of ``thunk`` launches, after a warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    thunk()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        thunk()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write), the practical HBM ceiling."""
    from triton.testing import do_bench

    src = torch.empty(1 << 29, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def floor_bytes(length: int) -> tuple[int, int]:
    """(forward, forward+backward) bytes that must move: bf16 x, dt, B, C in, out; then dout in, dx, ddt,
    dB, dC out (forward+backward also reads the inputs again; A, D, dt_bias are negligible)."""
    rows = BATCH * length
    x = rows * HEADS * HEADDIM * 2
    dt = rows * HEADS * 2
    bc = 2 * rows * GROUPS * STATE * 2
    fwd = 2 * x + dt + bc
    return fwd, fwd + (x + dt + bc) + (x + x + dt + bc)


def parity(fns, length=2048) -> dict[str, float]:
    """Relative error of each output against the chunked path in float32 (same bf16 inputs)."""
    inp = make_inputs(length, False)
    with torch.no_grad():
        want = mamba_chunk_scan_combined(**{k: v.float() for k, v in inp.items()}, chunk_size=CHUNK,
                                         dt_softplus=True, backend="chunked").double()
        return {name: ((fn(inp).double() - want).norm() / want.norm()).item() for name, fn in fns.items()}


def sweep(length: int, names: list[str] | None = None) -> None:
    """Forward and forward+backward ms of every named launch config of ssmkit's Triton SSD."""
    from triton.testing import do_bench

    unknown = set(names or ()) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown launch configs {sorted(unknown)}; known: {sorted(CONFIGS)}")
    inp = make_inputs(length, True)
    grad = torch.randn(BATCH, length, HEADS, HEADDIM, device="cuda", dtype=torch.bfloat16)
    print(f"launch configs at L {length} (median ms; the first call of each compiles):")
    print(f"{'config':>14} {'fwd ms':>8} {'fwd+bwd ms':>11}  overrides")
    times = {}
    for name, launch in CONFIGS.items():
        if names and name not in names:
            continue
        fn = callers(None, launch)["ssmkit triton"]

        def forward(fn=fn):
            with torch.no_grad():
                fn(inp)

        fwd = do_bench(forward, warmup=10, rep=50, return_mode="median")
        both = do_bench(lambda fn=fn: fwd_bwd(fn, inp, grad), warmup=10, rep=100, return_mode="median",
                        grad_to_none=list(inp.values()))
        times[name] = (fwd, both)
        print(f"{name:>14} {fwd:>8.3f} {both:>11.3f}  {launch.overrides()}", flush=True)
    print("fastest: forward", min(times, key=lambda k: times[k][0]), "| forward+backward",
          min(times, key=lambda k: times[k][1]))


def profile_kernels(fns, length: int) -> None:
    """GPU time of each kernel in one forward and, apart, one backward (after a warm-up call), largest first."""
    from torch.profiler import ProfilerActivity, profile

    inp = make_inputs(length, True)
    grad = torch.randn(BATCH, length, HEADS, HEADDIM, device="cuda", dtype=torch.bfloat16)

    def kernels(prof) -> dict[str, list[float]]:
        per_kernel: dict[str, list[float]] = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per_kernel.setdefault(e.name, []).append(e.time_range.elapsed_us() / 1e3)
        return per_kernel

    for name, fn in fns.items():
        if name == "ssmkit chunked":
            continue
        fwd_bwd(fn, inp, grad)
        for v in inp.values():
            v.grad = None  # no gradient accumulation kernels in the profiled call
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof_f:
            out = fn(inp)
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof_b:
            torch.autograd.backward(out, grad)
            torch.cuda.synchronize()
        for v in inp.values():
            v.grad = None
        for part, prof in (("forward", prof_f), ("backward", prof_b)):
            per_kernel = kernels(prof)
            total = sum(sum(v) for v in per_kernel.values())
            print(f"\n{name}, L {length}, one {part}: {total:.3f} ms of kernels")
            for kernel, times in sorted(per_kernel.items(), key=lambda kv: -sum(kv[1])):
                print(f"  {sum(times):>8.3f} ms  x{len(times):<3} {kernel[:90]}")


def main() -> None:
    global HEADS, GROUPS, STATE
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import argparse

    from triton.testing import do_bench

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--chunked-max-len", type=int, default=2048,
                        help="time the (slow) chunked PyTorch path only up to this length")
    parser.add_argument("--sweep", action="store_true", help="time ssmkit's launch configs at L 8192 (only)")
    parser.add_argument("--profile", action="store_true",
                        help="per-kernel times, forward and backward apart, at each of --lengths (only)")
    parser.add_argument("--configs", nargs="+", help="with --sweep: only these configs")
    parser.add_argument("--no-peer", action="store_true", help="leave mamba_ssm out")
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--groups", type=int, default=GROUPS)
    parser.add_argument("--state", type=int, default=STATE)
    args = parser.parse_args()
    HEADS, GROUPS, STATE = args.heads, args.groups, args.state
    if args.sweep:
        sweep(8192, args.configs)
    peer = None
    if not args.no_peer:
        peer = import_from_source("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")
    if args.profile:
        fns = callers(peer)
        for length in args.lengths:
            profile_kernels(fns, length)
    if args.sweep or args.profile:
        return
    fns = callers(peer)
    bandwidth = copy_bandwidth()
    print(f"device copy bandwidth: {bandwidth / 1e12:.2f} TB/s")
    print("output rel. error vs chunked fp32 (b8, L 2048):",
          ", ".join(f"{k} {v:.1e}" for k, v in parity(fns).items()))
    print(f"\nbf16, b{BATCH}, {HEADS} heads x {HEADDIM}, N {STATE}, {GROUPS} group, chunk {CHUNK}; median ms")
    header = f"{'L':>6} {'impl':>15} {'fwd ms':>8} {'fwd+bwd ms':>11} {'kernels fwd':>12} {'kernels f+b':>12}"
    print(header)
    results = {}
    for length in args.lengths:
        inp = make_inputs(length, True)
        grad = torch.randn(BATCH, length, HEADS, HEADDIM, device="cuda", dtype=torch.bfloat16)
        for name, fn in fns.items():
            if name == "ssmkit chunked" and length > args.chunked_max_len:
                continue

            def forward(fn=fn, inp=inp):
                with torch.no_grad():
                    fn(inp)

            def both_ways(fn=fn, inp=inp, grad=grad):
                fwd_bwd(fn, inp, grad)

            fwd = do_bench(forward, return_mode="median")
            n_fwd = kernel_count(forward)
            both = do_bench(both_ways, return_mode="median", grad_to_none=list(inp.values()))
            n_both = kernel_count(both_ways)
            results[length, name] = (fwd, both)
            print(f"{length:>6} {name:>15} {fwd:>8.3f} {both:>11.3f} {n_fwd:>12} {n_both:>12}", flush=True)
        f_bytes, b_bytes = floor_bytes(length)
        print(f"{length:>6} {'HBM floor':>15} {f_bytes / bandwidth * 1e3:>8.3f} {b_bytes / bandwidth * 1e3:>11.3f}")
    print("\nratios (ssmkit triton time / other; < 1 is faster):")
    for length in args.lengths:
        ours = results[length, "ssmkit triton"]
        f_bytes, b_bytes = floor_bytes(length)
        parts = [f"fwd / HBM floor {ours[0] / (f_bytes / bandwidth * 1e3):.2f}x"]
        for other in ("ssmkit chunked", "mamba_ssm"):
            if (length, other) in results:
                o = results[length, other]
                parts.append(f"vs {other}: fwd {ours[0] / o[0]:.2f}x, fwd+bwd {ours[1] / o[1]:.2f}x")
            else:
                parts.append(f"vs {other}: n/a")
        print(f"L={length}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
