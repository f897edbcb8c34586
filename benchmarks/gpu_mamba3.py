"""Mamba-3 on a GPU: ssmkit's layer against mamba_ssm's own Mamba-3 (its Triton SISO kernels).

mamba_ssm's source distribution (``pip download --no-deps --no-binary :all: mamba-ssm``, unpacked under
``.ext/``; nothing of it is committed) is imported without its package ``__init__`` (which would load the
compiled CUDA scan), so only its pure-Triton Mamba-3 path runs. Both layers get the same weights
(ssmkit uses mamba_ssm's parameter names), then:

* parity: outputs and input gradients, relative error, fp32 and bf16;
* speed: forward and forward+backward at batch 8, d_model 768 (24 heads x 64, N 128), L 2048 and 8192.

Both for ssmkit's default backend (chunked PyTorch) and its ``triton`` route (single-input Mamba-3 through
the SSD op's Triton kernels, ``ssmkit/ops/mamba3/via_ssd.py``), the layer's scan switched by patching the
function it calls.

MIMO needs mamba_ssm's TileLang kernels, which are not installed on the device machine: SISO only.

    python benchmarks/gpu_mamba3.py
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch
from mamba_ssm_source import import_from_source

import ssmkit.layers.mamba3 as mamba3_layer
from ssmkit.layers.mamba3 import Mamba3
from ssmkit.ops.mamba3 import mamba3_scan

BACKENDS = ("chunked", "triton")


@contextlib.contextmanager
def scan_backend(backend: str):
    """ssmkit's Mamba-3 layers run their scan with ``backend`` inside the block."""
    mamba3_layer.mamba3_scan = functools.partial(mamba3_scan, backend=backend)
    try:
        yield
    finally:
        mamba3_layer.mamba3_scan = mamba3_scan

SHAPES = {"d_model": 768, "d_state": 128, "headdim": 64, "expand": 2}


def pair(their_cls: type, dtype: torch.dtype, *, outproj_norm: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, theirs) with identical weights on the GPU."""
    torch.manual_seed(0)
    theirs = their_cls(**SHAPES, is_outproj_norm=outproj_norm, device="cuda", dtype=dtype)
    ours = Mamba3(**SHAPES, is_outproj_norm=outproj_norm, device="cuda", dtype=dtype)
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"state dicts differ: missing {missing}, unexpected {unexpected}")
    return ours, theirs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def parity(their_cls: type) -> list[tuple]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for norm in (False, True):
            ours, theirs = pair(their_cls, dtype, outproj_norm=norm)
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


def timing(their_cls: type) -> list[tuple]:
    from triton.testing import do_bench

    rows = []
    for length in (2048, 8192):
        ours, theirs = pair(their_cls, torch.bfloat16, outproj_norm=False)
        x = torch.randn(8, length, SHAPES["d_model"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        runs = [(f"ssmkit {b}", ours, scan_backend(b)) for b in BACKENDS] + [("mamba_ssm", theirs, None)]
        for name, layer, ctx in runs:
            with ctx or contextlib.nullcontext():
                fwd = do_bench(lambda layer=layer, x=x: layer(x), return_mode="median")
                both = do_bench(lambda layer=layer, x=x: layer(x).sum().backward(), return_mode="median")
            rows.append((length, name, fwd, both))
            print(f"{length:>6} {name:>15} {fwd:>8.2f} {both:>11.2f}", flush=True)
    return rows


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    their_cls = import_from_source("mamba_ssm.modules.mamba3", "Mamba3")
    if their_cls is None:
        sys.exit("mamba_ssm's source is not under .ext/: nothing to compare with")
    print("parity (ssmkit vs mamba_ssm, same weights, b2 L1000):")
    print(f"{'dtype':>9} {'outproj_norm':>12} {'backend':>8} {'out rel err':>12} {'dx rel err':>11}")
    parity(their_cls)
    print("\nspeed, bf16, batch 8, d_model 768 (24 heads x 64, N 128), median ms:")
    print(f"{'L':>6} {'layer':>15} {'fwd ms':>8} {'fwd+bwd ms':>11}")
    rows = timing(their_cls)
    for length in (2048, 8192):
        t = next(r for r in rows if r[0] == length and r[1] == "mamba_ssm")
        for backend in BACKENDS:
            o = next(r for r in rows if r[0] == length and r[1] == f"ssmkit {backend}")
            print(f"L={length}: ssmkit {backend} / mamba_ssm time, fwd {o[2] / t[2]:.2f}x, fwd+bwd {o[3] / t[3]:.2f}x")

if __name__ == "__main__":
    main()
