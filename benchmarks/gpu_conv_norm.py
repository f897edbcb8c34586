"""GPU benchmark: Triton causal conv and gated RMS norm against the chunked PyTorch path (and mamba_ssm).

Run on the device machine from the repository root: ``python benchmarks/gpu_conv_norm.py``.
Times are medians of ``triton.testing.do_bench``; the floor is the HBM traffic of one read of each
input and one write of each output at the H200's 4.8 TB/s, and GB/s is that traffic over the time.
mamba_ssm's gated norm is its pure-Triton ``layernorm_gated`` (loaded from .ext/ by file, without
its CUDA extensions); causal_conv1d is a compiled CUDA package and is not tried ("n/a").
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch

from ssmkit.ops.causal_conv1d import causal_conv1d_fn
from ssmkit.ops.norm import gated_rms_norm_fn

HBM_BYTES_PER_S = 4.8e12  # H200
MAMBA_GATED = Path(".ext/mamba_ssm-2.3.2.post1/mamba_ssm/ops/triton/layernorm_gated.py")


def _bench(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")


def _mamba_rmsnorm() -> Callable | None:
    """mamba_ssm's Triton gated rmsnorm_fn, or None when it cannot be loaded here."""
    try:
        spec = importlib.util.spec_from_file_location("mamba_layernorm_gated", MAMBA_GATED)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.rmsnorm_fn
    except Exception as err:  # a missing dependency (einops) or file: reported as n/a
        print(f"mamba_ssm layernorm_gated unavailable: {type(err).__name__}: {err}")
        return None


def _row(name: str, floor_bytes: float, times: dict[str, float | None]) -> str:
    floor_ms = floor_bytes / HBM_BYTES_PER_S * 1e3
    ours = times["triton"]
    cells = [f"{name:<34}", f"{floor_ms:8.3f}"]
    for key in ("triton", "chunked", "mamba_ssm"):
        t = times.get(key)
        cells.append(f"{t:9.3f}" if t is not None else f"{'n/a':>9}")
    chunked = times["chunked"]
    mamba = times.get("mamba_ssm")
    cells.append(f"{chunked / ours:8.2f}x")
    cells.append(f"{mamba / ours:8.2f}x" if mamba is not None else f"{'n/a':>9}")
    cells.append(f"{floor_bytes / ours / 1e6:8.0f}")
    cells.append(f"{floor_ms / ours * 100:6.1f}%")
    return " ".join(cells)


def _header() -> str:
    cols = ["case".ljust(34), "floor ms", "triton ms", "chunk ms", "mamba ms", "chunk/ours", "mamba/ours", "GB/s", "of HBM"]
    return " ".join(f"{c:>9}" if i else c for i, c in enumerate(cols))


def bench_conv(batch: int = 8, dim: int = 4096, length: int = 8192, width: int = 4) -> list[str]:
    dt = torch.bfloat16
    x = torch.randn(batch, length, dim, device="cuda", dtype=dt).transpose(1, 2)  # channel-last, as the layers
    weight = torch.randn(dim, width, device="cuda", dtype=dt)
    bias = torch.randn(dim, device="cuda", dtype=dt)
    dout = torch.randn_like(x)
    size = x.numel() * x.element_size()
    rows = []
    fwd, fwd_bwd = {}, {}
    for backend in ("triton", "chunked"):
        fwd[backend] = _bench(lambda b=backend: causal_conv1d_fn(x, weight, bias, activation="silu", backend=b))
        leaves = [x.detach().requires_grad_(), weight.detach().requires_grad_(), bias.detach().requires_grad_()]

        def step(b=backend, leaves=leaves):
            causal_conv1d_fn(*leaves, activation="silu", backend=b).backward(dout)

        fwd_bwd[backend] = _bench(step, grad_to_none=leaves)
    shape = f"({batch}, {dim}, {length}) w{width}"
    rows.append(_row(f"conv fwd {shape}", 2 * size, fwd))  # read x, write out
    rows.append(_row(f"conv fwd+bwd {shape}", 5 * size, fwd_bwd))  # + read x, dout, write dx
    return rows


def bench_gated_norm(rows_: int = 8 * 8192, n: int = 4096, group_sizes: tuple[int, ...] = (4096, 512)) -> list[str]:
    dt = torch.bfloat16
    x = torch.randn(rows_, n, device="cuda", dtype=dt)
    z = torch.randn_like(x)
    weight = torch.ones(n, device="cuda", dtype=dt)
    dout = torch.randn_like(x)
    size = x.numel() * x.element_size()
    mamba = _mamba_rmsnorm()
    rows = []
    for group_size in group_sizes:
        fwd, fwd_bwd = {}, {}
        impls = {
            b: (lambda xx, zz, ww, b=b, g=group_size: gated_rms_norm_fn(xx, zz, ww, 1e-5, g, False, backend=b))
            for b in ("triton", "chunked")
        }
        if mamba is not None:
            impls["mamba_ssm"] = lambda xx, zz, ww, g=group_size: mamba(xx, ww, None, z=zz, eps=1e-5, group_size=g,
                                                                         norm_before_gate=False)
        for name, impl in impls.items():
            fwd[name] = _bench(lambda impl=impl: impl(x, z, weight))
            leaves = [x.detach().requires_grad_(), z.detach().requires_grad_(), weight.detach().requires_grad_()]

            def step(impl=impl, leaves=leaves):
                impl(*leaves).backward(dout)

            fwd_bwd[name] = _bench(step, grad_to_none=leaves)
        shape = f"({rows_}, {n}) g{group_size}"
        rows.append(_row(f"gated norm fwd {shape}", 3 * size, fwd))  # read x, z, write out
        rows.append(_row(f"gated norm fwd+bwd {shape}", 8 * size, fwd_bwd))  # + read x, z, dout, write dx, dz
    return rows


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}, bfloat16, medians of triton.testing.do_bench")
    print(_header())
    for row in bench_conv() + bench_gated_norm():
        print(row, flush=True)


if __name__ == "__main__":
    main()
