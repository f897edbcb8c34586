"""Registers and spills of the Mamba-3 SSD route's glue kernels, compiled for sm_90 without a GPU.

    python benchmarks/mamba3_registers.py
    PYTHONPATH=/tmp/t36:$PWD:$PWD/benchmarks python benchmarks/mamba3_registers.py   # the device's Triton

At the layer's shape (N 128, 64 rotary angles, bf16 B, C and operands): the rotation kernels
(``triton_rotary.py``: forward, backward, and with the B/C RMS norms folded in, ``NORM``), the step-weight
kernels (``triton_step_sizes.py``: from Δ and A, and from the projection's raw dd_dt / dd_A, ``RAW``) and the
angle kernels. Registers per thread and spilled bytes of each (``cuobjdump --dump-resource-usage``): compile-time
facts, not timings (``gpu_mamba3.py`` times the layer on the device).
"""

from __future__ import annotations

import triton
import triton.language as tl
from sm90_resources import compile_sm90, resource_usage

from ssmkit.ops.mamba3 import (
    triton_angles,
    triton_pairs,
    triton_rotary,
    triton_step_sizes,
)

N, A = 128, 64


def _signature(fn, consts: dict, floats: tuple[str, ...] = (), ints: tuple[str, ...] = ()) -> dict[str, str]:
    """Pointers: int32 for ``ints`` (document starts), float32 for ``floats``, else bf16; other arguments i32
    (``A_floor`` and the eps values fp32)."""
    signature = {}
    for arg in fn.arg_names:
        if arg in consts:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*i32" if arg in ints else "*fp32" if arg in floats else "*bf16"
        else:
            signature[arg] = "fp32" if arg in ("A_floor", "eps_B", "eps_C") else "i32"
    return signature


def compiled(fn, consts: dict, warps: int, floats: tuple[str, ...] = (), ints: tuple[str, ...] = (),
             stages: int = 2) -> str:
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    kernel = compile_sm90(fn, _signature(fn, consts, floats, ints), consts, {"num_warps": warps, "num_stages": stages})
    regs, spilled = resource_usage(kernel)
    return f"{regs:>4} {spilled:>6}"


def kernels() -> list[tuple[str, object, dict, int, tuple[str, ...], tuple[str, ...]]]:
    """(name, kernel, constexprs, warps, float32 pointers, int32 pointers) of each variant compiled."""
    rot = {"N": N, "HALF": N // 2, "INTERLEAVED": True}
    rot_floats = ("Bb_ptr", "Cb_ptr", "theta_ptr", "cb_ptr", "dcb_ptr", "dBb_ptr", "dCb_ptr", "dtheta_ptr",
                  "wB_ptr", "wC_ptr")
    table = [
        ("rotate fwd", triton_rotary._rotate_bc_fwd, rot | {"ROWS": triton_rotary._FWD_ROWS, "NORM": False},
         triton_rotary._FWD_WARPS, rot_floats, ()),
        ("rotate bwd", triton_rotary._rotate_bc_bwd,
         rot | {"ROWS": triton_rotary._ROWS, "HAS_DCB": True, "OUT_DTYPE": tl.bfloat16,
                "STAGES": triton_rotary._STAGES, "NORM": False, "FINISH": False},
         triton_rotary._WARPS, rot_floats, ()),
    ]
    if "NORM" in triton_rotary._rotate_bc_fwd.arg_names:
        table += [
            ("rotate fwd, norm", triton_rotary._rotate_bc_fwd,
             rot | {"ROWS": triton_rotary._FWD_ROWS, "NORM": True}, triton_rotary._NORM_FWD_WARPS, rot_floats, ()),
            ("rotate bwd, norm", triton_rotary._rotate_bc_bwd,
             rot | {"ROWS": triton_rotary._ROWS, "HAS_DCB": True, "OUT_DTYPE": tl.bfloat16,
                    "STAGES": triton_rotary._STAGES, "NORM": True, "FINISH": True},
             triton_rotary._NORM_WARPS, rot_floats + ("dB_ptr", "dC_ptr"), ()),
            ("rotate bwd, norm, split", triton_rotary._rotate_bc_bwd,
             rot | {"ROWS": triton_rotary._ROWS, "HAS_DCB": True, "OUT_DTYPE": tl.bfloat16,
                    "STAGES": triton_rotary._STAGES, "NORM": True, "FINISH": False},
             triton_rotary._NORM_WARPS, rot_floats + ("dB_ptr", "dC_ptr"), ()),
            ("norm finish bwd", triton_pairs.norm_bc_bwd, rot | {"ROWS": triton_rotary._ROWS},
             triton_rotary._WARPS, rot_floats + ("dBn_ptr", "dCn_ptr"), ()),
        ]
    sw_floats = ("dt_ptr", "a_ptr", "sdt_ptr", "w_ptr", "nxt_ptr", "g_sdt_ptr", "g_w_ptr", "g_nxt_ptr",
                 "ddt_in_ptr", "ddt_ptr", "da_ptr", "bias_ptr", "dt_out_ptr", "draw_ptr")
    block = {"BLOCK": triton_step_sizes._BLOCK, "HAS_DOC": True, "NCB": 4, "HEAVY_TAIL": True}
    dd_floats = ("bias_ptr", "dt_ptr", "a_ptr", "gdt_ptr", "ga_ptr", "draw_ptr")
    table += [
        ("dt decay fwd", triton_step_sizes._dt_decay_fwd, block, 4, dd_floats, ()),
        ("dt decay bwd", triton_step_sizes._dt_decay_bwd, block, 4, dd_floats, ()),
        ("step weights fwd", triton_step_sizes._step_weights_fwd, block | {"RAW": False}, 4, sw_floats,
         ("starts_ptr",)),
        ("step weights bwd", triton_step_sizes._step_weights_bwd, block | {"RAW": False}, 4, sw_floats,
         ("starts_ptr",)),
    ]
    if "RAW" in triton_step_sizes._step_weights_fwd.arg_names:
        raw_floats = tuple(f for f in sw_floats if f not in ("dt_ptr", "a_ptr", "ddt_ptr", "da_ptr"))
        table += [
            ("step weights fwd, raw", triton_step_sizes._step_weights_fwd, block | {"RAW": True}, 4, raw_floats,
             ("starts_ptr",)),
            ("step weights bwd, raw", triton_step_sizes._step_weights_bwd, block | {"RAW": True}, 4, raw_floats,
             ("starts_ptr",)),
        ]
    ang = {"BA": triton_angles._COLS, "BL": triton_angles._BLOCK, "HAS_DOC": True, "HAS_INIT": True}
    ang_floats = ("dt_ptr", "init_ptr", "theta_ptr", "dtheta_ptr", "ddt_ptr", "dinit_ptr")
    table += [
        ("angles fwd", triton_angles._angles_fwd, ang, 4, ang_floats, ("starts_ptr",)),
        ("angles bwd", triton_angles._angles_bwd, ang, 4, ang_floats, ("starts_ptr",)),
    ]
    return table


def main() -> None:
    print(f"Triton {triton.__version__}, sm_90, N {N}, {A} angles, bf16")
    print(f"{'kernel':<24} {'warps':>5} | {'regs':>4} {'spill':>6}")
    for name, fn, consts, warps, floats, ints in kernels():
        print(f"{name:<24} {warps:>5} | {compiled(fn, consts, warps, floats, ints)}", flush=True)


if __name__ == "__main__":
    main()
