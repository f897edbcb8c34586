"""Registers, spills and global loads of the causal conv backward kernels, compiled for sm_90 without a GPU.

    python benchmarks/conv_registers.py

For each kernel (``generic``: any width; ``shifted``: widths <= 4, each shifted tile loaded once) and tile
(BLOCK_L x BLOCK_D, warps), at width 4 with bias and SiLU in bf16: registers per thread and spilled bytes
(``cuobjdump --dump-resource-usage`` of the cubin) and the ``ld.global`` instructions in the PTX, without and
with documents (seq_idx) and initial states. Compile-time facts, not timings: the timings are
``gpu_conv_norm.py --conv-sweep`` on the device.
"""

from __future__ import annotations

import re

import triton
import triton.language as tl
from sm90_resources import compile_sm90, resource_usage

from ssmkit.ops.causal_conv1d.triton_backward import _conv_bwd_kernel

TILES = ((16, 128, 4), (16, 128, 8), (16, 64, 4), (128, 16, 4), (128, 16, 8))  # the layouts' defaults first


def resources(shifted: bool, block_l: int, block_d: int, warps: int, docs_and_init: bool) -> str:
    consts = {"W": 4, "HAS_BIAS": True, "HAS_INIT": docs_and_init, "HAS_SEQ": docs_and_init, "SILU": True,
              "NEED_DINIT": docs_and_init, "ACC": tl.float32, "BLOCK_L": block_l, "BLOCK_D": block_d, "BLOCK_W": 8, "SHIFTED": shifted}
    signature = {}
    fn = _conv_bwd_kernel
    for arg in fn.arg_names:
        if arg in consts:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32" if arg == "dwb_ptr" else "*i32" if arg == "seq_ptr" else "*bf16"
        else:
            signature[arg] = "i32"
    kernel = compile_sm90(fn, signature, consts, {"num_warps": warps, "num_stages": 2})
    regs, spilled = resource_usage(kernel)
    loads = len(re.findall(r"ld\.global", kernel.asm["ptx"]))
    return f"{regs:>4} {spilled:>6} {loads:>6}"


def main() -> None:
    print(f"Triton {triton.__version__}, sm_90")
    print(f"{'kernel':<8} {'tile':>7} {'warps':>5} | {'regs':>4} {'spill':>6} {'loads':>6} | with seq_idx + init:"
          f" {'regs':>4} {'spill':>6} {'loads':>6}")
    for name, shifted in (("generic", False), ("shifted", True)):
        for block_l, block_d, warps in TILES:
            plain = resources(shifted, block_l, block_d, warps, False)
            docs = resources(shifted, block_l, block_d, warps, True)
            print(f"{name:<8} {block_l:>3}x{block_d:<3} {warps:>5} | {plain} | {' ' * 20}{docs}", flush=True)


if __name__ == "__main__":
    main()
