"""GPU benchmark: Triton causal conv and gated RMS norm against the chunked PyTorch path (and mamba_ssm).

Run on the device machine from the repository root: ``python benchmarks/gpu_conv_norm.py``.
Times are medians of ``triton.testing.do_bench``; the floor is the HBM traffic of one read of each
input and one write of each output (H100 SXM 3.35 TB/s, H200 4.8 TB/s), and GB/s is that traffic over
the time. ``--conv-sweep`` times the causal conv backward's launch variants
(``ssmkit.ops.causal_conv1d.triton_backward.BackwardLaunch``) on both layouts, each checked against
the float32 generic kernel's gradients.
mamba_ssm's gated norm is its pure-Triton ``layernorm_gated`` (loaded from .ext/ by file, without
its CUDA extensions); causal_conv1d is a compiled CUDA package and is not tried ("n/a").
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch

from ssmkit.ops.causal_conv1d import causal_conv1d_fn, triton_backward
from ssmkit.ops.norm import gated_rms_norm_fn

HBM_BYTES_PER_S = 4.8e12  # H200; main() sets the H100's 3.35e12 on one
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


# (kernel, block_l, block_d, num_warps, programs) per layout; None: the layout's default tile.
SWEEP = {
    # The first row of each layout is the default launch (the shifted kernel at default_tile's tile).
    "channel-last": [("shifted", None, None, 4, 4096), ("generic", None, None, 4, 4096), ("generic", 16, 128, 8, 4096),
                     ("shifted", 16, 128, 8, 4096), ("shifted", 16, 64, 4, 4096), ("shifted", 32, 64, 8, 4096),
                     ("shifted", 32, 64, 4, 4096), ("shifted", 64, 32, 4, 4096), ("shifted", 64, 64, 8, 4096),
                     ("shifted", 32, 32, 2, 4096), ("shifted", 16, 32, 2, 4096), ("shifted", 32, 32, 4, 16384)],
    "channel-first": [("shifted", None, None, 4, 4096), ("generic", None, None, 4, 4096), ("generic", 128, 16, 8, 4096),
                      ("shifted", 128, 16, 8, 4096), ("shifted", 256, 16, 8, 4096), ("shifted", 64, 32, 4, 4096),
                      ("shifted", 32, 16, 2, 4096), ("shifted", 128, 32, 8, 4096), ("shifted", 64, 16, 4, 16384)],
}


def sweep_conv_backward(batch: int = 8, dim: int = 4096, length: int = 8192, width: int = 4) -> None:
    """Forward+backward of each backward launch variant, bf16, with the worst relative gradient error
    against the float32 generic kernel (x, weight and bias all take gradients)."""
    size = batch * dim * length * 2
    floor_ms = 5 * size / HBM_BYTES_PER_S * 1e3
    print(f"\ncausal conv fwd+bwd launch sweep, ({batch}, {dim}, {length}) w{width} silu bf16; floor {floor_ms:.3f} ms")
    print(f"{'layout':<14} {'kernel':<8} {'tile':>9} {'warps':>5} {'progs':>6} {'ms':>8} {'vs default':>10} "
          f"{'x floor':>8} {'max grad err':>12}")
    saved = triton_backward.LAUNCH
    for layout, variants in SWEEP.items():
        if layout == "channel-last":
            x = torch.randn(batch, length, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        else:
            x = torch.randn(batch, dim, length, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(dim, width, device="cuda", dtype=torch.bfloat16) / width
        bias = torch.randn(dim, device="cuda", dtype=torch.bfloat16)
        dout = torch.randn_like(x)
        leaves32 = [t.float().detach().requires_grad_() for t in (x, weight, bias)]
        triton_backward.LAUNCH = triton_backward.BackwardLaunch(kernel="generic")
        causal_conv1d_fn(*leaves32, activation="silu", backend="triton").backward(dout.float())
        ref = [t.grad for t in leaves32]
        del leaves32
        base = None
        for kernel, block_l, block_d, warps, programs in variants:
            triton_backward.LAUNCH = triton_backward.BackwardLaunch(kernel, block_l, block_d, warps, programs)
            leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]

            def step(leaves=leaves):
                causal_conv1d_fn(*leaves, activation="silu", backend="triton").backward(dout)

            try:
                step()
                err = max(((g.grad.float() - r).norm() / r.norm()).item() for g, r in zip(leaves, ref))
                for t in leaves:
                    t.grad = None
                ms = _bench(step, grad_to_none=leaves)
            except Exception as exc:  # a tile that does not compile on this card: reported, not fatal
                print(f"{layout:<14} {kernel:<8} {block_l}x{block_d} {warps:>5}: failed ({type(exc).__name__})")
                continue
            base = base or ms
            tile = f"{block_l or '-'}x{block_d or '-'}"
            print(f"{layout:<14} {kernel:<8} {tile:>9} {warps:>5} {programs:>6} {ms:8.3f} {base / ms:9.2f}x "
                  f"{ms / floor_ms:7.1f}x {err:12.2e}", flush=True)
    triton_backward.LAUNCH = saved


def main() -> None:
    global HBM_BYTES_PER_S
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conv-sweep", action="store_true", help="only the conv backward launch sweep")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    if "H100" in torch.cuda.get_device_name():
        HBM_BYTES_PER_S = 3.35e12
    print(f"device: {torch.cuda.get_device_name()}, bfloat16, medians of triton.testing.do_bench, "
          f"HBM {HBM_BYTES_PER_S / 1e12:.2f} TB/s")
    if args.conv_sweep:
        sweep_conv_backward()
        return
    print(_header())
    for row in bench_conv() + bench_gated_norm():
        print(row, flush=True)


if __name__ == "__main__":
    main()
