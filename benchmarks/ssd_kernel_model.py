"""A model of the SSD Triton kernels' work at ``gpu_ssd.py``'s shape: per kernel of one forward+backward, the HBM bytes
it must move, the bytes its programs read again from L2, tensor FLOPs and exps, from the shapes and a launch's
tiles. No GPU needed; ``gpu_ssd_sweep.py`` prints it (``--model``) and divides measured kernel times by it.
"""

from __future__ import annotations

from gpu_ssd import BATCH, CHUNK, GROUPS, HEADDIM, HEADS, STATE

from ssmkit.ops.ssd import SSDLaunch
from ssmkit.ops.ssd.launch import DEFAULT_LAUNCH


def kernel_model(length: int, launch: SSDLaunch = DEFAULT_LAUNCH) -> dict[str, tuple[float, float, float, float]]:
    """Per kernel of one forward+backward: (HBM bytes it must move, bytes its programs re-read from L2, tensor FLOPs,
    exps), from the shapes and the launch's tiles (bf16 inputs, prev/dstates bf16, cb/dcb float32 unless *_lowp);
    with ``recompute_states`` the chunk-state and C Bᵀ kernels count twice (the backward runs them again)."""
    b, h, p, n, g = BATCH, HEADS, HEADDIM, STATE, GROUPS
    T = min(CHUNK, 1 << (length - 1).bit_length())
    nc = -(-length // T)
    bm_fwd = min(T, launch.fwd_tile)
    bm = min(bm_fwd, launch.bwd_tile)
    e = 2
    rows = b * length
    ch, cg = b * nc * h, b * nc * g  # chunk-heads, chunk-groups
    k_fwd, k = (T // bm_fwd) * (T // bm_fwd + 1) // 2, (T // bm) * (T // bm + 1) // 2  # causal tile pairs a chunk
    x, bc, dt = rows * h * p * e, rows * g * n * e, rows * h * e
    st, vec = ch * p * n * e, b * h * nc * T * 4
    cb = cg * k_fwd * bm_fwd * bm_fwd * (e if launch.cb_lowp else 4)
    dcb = cg * k * bm * bm * (e if launch.dcb_lowp else 4)
    intra_f, intra = 2 * ch * k_fwd * bm_fwd * bm_fwd * p, 2 * ch * k * bm * bm * p  # (T, T) x p matmuls
    state_mm = 2 * ch * T * p * n
    two = 2 if launch.scan_heads == 2 and (h // g) % 2 == 0 else 1  # heads sharing a scan program's C, C Bᵀ
    runs = 2 if launch.recompute_states else 1
    return {
        "_chunk_state_fwd": tuple(runs * v for v in (dt + x + bc + 2 * vec + st + b * h * p * n * 4, rows * h * n * e,
                                                     state_mm, 2 * ch * T)),
        "_chunk_cb_fwd": tuple(runs * v for v in (2 * bc + cb, 2 * cg * k_fwd * bm_fwd * n * e,
                                                  2 * cg * k_fwd * bm_fwd * bm_fwd * n, 0)),
        "_chunk_scan_fwd": (2 * x + bc + cb + st + 2 * vec,
                            ch * k_fwd * bm_fwd * (p * e + bm_fwd * (e if launch.cb_lowp else 4) // two)
                            + ch * T * n * e // two + ch * (T // bm_fwd) * p * n * e, state_mm + intra_f,
                            ch * k_fwd * bm_fwd * bm_fwd),
        "_state_pass_bwd": (x + bc + 2 * st + vec, ch * T * n * e, state_mm, ch * T),
        "_bwd_rows": (2 * x + cb + 2 * vec + dcb + x + st + 2 * bc + dcb,
                      2 * ch * k * bm * p * e + ch * (T // bm) * p * n * e, intra + 2 * state_mm
                      + 2 * cg * k * bm * bm * n, ch * k * bm * bm),
        "_bwd_cols": (2 * x + 2 * bc + cb + dcb + st + 3 * vec + x + bc,
                      ch * k * bm * (p * e + bm * (e if launch.cb_lowp else 4)) + ch * (T // bm) * p * n * e,
                      intra + 2 * state_mm + 2 * cg * k * bm * bm * n, ch * k * bm * bm),
        "_bwd_dt": (2 * dt + 4 * vec, 0, 0, ch * T),
    }


def print_model(lengths: list[int]) -> None:
    print("kernel model, default launch (HBM: bytes each kernel must move; L2: tiles its programs read again):")
    for length in lengths:
        model = kernel_model(length)
        print(f"  L {length}: {'kernel':<18} {'HBM MB':>8} {'L2 MB':>8} {'GFLOP':>7} {'M exp':>7}")
        for name, (hbm, l2, flops, exps) in model.items():
            print(f"  {'':>{len(str(length)) + 3}} {name:<18} {hbm / 1e6:>8.0f} {l2 / 1e6:>8.0f} {flops / 1e9:>7.1f}"
                  f" {exps / 1e6:>7.0f}")
        total = [sum(v[i] for v in model.values()) for i in range(4)]
        print(f"  {'':>{len(str(length)) + 3}} {'total':<18} {total[0] / 1e6:>8.0f} {total[1] / 1e6:>8.0f}"
              f" {total[2] / 1e9:>7.1f} {total[3] / 1e6:>7.0f}")
