"""Registers and spills of the Triton SSD kernels on sm_90, without a GPU.

For each named launch config (``ssmkit.ops.ssd.launch.CONFIGS``), every kernel that one forward and one
backward of the SSD op launch at the benchmark's call (b 8, L 8192, 32 heads × 64, N 128, 1 group, chunk 256,
bf16, D and dt_bias, softplus; ``gpu_ssd.py``'s), compiled for an H100/H200 from the launcher's own arguments
(on ``meta`` tensors) and specialized as the JIT specializes them (``sm90_resources.compile_like_jit``):
registers per thread, stack bytes (spills) and shared memory from the cubin. 255 registers means one program
of 8 warps per SM; at most 128, two. Compile-time facts, not timings (``gpu_ssd_sweep.py`` times the configs).

    python benchmarks/ssd_registers.py                         # the default launch
    python benchmarks/ssd_registers.py default scan_2h lowp    # named configs
    python benchmarks/ssd_registers.py --all                   # every config
    PYTHONPATH=/path/to/triton-3.6:$PWD:$PWD/benchmarks python benchmarks/ssd_registers.py   # the device's Triton
"""

from __future__ import annotations

import argparse

import torch
import triton
from sm90_resources import capture_launches, compile_like_jit, resource_usage

from ssmkit.ops.ssd import triton_bwd, triton_fwd
from ssmkit.ops.ssd.inputs import SSDInputs
from ssmkit.ops.ssd.launch import CONFIGS, SSDLaunch
from ssmkit.ops.ssd.triton import ssd_triton

BATCH, HEADS, HEADDIM, GROUPS, STATE, CHUNK = 8, 32, 64, 1, 128, 256


def launches(launch: SSDLaunch, length: int) -> list[tuple[str, object, tuple, dict]]:
    """The kernel launches of one forward and one backward at the benchmark's call, on meta tensors."""
    def leaf(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=True)

    def run() -> None:
        b, l, h = BATCH, length, HEADS
        inputs = SSDInputs(
            x=leaf(b, l, h, HEADDIM), dt=leaf(b, l, h), A=leaf(h, dtype=torch.float32),
            B=leaf(b, l, GROUPS, STATE), C=leaf(b, l, GROUPS, STATE), chunk_size=CHUNK,
            D=leaf(h, dtype=torch.float32), z=None, dt_bias=leaf(h, dtype=torch.float32), initial_states=None,
            seq_idx=None, cu_seqlens=None, dt_softplus=True, dt_limit=(0.0, float("inf")), input_scale=None,
            device=torch.device("meta"),
        )
        out, _final, _ = ssd_triton(inputs, launch)
        out.backward(torch.empty_like(out))

    return capture_launches((triton_fwd, triton_bwd), run)


def report(name: str, length: int) -> None:
    print(f"{name}: {CONFIGS[name].overrides() or 'the defaults'}")
    seen = set()
    for kernel, grid, args, kwargs in launches(CONFIGS[name], length):
        compiled = compile_like_jit(getattr(triton_fwd, kernel, None) or getattr(triton_bwd, kernel), args, kwargs)
        regs, spilled = resource_usage(compiled)
        row = (f"  {kernel:<18} grid {str(grid):<16} warps {kwargs.get('num_warps', 4)} stages "
               f"{kwargs.get('num_stages', 3)}: registers {regs:>3}, spilled {spilled:>4} B, shared "
               f"{compiled.metadata.shared:>6} B")
        if row not in seen:  # the backward's recompute repeats the forward's launches
            seen.add(row)
            print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", default=["default"], help="names of ssmkit.ops.ssd.launch.CONFIGS")
    parser.add_argument("--all", action="store_true", help="every named config")
    parser.add_argument("--length", type=int, default=8192)
    args = parser.parse_args()
    names = list(CONFIGS) if args.all else args.configs
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    print(f"Triton {triton.__version__}, sm_90; b {BATCH}, L {args.length}, {HEADS} heads x {HEADDIM}, N {STATE}, "
          f"{GROUPS} group, chunk {CHUNK}, bf16")
    for name in names:
        report(name, args.length)


if __name__ == "__main__":
    main()
