"""Mamba-3's scan routes on a GPU, op level: chunked PyTorch vs the SSD-kernel route, and where the time goes.

The layer's call at the benchmark shape (b 8, 24 heads x 64, N 128, 32 rotary angles, 1 group, chunk 64,
bf16 x/z/B/C/trap/angles, float32 dt and A, with D, z and the biases): forward and forward+backward medians
(``triton.testing.do_bench``) of

* ``chunked``: ``ssmkit/ops/mamba3/chunked.py``;
* ``tri fp32 unfused``: the SSD route as it was (float32 matmul operands, B̃, C̃ and the output in PyTorch);
* ``tri bf16 unfused``: bf16 operands, B̃, C̃ and the output in PyTorch;
* ``triton``: the SSD route as it is (bf16 operands, B̃ and C̃ by ``triton_rotary.py``, the output by
  ``triton_output.py``); ``triton ssd128`` / ``ssd256``: the same with the SSD kernels tiled at 128 / 256
  positions instead of the layer's 64 (``via_ssd.SSD_CHUNK``);

then a per-kernel profile (``torch.profiler``, CUDA time summed by kernel name) of one forward+backward of
the ``triton`` route, so that the SSD kernels and the glue around them (rotation, casts, the diagonal
correction, the gate) can be told apart.

``--mimo R``: MIMO of rank R instead (B, C of rank R, the biases per rank, mimo_x/z/o given, rotation by halves, as
the layer's MIMO passes them), in one run: the rank-R route with its glue in fused kernels (``triton_mimo_*.py``,
``via_ssd.FUSED_MIMO``) beside the same route with the glue in PyTorch, the chunked path, and rank 1 at the same
shape and at R·L positions (the SSD op's work of rank R at L: R sub-steps a position), with the ratios; first the
fused route's output and gradients against the PyTorch glue's on the same inputs; the profile is then of the fused
rank-R route.

    python benchmarks/gpu_mamba3_routes.py                  # L 2048 and 8192, profile at 8192
    python benchmarks/gpu_mamba3_routes.py --lengths 2048 --no-profile
    python benchmarks/gpu_mamba3_routes.py --mimo 4 --lengths 2048 8192
    python benchmarks/gpu_mamba3_routes.py --mimo 4 --lengths 8192 --no-profile \
        --set ssmkit.ops.mamba3.triton_mimo_rotary._POS=4 --set ssmkit.ops.mamba3.triton_mimo_rotary._STAGES=1

``--set MODULE.NAME=INT`` changes a module-level launch constant for the run (tiles, warps, stages of the MIMO
kernels: ``_POS``, ``_WARPS``, ``_STAGES`` of ``triton_mimo_rotary``, ``_BWD_POS``, ``_BWD_WARPS`` of
``triton_mimo_output``, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from unittest import mock

import torch
from launch_constants import add_set_argument, apply_sets

from ssmkit.ops.mamba3 import mamba3_scan, via_ssd

B, H, P, N, A = 8, 24, 64, 128, 32


def inputs(length: int, dtype: torch.dtype = torch.bfloat16, rank: int = 1) -> dict[str, torch.Tensor]:
    """Leaves with gradients, dtypes as ssmkit's Mamba3 layer passes them in a ``dtype`` model; ``rank`` > 1: MIMO
    (B, C and the biases per rank, mimo_x/z/o of the layer's initial values' scale)."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, dtype=dtype, scale=1.0):
        t = torch.randn(*shape, generator=g, device="cuda") * scale
        return t.to(dtype).requires_grad_()

    f32 = torch.float32
    r = rank
    leaves = {
        "x": randn(B, length, H, P), "z": randn(B, length, H, P),
        "dt": (torch.rand(B, length, H, generator=g, device="cuda") * 0.1 + 0.001).requires_grad_(),
        "A": (-torch.rand(B, length, H, generator=g, device="cuda") * 2 - 1e-4).requires_grad_(),
        "B": randn(B, length, r, 1, N), "C": randn(B, length, r, 1, N),
        "trap": randn(B, length, H), "angles": randn(B, length, H, A),
        "D": randn(H, dtype=f32), "B_bias": randn(H, r, N, dtype=f32), "C_bias": randn(H, r, N, dtype=f32),
    }
    if r > 1:
        leaves |= {"mimo_x": randn(H, r, P, dtype=f32, scale=1 / r), "mimo_z": randn(H, r, P, dtype=f32),
                   "mimo_o": randn(H, r, P, dtype=f32, scale=1 / r)}
    return leaves


def _unfused():
    return mock.patch.object(via_ssd, "FUSED_BC", False)


@contextlib.contextmanager
def _fp32_unfused():
    with _unfused(), mock.patch.object(via_ssd, "operand_dtype", lambda x, c: c):
        yield


def _ssd_chunk(length: int):
    return lambda: mock.patch.object(via_ssd, "SSD_CHUNK", length)


ROUTES = {
    "chunked": ("chunked", contextlib.nullcontext),
    "tri fp32 unfused": ("triton", _fp32_unfused),
    "tri bf16 unfused": ("triton", _unfused),
    "triton": ("triton", contextlib.nullcontext),
    "triton ssd128": ("triton", _ssd_chunk(128)),
    "triton ssd256": ("triton", _ssd_chunk(256)),
}


def runner(inp: dict, backend: str, backward: bool):
    leaves = list(inp.values())
    # MIMO as the layer passes it: rotation by halves (mamba_ssm's MIMO kernel); single input interleaved.
    interleaved = inp["B"].shape[2] == 1

    def run():
        out = mamba3_scan(**inp, chunk_size=64, backend=backend, rotary_interleaved=interleaved)
        if backward:
            torch.autograd.grad(out.float().square().sum(), leaves)
        return out

    return run


def profile(length: int, rows: int, rank: int = 1) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    inp = inputs(length, rank=rank)
    run = runner(inp, "triton", True)
    run()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals.setdefault(ev.name, [0.0, 0])
            entry[0] += ev.device_time_total / 1e3 if hasattr(ev, "device_time_total") else ev.cuda_time_total / 1e3
            entry[1] += 1
    total = sum(v[0] for v in totals.values())
    ssd = sum(v[0] for k, v in totals.items() if k.startswith(("_chunk", "_state_pass", "_bwd_")))
    print(f"\nprofile, triton route fwd+bwd, rank {rank}, L {length}: {total:.2f} ms of kernels, {len(totals)} kernel names, "
          f"{sum(v[1] for v in totals.values())} launches; SSD kernels {ssd:.2f} ms, the rest {total - ssd:.2f} ms")
    print(f"{'ms':>8} {'calls':>6}  kernel")
    for name, (ms, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"{ms:>8.3f} {calls:>6}  {name[:110]}")


def _unfused_mimo():
    return mock.patch.object(via_ssd, "FUSED_MIMO", False)


def mimo_agreement(length: int, rank: int) -> None:
    """The fused rank-``rank`` route against its PyTorch glue on the benchmark's inputs: the output's and every
    gradient's largest difference relative to the glue's largest entry (both bf16-rounded routes: ~1e-2 is noise,
    O(1) a bug)."""
    inp = inputs(length, rank=rank)
    leaves = list(inp.values())
    results = {}
    for fused in (True, False):
        with mock.patch.object(via_ssd, "FUSED_MIMO", fused):
            out = mamba3_scan(**inp, chunk_size=64, backend="triton", rotary_interleaved=False)
            cot = torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda")
            results[fused] = (out, *torch.autograd.grad((out.float() * cot).sum(), leaves))
    worst = {}
    for name, a, b in zip(("out", *inp), results[True], results[False]):
        worst[name] = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
    print(f"L {length}, rank {rank}: fused vs PyTorch glue, max |diff| / max |glue| per tensor: "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()), flush=True)
    del inp, leaves, results
    torch.cuda.empty_cache()


def mimo_table(lengths: list[int], rank: int, do_bench) -> None:
    """Rank ``rank`` on the fused route and with its glue in PyTorch, the chunked path, and rank 1 at L and at
    rank·L positions, fwd and fwd+bwd median ms, with the ratios (module docstring)."""
    mimo_agreement(min(lengths), rank)
    print(f"{'L':>6} {'route':>24} {'fwd':>8} {'fwd+bwd':>8}")
    for length in lengths:
        rows = {}
        cases = ((f"rank {rank} fused", rank, length, "triton", contextlib.nullcontext),
                 (f"rank {rank} PyTorch glue", rank, length, "triton", _unfused_mimo),
                 (f"rank {rank} chunked", rank, length, "chunked", contextlib.nullcontext),
                 ("rank 1", 1, length, "triton", contextlib.nullcontext),
                 (f"rank 1 at {rank}L", 1, rank * length, "triton", contextlib.nullcontext))
        for name, r, positions, backend, patch in cases:
            inp = inputs(positions, rank=r)
            with patch():
                rows[name] = (do_bench(runner(inp, backend, False), return_mode="median"),
                              do_bench(runner(inp, backend, True), return_mode="median"))
            print(f"{length:>6} {name:>24} {rows[name][0]:>8.2f} {rows[name][1]:>8.2f}", flush=True)
            del inp
            torch.cuda.empty_cache()
        fused, glue = rows[f"rank {rank} fused"], rows[f"rank {rank} PyTorch glue"]
        one, equal = rows["rank 1"], rows[f"rank 1 at {rank}L"]
        for i, part in enumerate(("fwd", "fwd+bwd")):
            print(f"{length:>6} {part:>8}: fused {glue[i] / fused[i]:.2f}x the PyTorch glue's speed; rank {rank} / "
                  f"rank 1 {fused[i] / one[i]:.2f} (was {glue[i] / one[i]:.2f}); rank {rank} at L / rank 1 at "
                  f"{rank}L (equal SSD work) {fused[i] / equal[i]:.2f} (was {glue[i] / equal[i]:.2f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--rows", type=int, default=30, help="kernels shown in the profile")
    parser.add_argument("--routes", nargs="+", choices=tuple(ROUTES), default=list(ROUTES))
    parser.add_argument("--no-fp32", action="store_true", help="skip the float32 rows")
    parser.add_argument("--mimo", type=int, default=1, metavar="R", help="MIMO rank R > 1: the MIMO table instead")
    add_set_argument(parser)
    args = parser.parse_args()
    apply_sets(args.set)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import triton
    from triton.testing import do_bench

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"b {B}, {H} heads x {P}, N {N}, {A} angles, 1 group, chunk 64, bf16; median ms"
          + (f"; {', '.join(args.set)}" if args.set else ""))
    if args.mimo > 1:
        mimo_table(args.lengths, args.mimo, do_bench)
        if not args.no_profile:
            profile(max(args.lengths), args.rows, args.mimo)
        return
    print(f"{'L':>6} {'route':>16} {'fwd':>8} {'fwd+bwd':>8}")
    for length in args.lengths:
        inp = inputs(length)
        for name in args.routes:
            backend, patch = ROUTES[name]
            with patch():
                fwd = do_bench(runner(inp, backend, False), return_mode="median")
                both = do_bench(runner(inp, backend, True), return_mode="median")
            print(f"{length:>6} {name:>16} {fwd:>8.2f} {both:>8.2f}", flush=True)
        del inp
        torch.cuda.empty_cache()
    # float32 models: the route's SSD kernels then take float32 operands (IEEE dots), the chunked path
    # float32 matmuls; which is faster decides backend="auto" for float32 too.
    inp = inputs(min(args.lengths), torch.float32)
    for name in () if args.no_fp32 else ("chunked", "triton"):
        backend = ROUTES[name][0]
        fwd = do_bench(runner(inp, backend, False), return_mode="median")
        both = do_bench(runner(inp, backend, True), return_mode="median")
        print(f"{min(args.lengths):>6} {name + ' fp32':>16} {fwd:>8.2f} {both:>8.2f}", flush=True)
    del inp
    torch.cuda.empty_cache()
    if not args.no_profile:
        profile(max(args.lengths), args.rows)


if __name__ == "__main__":
    main()
