"""Registers and spills of every Triton kernel a layer's forward and backward launch on a GPU, without a GPU.

The layer runs one forward and one ``.sum().backward()`` on the CPU at the benchmark's shape with each op's
``auto`` backend resolved as on CUDA (``launch_count._cuda_choices``); every Triton launch of an ``ssmkit.ops``
module is captured instead of run (``sm90_resources.capture_launches``; the PyTorch ops between them run on
uninitialised outputs, which is fine: launches depend on shapes only), then compiled for sm_90 from its own
arguments, specialized as the JIT specializes them (``compile_like_jit``). Compile-time facts, not timings.
Grids are the CPU run's: a launcher that sizes its grid by the GPU's SM count (the gated norm's backward)
shows its CPU fallback there; a kernel's code does not depend on its grid.

    python benchmarks/layer_registers.py --layers mamba3 mamba2 mamba
    python benchmarks/layer_registers.py --layers mamba3-mimo          # rank-4 MIMO on the fused kernels
    python benchmarks/layer_registers.py --layers mamba3 --set ssmkit.ops.mamba3.triton_rotary._NORM_WARPS=4
    PYTHONPATH=/path/to/triton-3.6:$PWD:$PWD/benchmarks python benchmarks/layer_registers.py   # the device's Triton

``--set MODULE.NAME=INT`` changes a module-level launch constant for the run (to compare tiles or warps).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil

import torch
import triton
from launch_constants import add_set_argument, apply_sets
from launch_count import BENCH, LAYERS, _cuda_choices, make_layer
from sm90_resources import capture_launches, compile_like_jit, resource_usage

import ssmkit.layers.mamba3 as mamba3_layer
import ssmkit.ops
import ssmkit.ops.backend as backend_module
from ssmkit.ops.mamba3 import via_ssd


def ops_modules() -> list:
    """Every module under ``ssmkit.ops`` (imported), where kernels are defined or imported by name."""
    for info in pkgutil.walk_packages(ssmkit.ops.__path__, "ssmkit.ops."):
        importlib.import_module(info.name)
    return [m for name, m in list(__import__("sys").modules.items()) if name.startswith("ssmkit.ops") and m]


def layer_launches(name: str, shape: tuple[int, ...]) -> list[tuple[str, object, tuple, dict]]:
    b, l, d_model, d_state, headdim = shape
    torch.manual_seed(0)
    layer = make_layer(name, d_model, d_state, headdim)
    x = torch.randn(b, l, d_model, dtype=torch.bfloat16, requires_grad=True)
    mamba3_layer.FOLD_PROJECTION = name != "mamba3-unfolded"
    via_ssd.FUSED_MIMO = name != "mamba3-mimo-unfused"
    try:
        return capture_launches(ops_modules(), lambda: layer(x).sum().backward())
    finally:
        mamba3_layer.FOLD_PROJECTION = True
        via_ssd.FUSED_MIMO = True


def _kernel(name: str, modules: list):
    return next(getattr(m, name) for m in modules if isinstance(getattr(m, name, None), triton.runtime.jit.JITFunction))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", choices=[v for v in LAYERS if v != "mamba-time"],
                        default=["mamba3", "mamba2", "mamba"])
    parser.add_argument("--shape", type=int, nargs=5, metavar=("B", "L", "D_MODEL", "D_STATE", "HEADDIM"),
                        default=BENCH)
    add_set_argument(parser)
    args = parser.parse_args()
    apply_sets(args.set)
    _cuda_choices()
    # backend="triton" given explicitly is accepted off CUDA (nothing runs); TRITON_INTERPRET itself stays
    # unset, as on a GPU: launchers that read it (fences, bf16 dots) choose what the GPU gets.
    backend_module._triton_interpreter = lambda: True
    modules = ops_modules()
    print(f"Triton {triton.__version__}, sm_90; b, L, d_model, N, headdim = {tuple(args.shape)}, bf16"
          + (f"; {', '.join(args.set)}" if args.set else ""))
    for name in args.layers:
        print(f"{name}:")
        seen = set()
        for kernel, grid, kargs, kwargs in layer_launches(name, tuple(args.shape)):
            compiled = compile_like_jit(_kernel(kernel, modules), kargs, kwargs)
            regs, spilled = resource_usage(compiled)
            row = (f"  {kernel:<26} grid {grid!s:<18} warps {kwargs.get('num_warps', 4):>2} stages "
                   f"{kwargs.get('num_stages', 3)}: registers {regs:>3}, spilled {spilled:>4} B, shared "
                   f"{compiled.metadata.shared:>6} B")
            if row not in seen:
                seen.add(row)
                print(row, flush=True)


if __name__ == "__main__":
    main()
