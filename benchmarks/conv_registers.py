"""Registers, spills and global loads of the causal conv backward kernels, compiled for sm_90 without a GPU.

    python benchmarks/conv_registers.py
    PYTHONPATH=/path/to/triton-3.6:$PWD:$PWD/benchmarks python benchmarks/conv_registers.py   # the device's Triton

For each kernel (``generic``: any width; ``shifted``: widths <= 4, each shifted tile loaded once), layout and
tile (BLOCK_L x BLOCK_D, warps), at the benchmark's shape (8, 4096, 8192), width 4 with bias and SiLU in bf16:
registers per thread and spilled bytes (``cuobjdump --dump-resource-usage`` of the cubin) and the ``ld.global``
instructions in the PTX, without and with documents (seq_idx) and initial states. The kernel is compiled from
the launcher's own arguments, specialized as the JIT specializes them (``sm90_resources.compile_like_jit``:
the unit stride of each layout a constant, multiples of 16 marked), on ``meta`` tensors. Compile-time facts,
not timings: the timings are ``gpu_conv_norm.py --conv-sweep`` on the device.
"""

from __future__ import annotations

import re

import torch
import triton
from sm90_resources import LaunchCapture, compile_like_jit, resource_usage

from ssmkit.ops.causal_conv1d import triton_backward
from ssmkit.ops.causal_conv1d.triton_backward import BackwardLaunch

BATCH, DIM, LENGTH, WIDTH = 8, 4096, 8192, 4
# (layout, BLOCK_L, BLOCK_D, warps): each layout's default tile first.
TILES = (("last", 32, 32, 4), ("last", 16, 128, 4), ("last", 16, 128, 8), ("last", 16, 64, 4),
         ("last", 32, 64, 4), ("last", 64, 32, 4), ("last", 64, 64, 8), ("last", 32, 32, 2), ("last", 16, 32, 2),
         ("first", 64, 16, 4), ("first", 128, 16, 4), ("first", 128, 16, 8), ("first", 64, 32, 4),
         ("first", 32, 16, 2), ("first", 128, 32, 8))


def _inputs(layout: str, docs_and_init: bool) -> dict:
    """The backward's arguments on meta tensors: (b, d, l) views, channel-last ones d-contiguous."""
    def act():
        if layout == "last":
            return torch.empty(BATCH, LENGTH, DIM, dtype=torch.bfloat16, device="meta").transpose(1, 2)
        return torch.empty(BATCH, DIM, LENGTH, dtype=torch.bfloat16, device="meta")

    meta = {"dtype": torch.bfloat16, "device": "meta"}
    return {
        "x": act(), "weight": torch.empty(DIM, WIDTH, **meta), "bias": torch.empty(DIM, **meta),
        "init": torch.empty(BATCH, DIM, WIDTH - 1, **meta) if docs_and_init else None,
        "seq_idx": torch.empty(BATCH, LENGTH, dtype=torch.int32, device="meta") if docs_and_init else None,
        "silu": True, "dout": act(), "need_dinit": docs_and_init,
    }


def resources(kernel: str, layout: str, block_l: int, block_d: int, warps: int, docs_and_init: bool) -> str:
    capture = LaunchCapture(triton_backward._conv_bwd_kernel)
    triton_backward._conv_bwd_kernel = capture
    try:
        triton_backward.backward(**_inputs(layout, docs_and_init),
                                 launch=BackwardLaunch(kernel, block_l, block_d, warps))
    finally:
        triton_backward._conv_bwd_kernel = capture.fn
    (_grid, args, kwargs), = capture.launches
    compiled = compile_like_jit(capture.fn, args, kwargs)
    regs, spilled = resource_usage(compiled)
    loads = len(re.findall(r"ld\.global", compiled.asm["ptx"]))
    return f"{regs:>4} {spilled:>6} {loads:>6}"


def main() -> None:
    print(f"Triton {triton.__version__}, sm_90, ({BATCH}, {DIM}, {LENGTH}), width {WIDTH}, bf16, bias, SiLU")
    print(f"{'kernel':<8} {'layout':<6} {'tile':>7} {'warps':>5} | {'regs':>4} {'spill':>6} {'loads':>6} |"
          f" with seq_idx + init: {'regs':>4} {'spill':>6} {'loads':>6}")
    for kernel in ("generic", "shifted"):
        for layout, block_l, block_d, warps in TILES:
            plain = resources(kernel, layout, block_l, block_d, warps, False)
            docs = resources(kernel, layout, block_l, block_d, warps, True)
            print(f"{kernel:<8} {layout:<6} {block_l:>3}x{block_d:<3} {warps:>5} | {plain} | {' ' * 20}{docs}",
                  flush=True)


if __name__ == "__main__":
    main()
