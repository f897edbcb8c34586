"""Registers and spills of the Triton SSD kernels on sm_90, without a GPU.

Compiles each kernel for an H100/H200 target (bf16, p 64, n 128, chunk 256, D and dt_bias, no z or
seq_idx: the benchmark's call) and prints what the cubin's resource table says: registers per thread,
stack bytes (spills) and shared memory. 255 registers means one program of 8 warps per SM; at most
128, two. Used to choose the launch configs in ``ssmkit/ops/ssd/triton.py`` before timing them.

    python benchmarks/ssd_registers.py                     # every kernel at its default launch
    python benchmarks/ssd_registers.py scan:64:8:2:128     # kernel:tile:warps:stages[:maxnreg]
    python benchmarks/ssd_registers.py rows:64:8:3:h2      # ...[:hN]: N pipeline stages of the head loop
    python benchmarks/ssd_registers.py --lowp cols:64:8:1  # C Bᵀ and its gradient in bf16 (SSDLaunch.*_lowp)
"""

from __future__ import annotations

import sys

import triton.language as tl
from ssmkit.ops.ssd import triton_bwd, triton_fwd

from sm90_resources import compile_sm90, resource_usage

BF16_ARGS = {"x_ptr", "z_ptr", "dt_ptr", "dout_ptr", "B_ptr", "C_ptr", "out_ptr", "ypre_ptr", "dx_ptr", "dz_ptr",
             "dB_ptr", "dC_ptr", "prev_ptr"}
SHAPE = {"P": 64, "N": 128, "T": 256, "BP": 64, "DOT": tl.bfloat16, "PREC": "tf32"}
FLAGS = {"HAS_Z": False, "HAS_D": True, "HAS_DOC": False, "HAS_BIAS": True, "SOFTPLUS": True, "HAS_LIMIT": False,
         "STORE_YPRE": False, "HAS_DFINAL": False, "HAS_DPREV": False, "CHAIN": False, "HAS_INIT": False, "FENCE": True,
         "HEAD_STAGES": None, "TWO_HEADS": False, "ONLINE": False}
# name -> (kernel, tile argument, other constexprs)
KERNELS = {
    "state": (triton_fwd._chunk_state_fwd, "BK", {"BN": 128}),
    "scan": (triton_fwd._chunk_scan_fwd, "BM", {"BN": 128}),
    "scan_2h": (triton_fwd._chunk_scan_fwd, "BM", {"BN": 128, "TWO_HEADS": True}),
    "state_bwd": (triton_bwd._state_pass_bwd, "BK", {"BN": 32}),
    "state_chain": (triton_fwd._chunk_state_fwd, "BK", {"BN": 128, "CHAIN": True}),
    "state_online": (triton_fwd._chunk_state_fwd, "BK", {"BN": 128, "CHAIN": True, "ONLINE": True}),
    "state_bwd_chain": (triton_bwd._state_pass_bwd, "BK", {"BN": 128, "CHAIN": True}),
    "rows": (triton_bwd._bwd_rows, "BM", {"BN": 128, "PART": 0}),
    "rows_state": (triton_bwd._bwd_rows, "BM", {"BN": 128, "PART": 1}),
    "cols": (triton_bwd._bwd_cols, "BK", {"BN": 128, "PART": 2}),
    "cols_dB": (triton_bwd._bwd_cols, "BK", {"BN": 128, "PART": 0}),
    "cols_rest": (triton_bwd._bwd_cols, "BK", {"BN": 128, "PART": 1}),
}
DEFAULTS = ["state:64:8:2", "state_chain:64:8:2", "scan:64:8:2", "state_bwd:64:8:3", "state_bwd_chain:64:8:2",
            "rows:64:8:3", "rows_state:64:8:2", "cols:64:8:1", "cols_dB:64:8:2", "cols_rest:64:8:1"]


def resources(name: str, tile: int, warps: int, stages: int, maxnreg: int | None, head_stages: int | None = None,
              lowp: bool = False) -> str:
    fn, tile_arg, extra = KERNELS[name]
    params = fn.arg_names
    constexprs = {k: v for k, v in {**SHAPE, **FLAGS, **extra, tile_arg: tile, "HEAD_STAGES": head_stages,
                                    "FLAT": head_stages is not None}.items() if k in params}
    low = BF16_ARGS | ({"cb_ptr", "dcb_ptr"} if lowp else set())
    signature = {}
    for arg in params:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*bf16" if arg in low else "*i32" if arg in ("doc_ptr", "sync_ptr") else "*fp32"
        else:
            signature[arg] = "fp32" if arg in ("lo", "hi") else "i32"
    options = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    kernel = compile_sm90(fn, signature, constexprs, options)
    regs, spilled = resource_usage(kernel)
    return f"registers {regs:>3}, spilled {spilled:>4} B, shared {kernel.metadata.shared:>6} B"


def main() -> None:
    args = sys.argv[1:]
    lowp = "--lowp" in args
    for spec in [a for a in args if a != "--lowp"] or DEFAULTS:
        name, tile, warps, stages, *rest = spec.split(":")
        cap = next((int(v) for v in rest if not v.startswith("h")), None)
        head = next((int(v[1:]) for v in rest if v.startswith("h")), None)
        found = resources(name, int(tile), int(warps), int(stages), cap, head, lowp)
        print(f"{spec + (' lowp' if lowp else ''):>27}: {found}", flush=True)


if __name__ == "__main__":
    main()
