"""GPU benchmark of the Mamba-1 selective scan: ssmkit's Triton kernel vs its chunked PyTorch path vs
mamba_ssm's CUDA kernel (built by ``build_mamba_scan.py`` when nvcc is there).

Shapes: b 8, d_inner 2048, N 16, L in {2048, 8192}, bf16 u/delta/z/B/C (B, C as (b, N, L)), float32 A, D,
delta_bias, softplus on, z gate on: the Mamba-1 layer's call. Times are medians of
``triton.testing.do_bench``; "floor" is the HBM traffic the op cannot avoid (reads of its inputs, writes
of its outputs, bf16) divided by the device's bandwidth.

    python benchmarks/gpu_selective_scan.py              # table; mamba_ssm CUDA if it builds in 240 s
    python benchmarks/gpu_selective_scan.py --sweep      # also launch configs of the Triton kernel (L 8192, 2048)
    python benchmarks/gpu_selective_scan.py --sweep-only # only those: TRAINING_CONFIG, DEFAULT_CONFIG and the
                                                         # time-wise candidates (TIMEWISE_CANDIDATES)
    python benchmarks/gpu_selective_scan.py --sweep-only --configs training,tw1024_d1_w4 --sweep-fused
    python benchmarks/gpu_selective_scan.py --no-mamba --no-chunked
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import triton

from ssmkit.ops.selective_scan import ScanInputs, selective_scan_fn
from ssmkit.ops.selective_scan.triton import (
    DEFAULT_CONFIG,
    TIMEWISE_CANDIDATES,
    TRAINING_CONFIG,
    ScanConfig,
    selective_scan_triton,
)
from ssmkit.testing import relative_error

sys.path.insert(0, str(Path(__file__).resolve().parent))
B, D, N = 8, 2048, 16
LENGTHS = (2048, 8192)
# mamba_ssm CUDA on H100 at b 8, d 2048, N 16, L 8192, bf16 (the figures quoted in issue 5).
QUOTED_MS = {"fwd": 2.7, "fwd+bwd": 12.4}
# HBM bandwidth by device name, bytes/s.
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}
# The sweep's configs by name: the two in use and the time-wise candidates.
SWEEP = {"training": TRAINING_CONFIG, "default": DEFAULT_CONFIG, **TIMEWISE_CANDIDATES}
# Relative error (max |ours - ref| / max |ref|) of a bf16 config's out and gradients against the float32 run
# above which the sweep reports the config as wrong and does not time it.
SWEEP_TOLERANCE = 2e-2
# --sweep-fused adds these. chunk, fwd block_d/warps, bwd block_d/warps, fused_states, fwd_chunk. Fused-state tiles are
# (steps, block_d, N): Triton spreads block_d / 2 x N over a warp's lanes, so block_d = 2 x warps keeps
# every step of a (channel, state) pair in one thread (N 16). The fused backward spills a few registers at
# chunk 32 (ptxas, sm_90); its forward fits tiles of 32 steps in 128 registers, 64 in about 240.
FUSED_SWEEP = (
    ScanConfig(128, 8, 4, 16, 8),
    ScanConfig(16, 8, 4, 8, 4, True),
    ScanConfig(16, 8, 4, 8, 4, True, 32),
    ScanConfig(16, 16, 8, 16, 8, True, 32),
    ScanConfig(16, 4, 2, 4, 2, True, 32),
    ScanConfig(16, 2, 1, 2, 1, True, 32),
    ScanConfig(16, 8, 4, 8, 4, True, 64),
    ScanConfig(32, 8, 4, 8, 4, True),
)


LAYOUTS = ("contiguous", "time-major", "layer")
DT_RANK = -(-D // 16)  # Mamba-1's dt_rank at this d_inner: the x_proj output holds (dt, B, C) side by side


def make_inputs(l: int, layout: str = "contiguous") -> dict[str, torch.Tensor]:
    """The op's inputs in one of LAYOUTS: "contiguous" (time is the unit stride everywhere, as mamba_ssm's
    layer hands them to its kernel), "time-major" (u, delta, z channel-contiguous (b, d, l) views of
    (b, l, d) tensors), "layer" (as ssmkit's Mamba layer calls it today: time-major u, delta, z, and B, C as
    strided views of one (b, l, dt_rank + 2N) projection)."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)

    seq = {k: randn(B, D, l) for k in ("u", "delta", "z")}
    if layout != "contiguous":
        seq = {k: v.transpose(1, 2).contiguous().transpose(1, 2) for k, v in seq.items()}
    Bm, Cm = randn(B, N, l), randn(B, N, l)
    if layout == "layer":
        x_dbl = torch.empty(B, l, DT_RANK + 2 * N, device="cuda", dtype=torch.bfloat16)
        x_dbl[..., DT_RANK:DT_RANK + N] = Bm.transpose(1, 2)
        x_dbl[..., DT_RANK + N:] = Cm.transpose(1, 2)
        Bm, Cm = x_dbl[..., DT_RANK:DT_RANK + N].transpose(1, 2), x_dbl[..., DT_RANK + N:].transpose(1, 2)
    A = -torch.exp(randn(D, N, dtype=torch.float32) * 0.5)
    return {
        **seq, "A": A, "B": Bm, "C": Cm,
        "D": randn(D, dtype=torch.float32), "delta_bias": randn(D, dtype=torch.float32) * 0.5 - 3.0,
    }


def floor_bytes(l: int, backward: bool) -> int:
    """HBM bytes the op must move: (b, d, l) bf16 tensors read/written plus B, C and their gradients."""
    seq, bc = B * D * l * 2, B * N * l * 2
    fwd = 4 * seq + 2 * bc  # read u, delta, z, B, C; write out
    if not backward:
        return fwd
    # backward: read u, delta, z, dout, B, C; write du, ddelta, dz, dB, dC (the forward's reads again).
    return fwd + 7 * seq + 4 * bc


def bench(fn, slow: bool = False, quick: bool = False) -> float:
    if quick:
        fn()  # compile outside the timed warm-up
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    return triton.testing.do_bench(fn, warmup=5 if slow else 25, rep=20 if slow else 200, return_mode="median")


def ssmkit_runner(x: dict, backend: str, backward: bool, config: ScanConfig | None = None):
    leaves = {k: v.detach().requires_grad_(backward) for k, v in x.items()}
    dout = torch.randn_like(x["u"])

    def call():
        if config is None:
            return selective_scan_fn(**leaves, delta_softplus=True, backend=backend)
        return selective_scan_triton(ScanInputs.from_args(dict(leaves, delta_softplus=True)), config=config)[0]

    def run():
        out = call()
        if backward:
            torch.autograd.grad(out, list(leaves.values()), dout)

    return run


def outputs_and_grads(x: dict, config: ScanConfig) -> list[torch.Tensor]:
    """out and every gradient of one Triton config (fixed dout), in float32."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in x.items()}
    out = selective_scan_triton(ScanInputs.from_args(dict(leaves, delta_softplus=True)), config=config)[0]
    dout = torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda")
    grads = torch.autograd.grad(out, list(leaves.values()), dout.to(out.dtype))
    return [t.float() for t in (out, *grads)]


def mamba_args(x: dict) -> tuple[torch.Tensor, ...]:
    """The extension's positional inputs. Its ``fwd``/``bwd`` take B and C as (b, n_groups, N, L) (mamba_ssm's
    ``selective_scan_fn`` adds the group axis to a 3-D B/C before calling them), so (b, N, L) gets a group of 1."""
    return (x["u"], x["delta"], x["A"], x["B"][:, None], x["C"][:, None], x["D"], x["z"], x["delta_bias"])


def mamba_runner(mod, x: dict, backward: bool):
    dout = torch.randn_like(x["u"])
    args = mamba_args(x)

    def run():
        out, ckpt, _out_z = mod.fwd(*args, True)
        if backward:
            mod.bwd(*args, dout, ckpt, out, None, True, False)

    return run


def mamba_matches(mod, x: dict) -> str:
    """Relative error of our output and gradients against mamba_ssm's CUDA kernel (both bf16)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in x.items()}
    out = selective_scan_fn(**leaves, delta_softplus=True, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    args = mamba_args(x)
    m_out, ckpt, m_out_z = mod.fwd(*args, True)
    du, ddelta, dA, dB, dC, dD, dbias, dz = mod.bwd(*args, dout, ckpt, m_out, None, True, False)
    ref = {"u": du, "delta": ddelta, "A": dA, "B": dB[:, 0], "C": dC[:, 0], "D": dD, "delta_bias": dbias, "z": dz}
    errs = [f"out {relative_error(out, m_out_z):.1e}"]
    errs += [f"d{k} {relative_error(g, ref[k]):.1e}" for k, g in zip(leaves, grads)]
    return ", ".join(errs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS),
                        help="sequence lengths of the main table (issue 17: 2048 8192 32768)")
    parser.add_argument("--sweep", action="store_true", help="time several Triton launch configs")
    parser.add_argument("--sweep-only", action="store_true", help="only the launch-config sweep (implies --sweep)")
    parser.add_argument("--configs", default=",".join(SWEEP),
                        help=f"comma-separated sweep configs by name (default all: {','.join(SWEEP)})")
    parser.add_argument("--sweep-lengths", default="8192,2048", help="comma-separated sequence lengths of the sweep")
    parser.add_argument("--sweep-fused", action="store_true", help="also the fused-state launch configs of FUSED_SWEEP")
    parser.add_argument("--sweep-layouts", default="contiguous",
                        help=f"comma-separated input layouts of the sweep, from {', '.join(LAYOUTS)}")
    parser.add_argument("--no-mamba", action="store_true", help="skip building mamba_ssm's CUDA kernel")
    parser.add_argument("--no-chunked", action="store_true", help="skip the (slow) chunked PyTorch path")
    parser.add_argument("--build-timeout", type=float, default=240.0)
    args = parser.parse_args()
    names = [n for n in args.configs.split(",") if n]
    unknown = sorted(set(names) - set(SWEEP))
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {', '.join(SWEEP)}")
    layouts = [v for v in args.sweep_layouts.split(",") if v]
    if not set(layouts) <= set(LAYOUTS):
        parser.error(f"unknown layouts {sorted(set(layouts) - set(LAYOUTS))}; known: {', '.join(LAYOUTS)}")
    sweep_args = (names, tuple(int(v) for v in args.sweep_lengths.split(",")), args.sweep_fused, layouts)
    name = torch.cuda.get_device_name()
    bw = next((v for k, v in BANDWIDTH.items() if k in name), 3.35e12)
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}; bandwidth for floors {bw / 1e12:.2f} TB/s")
    print(f"shape b {B}, d {D}, N {N}, bf16; Triton config {DEFAULT_CONFIG}")

    if args.sweep_only:
        sweep(*sweep_args)
        return
    mamba, reason = (None, "skipped (--no-mamba)")
    if not args.no_mamba:
        from build_mamba_scan import build

        mamba, reason = build(args.build_timeout)
    if mamba is None:
        print(f"mamba_ssm CUDA: not available ({reason}); issue 5's quoted H100 figures at L 8192 are "
              f"printed instead: {QUOTED_MS['fwd']} ms fwd, {QUOTED_MS['fwd+bwd']} ms fwd+bwd")

    header = f"{'L':>5} {'pass':>8} {'floor ms':>9} {'triton':>9} {'triton tm':>9} {'chunked':>9} {'mamba':>9} " \
             f"{'chunk/tri':>9} {'mamba/tri':>9} {'tri/floor':>9}"
    print(header)
    print("-" * len(header))
    for l in args.lengths:
        x, x_tm = make_inputs(l), make_inputs(l, "time-major")
        for backward in (False, True):
            pass_name = "fwd+bwd" if backward else "fwd"
            floor = floor_bytes(l, backward) / bw * 1e3
            ours = bench(ssmkit_runner(x, "triton", backward))
            ours_tm = bench(ssmkit_runner(x_tm, "triton", backward))
            chunked = float("nan") if args.no_chunked else bench(ssmkit_runner(x, "chunked", backward), slow=True)
            if mamba is not None:
                theirs = bench(mamba_runner(mamba, x, backward))
            else:
                theirs = QUOTED_MS[pass_name] if l == 8192 else float("nan")
            print(f"{l:>5} {pass_name:>8} {floor:>9.3f} {ours:>9.3f} {ours_tm:>9.3f} {chunked:>9.2f} "
                  f"{theirs:>9.3f} {chunked / ours:>9.1f} {theirs / ours:>9.2f} {ours / floor:>9.1f}")
        if mamba is not None:
            print(f"      ours vs mamba_ssm CUDA at L {l} (relative error): {mamba_matches(mamba, x)}")
        del x, x_tm
        torch.cuda.empty_cache()
    if mamba is None:
        print("(mamba column at L 8192: issue 5's quoted H100 figures, not measured here)")

    if args.sweep:
        sweep(*sweep_args)


def sweep(names: list[str], lengths: tuple[int, ...], fused: bool, layouts: list[str]) -> None:
    """Each named config (and FUSED_SWEEP with ``fused``) at each length and input layout, forward and
    forward+backward (short timings, a few seconds a config), after checking its out and gradients against a
    float32 run."""
    configs = {name: SWEEP[name] for name in names}
    if fused:
        configs |= {f"fused{i}": cfg for i, cfg in enumerate(FUSED_SWEEP)}
    print("\nTriton launch configs (ms; mamba_ssm CUDA on H100 at L 8192, quoted: fwd 2.7, fwd+bwd 12.4).")
    print(f"'vs fp32': largest relative error of out and the gradients against DEFAULT_CONFIG on float32 inputs;"
          f" above {SWEEP_TOLERANCE:g} the config is not timed.")
    print(f"{'L':>5} {'layout':<10} {'config':<16} {'chunk':>5} {'fwd tile':>8} {'fwd bd/w':>8} {'bwd bd/w':>8} {'kind':>8} "
          f"{'vs fp32':>8} {'fwd':>8} {'fwd+bwd':>8} {'bwd':>8}")
    start = time.perf_counter()
    for l, layout in itertools.product(lengths, layouts):
        x = make_inputs(l, layout)
        ref = outputs_and_grads({k: v.float() for k, v in x.items()}, DEFAULT_CONFIG)
        for name, cfg in configs.items():
            kind = "timewise" if cfg.timewise else "fused" if cfg.fused_states else "tiles"
            head = f"{l:>5} {layout:<10} {name:<16} {cfg.chunk:>5} {cfg.fwd_chunk or cfg.chunk:>8} " \
                   f"{f'{cfg.fwd_block_d}/{cfg.fwd_warps}':>8} {f'{cfg.bwd_block_d}/{cfg.bwd_warps}':>8} {kind:>8}"
            try:
                results = outputs_and_grads(x, cfg)
                worst = max(relative_error(ours, expected) for ours, expected in zip(results, ref))
                del results
                if not worst <= SWEEP_TOLERANCE:
                    print(f"{head} {worst:>8.1e} WRONG: not timed", flush=True)
                    continue
                fwd = bench(ssmkit_runner(x, "triton", False, cfg), quick=True)
                both = bench(ssmkit_runner(x, "triton", True, cfg), quick=True)
                print(f"{head} {worst:>8.1e} {fwd:>8.3f} {both:>8.3f} {both - fwd:>8.3f}", flush=True)
            # Any failure of one config (compile error, out of shared memory) is reported; the sweep goes on.
            except Exception as err:  # noqa: BLE001
                print(f"{head} failed: {str(err).splitlines()[0][:200]}", flush=True)
        del x, ref
        torch.cuda.empty_cache()
    print(f"(sweep took {time.perf_counter() - start:.0f} s, compiles included)")


if __name__ == "__main__":
    main()
