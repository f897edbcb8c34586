"""Registers and spills of the Triton selective-scan kernels on sm_90, compiled without a GPU.

    python benchmarks/scan_registers.py            # the time-wise candidates beside the current kernels
    python benchmarks/scan_registers.py --ttgir tw2048_d1_w8   # also dump that config's TTGIR to /tmp

For each launch config (the time-wise ``TIMEWISE_CANDIDATES``, ``TRAINING_CONFIG``, ``DEFAULT_CONFIG``):
registers per thread and spilled stack bytes (``cuobjdump --dump-resource-usage`` of the cubin) of the
forward and backward kernels at the benchmark's call (bf16 u/delta/z/B/C, float32 A/D/bias, N 16, softplus,
D, z, bias; no documents or initial states), warps an SM can hold (65,536 registers) and the warp shuffles in
the PTX (``shfl.sync``; a reverse scan across lanes costs Triton 3.6 five per operand register, 3.9 one).
Compile-time facts, not timings: the timings are ``gpu_selective_scan.py --sweep`` on the device.
"""

from __future__ import annotations

import argparse
import re

import triton
import triton.language as tl
from sm90_resources import compile_sm90, resource_usage

from ssmkit.ops.selective_scan import triton as scan_triton
from ssmkit.ops.selective_scan.triton_fused import _fused_bwd_kernel, _fused_fwd_kernel
from ssmkit.ops.selective_scan.triton_kernels import (
    _selective_scan_bwd_kernel,
    _selective_scan_fwd_kernel,
)
from ssmkit.ops.selective_scan.triton_timewise import _tw_bwd_kernel, _tw_fwd_kernel

N = 16
FP32_ARGS = {"A_ptr", "D_ptr", "bias_ptr", "h0_ptr", "dB_ptr", "dC_ptr", "dA_ptr", "dD_ptr", "dbias_ptr", "dh_ptr",
             "last_ptr"}
# Strides along time of (b, d, l) tensors and B/C rows: 1 at the benchmark's (contiguous) call.
UNIT_STRIDES = {"s_ul", "s_dl", "s_zl", "s_ol", "s_yl", "s_gl", "s_Bl", "s_Cl", "s_sl", "s_dul", "s_ddl", "s_dzl"}


def _kernels(cfg: scan_triton.ScanConfig):
    if cfg.timewise:
        # The benchmark's lengths are multiples of every candidate's tile.
        return (_tw_fwd_kernel, {}), (_tw_bwd_kernel, {"EVEN_T": True, "RUN": scan_triton._timewise_run(cfg.chunk, cfg.bwd_block_d, cfg.bwd_warps, 2)})
    if cfg.fused_states:
        return (_fused_fwd_kernel, {"BLOCK_N": N, "CK": cfg.chunk}), (_fused_bwd_kernel, {"BLOCK_N": N})
    return (_selective_scan_fwd_kernel, {}), (_selective_scan_bwd_kernel, {})


def compile_one(fn, shape: dict, block_d: int, tile: int, warps: int, backward: bool, docs: bool):
    """The kernel as the JIT specializes it at the benchmark's contiguous call: unit time strides become
    constants (Triton specializes integer arguments equal to 1) and the other integers and the pointers
    are known multiples of 16 (tt.divisibility). Without that, nothing is known contiguous along time and
    the tiles get one step a thread (no vector loads, the scan across lanes for every step)."""
    flags = {"HAS_D": True, "HAS_Z": True, "HAS_BIAS": True, "HAS_SEQ": docs, "SOFTPLUS": True, "ACC": tl.float32,
             "BLOCK_D": block_d, "T": tile, **shape}
    if "HAS_H0" in fn.arg_names:
        flags["HAS_H0"] = docs
    flags.update({arg: 1 for arg in fn.arg_names if arg in UNIT_STRIDES})
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in flags:
            signature[arg] = "constexpr"
            continue
        if arg == "seq_ptr":
            signature[arg] = "*i64"
        elif arg == "ckpt_ptr":
            signature[arg] = "*bf16" if shape.get("BLOCK_N") and backward else "*fp32"
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32" if arg in FP32_ARGS else "*bf16"
        else:
            signature[arg] = "i32"
        attrs[(i,)] = [["tt.divisibility", 16]]
    return compile_sm90(fn, signature, flags, {"num_warps": warps, "num_stages": 1}, attrs)


def row(name: str, cfg: scan_triton.ScanConfig, docs: bool) -> str:
    (fwd, fshape), (bwd, bshape) = _kernels(cfg)
    fwd_warps, bwd_warps = cfg.fwd_warps, cfg.bwd_warps
    if cfg.fused_states:
        fwd_warps = scan_triton._fused_warps(fwd_warps, cfg.fwd_block_d, N)
        bwd_warps = scan_triton._fused_warps(bwd_warps, cfg.bwd_block_d, N)
    cells = []
    for fn, shape, block_d, tile, warps, backward in (
        (fwd, fshape, cfg.fwd_block_d, cfg.fwd_chunk or cfg.chunk, fwd_warps, False),
        (bwd, bshape, cfg.bwd_block_d, cfg.chunk, bwd_warps, True),
    ):
        kernel = compile_one(fn, shape, block_d, tile, warps, backward, docs)
        regs, spilled = resource_usage(kernel)
        per_sm = min(64, 65536 // (max(regs, 1) * 32 * warps) * warps)
        shuffles = len(re.findall(r"shfl\.sync", kernel.asm["ptx"]))
        cells.append(f"{tile:>5} {block_d:>3} {warps:>2} {regs:>4} {spilled:>5} {per_sm:>4} {shuffles:>4}")
    return f"{name:<16} | " + " | ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", action="store_true", help="with documents (seq_idx) and initial states")
    parser.add_argument("--ttgir", metavar="NAME", help="write this config's TTGIR to /tmp")
    args = parser.parse_args()
    configs = {**scan_triton.TIMEWISE_CANDIDATES, "training": scan_triton.TRAINING_CONFIG,
               "default": scan_triton.DEFAULT_CONFIG}
    print(f"Triton {triton.__version__}, sm_90, bf16, N {N}{', seq_idx + h0' if args.docs else ''}")
    head = f"{'tile':>5} {'bd':>3} {'w':>2} {'regs':>4} {'spill':>5} {'w/SM':>4} {'shfl':>4}"
    print(f"{'config':<16} | {'forward':<{len(head)}} | backward")
    print(f"{'':<16} | {head} | {head}")
    for name, cfg in configs.items():
        print(row(name, cfg, args.docs), flush=True)
    if args.ttgir:
        cfg = configs[args.ttgir]
        (fwd, fshape), (bwd, bshape) = _kernels(cfg)
        for fn, shape, tag, block_d, warps, backward in (
            (fwd, fshape, "fwd", cfg.fwd_block_d, cfg.fwd_warps, False),
            (bwd, bshape, "bwd", cfg.bwd_block_d, cfg.bwd_warps, True),
        ):
            kernel = compile_one(fn, shape, block_d, cfg.fwd_chunk or cfg.chunk if not backward else cfg.chunk, warps,
                                 backward, args.docs)
            path = f"/tmp/scan_{args.ttgir}_{tag}_triton{triton.__version__}.ttgir"
            with open(path, "w") as f:
                f.write(kernel.asm["ttgir"])
            convs = len(re.findall(r"convert_layout", kernel.asm["ttgir"]))
            print(f"{tag}: {path} ({convs} convert_layout)")


if __name__ == "__main__":
    main()
