"""The SSD route's B/C rotation kernel (``ssmkit/ops/mamba3/triton_rotary.py``) alone, tiling variants side by side.

At the layer shape (b 8, 24 heads, 1 group, N 128, 32 angles, bf16 B and C), forward and forward+backward medians
of ``rotate_bc_triton`` for each backward tiling: positions per program (``_ROWS``), warps, how many programs
share a group's heads (``_SPLIT_PROGRAMS``: the split aims at that many programs; 0 keeps a group's heads in one
program) and the pipelining of the head loop (``_STAGES``). Every variant's gradients are checked against the
first row's. The HBM floor: the bytes each pass must move at the card's peak bandwidth (``--bandwidth``).

``--norm`` gives the kernels B and C raw with the RMS norms' weights (the layer's folded route, ``NORM``); its warps
are ``_NORM_WARPS`` / ``_NORM_FWD_WARPS`` then (``--warps`` sets both), and ``--split-programs 0`` runs the norm's
backward in the kernel's epilogue, a split its own kernel after.

    python benchmarks/gpu_mamba3_rotary.py --lengths 2048 8192
    python benchmarks/gpu_mamba3_rotary.py --norm --rows 8 --warps 8 4 --split-programs 0 528 --stages 2
"""

from __future__ import annotations

import argparse
import itertools
import sys
from unittest import mock

import torch

from ssmkit.ops.mamba3 import triton_rotary

B, H, G, N, A = 8, 24, 1, 128, 32


def _inputs(length: int, norm: bool) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (B, length, G, N)
    weights = [(torch.rand(N, device="cuda", generator=gen) + 0.5).bfloat16().requires_grad_() for _ in range(2)]
    return [torch.randn(shape, device="cuda", generator=gen).bfloat16().requires_grad_(),
            torch.randn(shape, device="cuda", generator=gen).bfloat16().requires_grad_(),
            torch.randn(H, N, device="cuda", generator=gen).requires_grad_(),
            torch.randn(H, N, device="cuda", generator=gen).requires_grad_(),
            (torch.rand(B, length, H, A, device="cuda", generator=gen) * 6.3).requires_grad_()] + (weights if norm else [])


def _rotate(inp: list[torch.Tensor]):
    norm = None if len(inp) == 5 else (inp[5], inp[6], 1e-5, 1e-5)
    return triton_rotary.rotate_bc_triton(*inp[:5], True, torch.bfloat16, norm)


def _floor_ms(length: int, bandwidth: float) -> tuple[float, float]:
    """Bytes of the forward (B, C read; B̃, C̃ bf16 and cb written; θ read) and of the backward (B, C, θ and
    dB̃, dC̃, dcb read; dB, dC and dθ written), in ms at ``bandwidth`` GB/s."""
    rows = B * length
    fwd = rows * (2 * G * N * 2 + 2 * H * N * 2 + H * 4 + H * A * 4)
    bwd = rows * (2 * G * N * 2 + H * A * 4 + 2 * H * N * 2 + H * 4 + 2 * G * N * 2 + H * A * 4)
    return fwd / bandwidth / 1e6, (fwd + bwd) / bandwidth / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 8, 32])
    parser.add_argument("--warps", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--split-programs", type=int, nargs="+", default=[0, 528, 2112])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--bandwidth", type=float, default=3350.0, help="GB/s (H100 SXM 3,350; H200 4,800)")
    parser.add_argument("--norm", action="store_true", help="B and C raw, the RMS norms in the kernels")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import triton
    from triton.testing import do_bench

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"rotate_bc_triton, b {B}, {H} heads, {G} group, N {N}, {A} angles, bf16{', norms' if args.norm else ''};"
          " median ms")
    print(f"{'L':>6} {'rows':>5} {'warps':>5} {'split@':>7} {'stages':>6} {'fwd':>7} {'fwd+bwd':>8} {'bwd/floor':>9}")
    for length in args.lengths:
        inp = _inputs(length, args.norm)
        cots = None
        want = None
        fwd_floor, both_floor = _floor_ms(length, args.bandwidth)
        for rows, warps, split, stages in itertools.product(args.rows, args.warps, args.split_programs, args.stages):
            patches = [mock.patch.object(triton_rotary, name, value) for name, value in
                       (("_ROWS", rows), ("_WARPS", warps), ("_SPLIT_PROGRAMS", split), ("_STAGES", stages),
                        ("_NORM_WARPS", warps), ("_NORM_FWD_WARPS", warps))]
            for p in patches:
                p.start()
            try:
                out = _rotate(inp)
                if cots is None:
                    cots = [torch.randn_like(o) for o in out]
                grads = torch.autograd.grad(out, inp, cots)
                if want is None:
                    want = grads
                bad = [i for i, (g, w) in enumerate(zip(grads, want))
                       if not torch.allclose(g.float(), w.float(), rtol=2e-2, atol=2e-2 * w.float().abs().max())]

                def fwd(inp=inp):
                    return _rotate(inp)

                def both(inp=inp, cots=cots):
                    return torch.autograd.grad(fwd(inp), inp, cots)

                t_fwd = do_bench(fwd, return_mode="median")
                t_both = do_bench(both, return_mode="median")
            except Exception as exc:  # a tiling that does not compile (registers, shared memory) is reported
                print(f"{length:>6} {rows:>5} {warps:>5} {split:>7} {stages:>6}  failed: {str(exc)[:80]}")
                continue
            finally:
                for p in patches:
                    p.stop()
            note = "" if not bad else f"  GRADIENTS DIFFER: inputs {bad}"
            print(f"{length:>6} {rows:>5} {warps:>5} {split:>7} {stages:>6} {t_fwd:>7.3f} {t_both:>8.3f} "
                  f"{(t_both - t_fwd) / (both_floor - fwd_floor):>8.1f}x{note}", flush=True)
        print(f"{length:>6} HBM floor at {args.bandwidth:.0f} GB/s: fwd {fwd_floor:.3f}, fwd+bwd {both_floor:.3f}")
        del inp
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
