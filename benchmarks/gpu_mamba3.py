"""Mamba-3 on a GPU: ssmkit's layer against mamba_ssm's own Mamba-3 (its Triton SISO kernels).

mamba_ssm's source distribution (``pip download --no-deps --no-binary :all: mamba-ssm``, unpacked under
``.ext/``; nothing of it is committed) is imported without its package ``__init__`` (which would load the
compiled CUDA scan), so only its pure-Triton Mamba-3 path runs. Both layers get the same weights
(ssmkit uses mamba_ssm's parameter names), then:

* parity: outputs and input gradients, relative error, fp32 and bf16;
* speed: forward and forward+backward at batch 8, d_model 768 (24 heads x 64, N 128), L 2048 and 8192.

Both for ssmkit's default backend (chunked PyTorch) and its ``triton`` route (single-input Mamba-3 through
the SSD op's Triton kernels, ``ssmkit/ops/mamba3/via_ssd.py``), the layer's scan switched by patching the
function it calls; and "ssmkit unfolded", the triton route as before the in-projection's slices were folded into
its kernels (``mamba3.FOLD_PROJECTION`` off: the B/C norm and Δ/A kernels apart), in the speed table and in
``--counts`` / ``--profile`` / ``--host-profile``.

``--upstream`` picks the Mamba-3 compared with: ``release`` (2.3.2.post1 as unpacked; ssmkit's layer with
``decay_activation="softplus"``) or ``main`` (that release's module with main's heavy-tail decay activation,
state-spaces/mamba #962, patched in: ``mamba_ssm_source.import_mamba3``; ssmkit's with ``"heavy_tail"``).
Without mamba_ssm's source the ssmkit rows still print, and the peer's row says why it is missing.

MIMO needs mamba_ssm's TileLang kernels, which are not installed on the device machine: SISO only.

``--profile L`` adds a per-kernel table (``torch.profiler``, CUDA time summed by kernel name) of one
forward+backward of each layer at length L: where the layer's time goes besides its scan.

    python benchmarks/gpu_mamba3.py [--upstream release|main] [--lengths 2048 8192] [--no-parity] [--no-timing]
    python benchmarks/gpu_mamba3.py --no-parity --no-timing --profile 2048
    python benchmarks/gpu_mamba3.py --no-parity --counts      # + launches and host time a fwd / bwd, per layer

``--glue`` times ssmkit's layer with its fused scalar kernels and final-state skip (the default) against the
PyTorch forms they replaced (``step_sizes._triton`` patched off, the final state always built), same run,
with the host time a call beside each.

``--counts`` adds, after the speed table, each layer's launches in one forward and one backward (counted as
``launch_count.py`` counts them on a CPU: Triton launches and PyTorch ops that launch a kernel), the forward's
autograd nodes and the host time of each, the GPU idle at the start of each (so pure host time; at b8 L 2K the layers are bound by it).

``--host-profile L`` runs one layer's forward+backward 20 times under cProfile (Python time on the host,
the GPU waited for only at the end) and prints the functions with the most time of their own: at short
lengths the layers are bound by launching their kernels, not by running them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from unittest import mock

import torch
from mamba_ssm_source import DECAY_ACTIVATION, UPSTREAMS, import_mamba3

import ssmkit.layers.mamba3 as mamba3_layer
from ssmkit.layers.mamba3 import Mamba3
from ssmkit.ops.mamba3 import mamba3_scan
from ssmkit.ops.mamba3.projected import mamba3_scan_from_projection

BACKENDS = ("chunked", "triton")


@contextlib.contextmanager
def scan_backend(backend: str):
    """ssmkit's Mamba-3 layers run their scan with ``backend`` inside the block."""
    mamba3_layer.mamba3_scan = functools.partial(mamba3_scan, backend=backend)
    mamba3_layer.mamba3_scan_from_projection = functools.partial(mamba3_scan_from_projection, backend=backend)
    try:
        yield
    finally:
        mamba3_layer.mamba3_scan = mamba3_scan
        mamba3_layer.mamba3_scan_from_projection = mamba3_scan_from_projection


@contextlib.contextmanager
def unfolded():
    """ssmkit's triton route as before the projection was folded in: the B/C norm and Δ/A kernels apart
    (``Mamba3._project``, then ``mamba3_scan``)."""
    with scan_backend("triton"), mock.patch.object(mamba3_layer, "FOLD_PROJECTION", False):
        yield

SHAPES = {"d_model": 768, "d_state": 128, "headdim": 64, "expand": 2}


def pair(their_cls: type | None, dtype: torch.dtype, *, outproj_norm: bool,
         activation: str) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(ours, theirs) with identical weights on the GPU (theirs None without mamba_ssm)."""
    torch.manual_seed(0)
    ours = Mamba3(**SHAPES, is_outproj_norm=outproj_norm, decay_activation=activation, device="cuda", dtype=dtype)
    if their_cls is None:
        return ours, None
    theirs = their_cls(**SHAPES, is_outproj_norm=outproj_norm, device="cuda", dtype=dtype)
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"state dicts differ: missing {missing}, unexpected {unexpected}")
    return ours, theirs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def parity(their_cls: type, activation: str) -> list[tuple]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for norm in (False, True):
            ours, theirs = pair(their_cls, dtype, outproj_norm=norm, activation=activation)
            x = torch.randn(2, 1000, SHAPES["d_model"], device="cuda", dtype=dtype, requires_grad=True)
            y_theirs = theirs(x)
            (g_theirs,) = torch.autograd.grad(y_theirs.float().square().sum(), x)
            for backend in BACKENDS:
                with scan_backend(backend):
                    y_ours = ours(x)
                    (g_ours,) = torch.autograd.grad(y_ours.float().square().sum(), x)
                row = (str(dtype).removeprefix("torch."), norm, backend, rel(y_ours, y_theirs), rel(g_ours, g_theirs))
                print(f"{row[0]:>9} {row[1]!s:>12} {row[2]:>8} {row[3]:>12.2e} {row[4]:>11.2e}", flush=True)
                rows.append(row)
    return rows


def timing(their_cls: type | None, activation: str, lengths: list[int]) -> list[tuple]:
    from triton.testing import do_bench

    rows = []
    for length in lengths:
        ours, theirs = pair(their_cls, torch.bfloat16, outproj_norm=False, activation=activation)
        x = torch.randn(8, length, SHAPES["d_model"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        runs = [(f"ssmkit {b}", ours, scan_backend(b)) for b in BACKENDS] + [("ssmkit unfolded", ours, unfolded())]
        runs += [("mamba_ssm", theirs, None)] if theirs is not None else []
        for name, layer, ctx in runs:
            with ctx or contextlib.nullcontext():
                fwd = do_bench(lambda layer=layer, x=x: layer(x), return_mode="median")
                both = do_bench(lambda layer=layer, x=x: layer(x).sum().backward(), return_mode="median")
            rows.append((length, name, fwd, both))
            print(f"{length:>6} {name:>15} {fwd:>8.2f} {both:>11.2f}", flush=True)
    return rows


def warm_layers(their_cls: type | None, activation: str, length: int) -> tuple[torch.Tensor, list[tuple]]:
    """x (8, length, d_model) and [(name, layer, context factory)] for ssmkit's layer (triton route, and that route
    unfolded) and mamba_ssm's, each run three times first (compilation, autotuning)."""
    ours, theirs = pair(their_cls, torch.bfloat16, outproj_norm=False, activation=activation)
    x = torch.randn(8, length, SHAPES["d_model"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    runs = [("ssmkit triton", ours, functools.partial(scan_backend, "triton")), ("ssmkit unfolded", ours, unfolded)]
    runs += [("mamba_ssm", theirs, contextlib.nullcontext)] if theirs is not None else []
    for _, layer, context in runs:
        with context():
            for _ in range(3):
                layer(x).sum().backward()
    torch.cuda.synchronize()
    return x, runs


def profile(their_cls: type | None, activation: str, length: int, rows: int = 25) -> None:
    """Per-kernel CUDA time of one forward+backward of ssmkit's layer (triton route) and mamba_ssm's."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    x, runs = warm_layers(their_cls, activation, length)
    for name, layer, context in runs:
        with context():
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                layer(x).sum().backward()
                torch.cuda.synchronize()
        totals: dict[str, list[float]] = {}
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                entry = totals.setdefault(ev.name, [0.0, 0])
                entry[0] += ev.device_time_total / 1e3
                entry[1] += 1
        total = sum(v[0] for v in totals.values())
        print(f"\nprofile, {name} layer fwd+bwd, L {length}: {total:.2f} ms of kernels, "
              f"{sum(v[1] for v in totals.values())} launches")
        print(f"{'ms':>8} {'calls':>6}  kernel")
        for kernel, (ms, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:rows]:
            print(f"{ms:>8.3f} {calls:>6}  {kernel[:110]}")


def host_profile(their_cls: type | None, activation: str, length: int, rows: int = 30) -> None:
    """Host time per fwd+bwd (wall with the GPU waited for once per 20 calls) and cProfile's top functions."""
    import cProfile
    import pstats
    import time

    x, runs = warm_layers(their_cls, activation, length)
    for name, layer, context in runs:
        with context():
            start = time.perf_counter()
            for _ in range(20):
                layer(x).sum().backward()
            host = (time.perf_counter() - start) / 20
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / 20
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(20):
                layer(x).sum().backward()
            prof.disable()
            torch.cuda.synchronize()
        print(f"\nhost profile, {name} layer fwd+bwd, L {length}: {host * 1e3:.2f} ms of host time a call "
              f"(wall {wall * 1e3:.2f} ms); cProfile over 20 calls, by own time:")
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(rows)
        stats.sort_stats("cumulative").print_stats(rows)


@contextlib.contextmanager
def pytorch_glue():
    """The Mamba-3 route's scalars in PyTorch and its final state always built (as before the fused kernels; the
    projection not folded in)."""
    import ssmkit.ops.mamba3 as mamba3_ops
    from ssmkit.ops.mamba3 import step_sizes, via_ssd

    route = mamba3_ops.mamba3_via_ssd

    def always_final(inputs, ssd_backend="auto", final_state=True):
        return route(inputs, ssd_backend=ssd_backend, final_state=True)

    with mock.patch.object(step_sizes, "_triton", lambda backend, device: False), \
            mock.patch.object(mamba3_layer, "FOLD_PROJECTION", False), \
            mock.patch.object(via_ssd, "FUSED_SCALARS", False), \
            mock.patch.object(mamba3_ops, "mamba3_via_ssd", always_final):
        yield


def glue(activation: str, lengths: list[int]) -> None:
    """ssmkit's layer (SSD route) with the fused scalars on and off: fwd, fwd+bwd, host time a fwd+bwd."""
    import time

    from triton.testing import do_bench

    ours, _ = pair(None, torch.bfloat16, outproj_norm=False, activation=activation)
    print(f"\n{'L':>6} {'glue':>8} {'fwd ms':>8} {'fwd+bwd ms':>11} {'host ms':>8}")
    for length in lengths:
        x = torch.randn(8, length, SHAPES["d_model"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for name, ctx in (("fused", contextlib.nullcontext), ("pytorch", pytorch_glue)):
            with scan_backend("triton"), ctx():
                fwd = do_bench(lambda: ours(x), return_mode="median")
                both = do_bench(lambda: ours(x).sum().backward(), return_mode="median")
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(20):
                    ours(x).sum().backward()
                host = (time.perf_counter() - start) / 20
                torch.cuda.synchronize()
            print(f"{length:>6} {name:>8} {fwd:>8.2f} {both:>11.2f} {host * 1e3:>8.2f}", flush=True)


def counts(their_cls: type | None, activation: str, lengths: list[int], repeats: int = 30) -> None:
    """Per layer and length: kernels launched by one forward and one backward (``launch_count.py``'s counters:
    Triton launches and PyTorch ops that launch a kernel, as its CPU count gives them), the forward's autograd
    nodes and the host time of each (wall, the GPU idle at the start: nothing is waited for inside). Every layer
    is timed before the counting wrapper goes around Triton's launches (it costs the host a little)."""
    import launch_count

    host = {}
    for length in lengths:
        x, runs = warm_layers(their_cls, activation, length)
        for name, layer, context in runs:
            with context():
                host[length, name] = launch_count.host_us(layer, x, repeats, sync=torch.cuda.synchronize)
    launch_count.hook_triton_launches()
    print(f"\nlaunches and host time, bf16, b8 (launches: Triton + PyTorch; host: median of {repeats}, microseconds):")
    print(f"{'L':>6} {'layer':>15} {'fwd launches':>14} {'bwd launches':>14} {'nodes':>6} {'host fwd us':>12} "
          f"{'host bwd us':>12}")
    for length in lengths:
        x, runs = warm_layers(their_cls, activation, length)
        for name, layer, context in runs:
            fwd_us, bwd_us = host[length, name]
            try:
                with context():
                    launched = launch_count.count_step(layer, x)
            except Exception as err:  # noqa: BLE001 - a layer failing under the dispatch mode loses its count only
                print(f"{length:>6} {name:>15} count failed ({type(err).__name__}: {err}); host fwd {fwd_us:.0f} us, "
                      f"bwd {bwd_us:.0f} us", flush=True)
                continue
            (tf, pf), (tb, pb) = launched["forward"], launched["backward"]
            print(f"{length:>6} {name:>15} {f'{len(tf)} + {len(pf)}':>14} {f'{len(tb)} + {len(pb)}':>14} "
                  f"{launched['nodes']:>6} {fwd_us:>12.0f} {bwd_us:>12.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", choices=UPSTREAMS, default="release",
                        help="mamba_ssm's release (softplus decay) or main (heavy-tail decay, #962)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--no-parity", action="store_true")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--profile", type=int, nargs="*", default=[], metavar="L",
                        help="per-kernel profile of each layer's fwd+bwd at these lengths")
    parser.add_argument("--glue", action="store_true", help="fused scalar kernels on / off, ssmkit only")
    parser.add_argument("--host-profile", type=int, nargs="*", default=[], metavar="L",
                        help="cProfile of each layer's fwd+bwd on the host at these lengths")
    parser.add_argument("--counts", action="store_true",
                        help="after the speed table: launches and host time of a forward and a backward, per layer")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import triton

    activation = DECAY_ACTIVATION[args.upstream]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; mamba_ssm "
          f"{args.upstream} (ssmkit decay_activation={activation!r})")
    their_cls = import_mamba3(args.upstream)
    if their_cls is None:
        print("mamba_ssm's Mamba3 is not available (reason above): ssmkit's rows only, no parity")
    elif not args.no_parity:
        print("parity (ssmkit vs mamba_ssm, same weights, b2 L1000):")
        print(f"{'dtype':>9} {'outproj_norm':>12} {'backend':>8} {'out rel err':>12} {'dx rel err':>11}")
        parity(their_cls, activation)
    if args.glue:
        glue(activation, args.lengths)
    for length in args.profile:
        profile(their_cls, activation, length)
    for length in args.host_profile:
        host_profile(their_cls, activation, length)
    if not args.no_timing:
        speed_table(their_cls, activation, args.lengths)
    if args.counts:
        counts(their_cls, activation, args.lengths)


def speed_table(their_cls: type | None, activation: str, lengths: list[int]) -> None:
    print("\nspeed, bf16, batch 8, d_model 768 (24 heads x 64, N 128), median ms:")
    print(f"{'L':>6} {'layer':>15} {'fwd ms':>8} {'fwd+bwd ms':>11}")
    rows = timing(their_cls, activation, lengths)
    for length in lengths:
        t = next((r for r in rows if r[0] == length and r[1] == "mamba_ssm"), None)
        c = next(r for r in rows if r[0] == length and r[1] == "ssmkit chunked")
        for backend in BACKENDS:
            o = next(r for r in rows if r[0] == length and r[1] == f"ssmkit {backend}")
            vs = "" if t is None else f"; / mamba_ssm: fwd {o[2] / t[2]:.2f}x, fwd+bwd {o[3] / t[3]:.2f}x"
            print(f"L={length}: ssmkit {backend} / chunked: fwd {o[2] / c[2]:.2f}x, fwd+bwd {o[3] / c[3]:.2f}x{vs}")
        u = next(r for r in rows if r[0] == length and r[1] == "ssmkit unfolded")
        o = next(r for r in rows if r[0] == length and r[1] == "ssmkit triton")
        print(f"L={length}: ssmkit triton (projection folded in) / unfolded: fwd {o[2] / u[2]:.2f}x, "
              f"fwd+bwd {o[3] / u[3]:.2f}x")


if __name__ == "__main__":
    main()
