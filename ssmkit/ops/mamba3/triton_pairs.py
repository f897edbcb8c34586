"""Device helpers over (rows, pairs) tiles of B and C rows for the rotation kernels (``triton_rotary.py``): the
pair columns, pair loads and stores, and the RMS norm B and C pass on the layer's folded route (``NORM``), forward
and back; and the norm's backward kernel for when the rotation backward splits a group's heads over programs.

The norm of a row v (its group's n entries): x̂ = v / rms(v), rms(v) = sqrt(mean(v²) + eps), out = x̂ · w, in
float32. Back: dv = (ĝ - x̂ mean(ĝ x̂)) / rms(v) with ĝ = g · w, and dw = Σ_rows g x̂.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pair_cols(pair, N: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Columns of the first and second entry of each pair."""
    first = pair * 2 if INTERLEAVED else pair
    second = first + 1 if INTERLEAVED else first + N // 2
    return first, second


@triton.jit
def load_pair(ptr, rows, stride, f, s, mask):
    """(rows, pairs) float32 tiles of the first and second entries of each pair."""
    base = ptr + rows[:, None] * stride
    return (tl.load(base + f[None, :], mask=mask, other=0.0).to(tl.float32),
            tl.load(base + s[None, :], mask=mask, other=0.0).to(tl.float32))


@triton.jit
def store_pair(ptr, rows, stride, f, s, v0, v1, mask):
    base = ptr + rows[:, None] * stride
    tl.store(base + f[None, :], v0.to(ptr.dtype.element_ty), mask=mask)
    tl.store(base + s[None, :], v1.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_weights(w_ptr, f, s, pmask):
    return (tl.load(w_ptr + f, mask=pmask, other=0.0).to(tl.float32),
            tl.load(w_ptr + s, mask=pmask, other=0.0).to(tl.float32))


@triton.jit
def _rstd(v0, v1, eps, N: tl.constexpr):
    """1 / rms per row (rows,) of pair tiles (padding entries are 0)."""
    return 1.0 / tl.sqrt((tl.sum(v0 * v0, 1) + tl.sum(v1 * v1, 1)) / N + eps)


@triton.jit
def normed(v0, v1, w_ptr, eps, f, s, pmask, N: tl.constexpr):
    """Pair tiles of rows through the RMS norm: v / rms(v) · w."""
    w0, w1 = _norm_weights(w_ptr, f, s, pmask)
    r = _rstd(v0, v1, eps, N)[:, None]
    return v0 * r * w0[None, :], v1 * r * w1[None, :]


@triton.jit
def _norm_back(g0, g1, x0, x1, r, w0, w1, N: tl.constexpr):
    """Back through v -> x̂ · w, x̂ = v · r (r = 1 / rms(v)): dv = r (ĝ - x̂ mean(ĝ x̂)), ĝ = g · w, for (rows, pairs)
    tiles of the output's gradient g and of x̂; and this tile's share of w's gradient, Σ_rows g x̂ (pairs,)."""
    gw0, gw1 = g0 * w0[None, :], g1 * w1[None, :]
    m = ((tl.sum(gw0 * x0, 1) + tl.sum(gw1 * x1, 1)) / N)[:, None]
    return (r[:, None] * (gw0 - x0 * m), r[:, None] * (gw1 - x1 * m),
            tl.sum(g0 * x0, 0), tl.sum(g1 * x1, 0))


@triton.jit
def norm_finish(v_ptr, s_v, w_ptr, eps, g0, g1, dv_ptr, dw_ptr, blk, gg, rows, f, s, mask, pmask, G, H, PB,
                N: tl.constexpr):
    """From the normalised rows' gradient (g0, g1): the raw rows' (stored at dv_ptr, (R, G, N)) and this block's
    partial of the norm weight's gradient (row H + gg of its block in the bias partials' buffer)."""
    x0, x1 = load_pair(v_ptr + gg * N, rows, s_v, f, s, mask)
    r = _rstd(x0, x1, eps, N)
    w0, w1 = _norm_weights(w_ptr, f, s, pmask)
    d0, d1, dw0, dw1 = _norm_back(g0, g1, x0 * r[:, None], x1 * r[:, None], r, w0, w1, N)
    store_pair(dv_ptr + gg * N, rows, G * N, f, s, d0, d1, mask)
    tl.store(dw_ptr + (blk * PB + H + gg) * N + f, dw0, mask=pmask)
    tl.store(dw_ptr + (blk * PB + H + gg) * N + s, dw1, mask=pmask)


@triton.jit(do_not_specialize=["R"])
def norm_bc_bwd(
    B_ptr, C_ptr, wB_ptr, wC_ptr, dBn_ptr, dCn_ptr, dB_ptr, dC_ptr, dwB_ptr, dwC_ptr,
    R, G, H, SPLIT, PB, s_B, s_C, eps_B, eps_C,
    N: tl.constexpr, HALF: tl.constexpr, ROWS: tl.constexpr,
):
    """NORM with a group's heads split over SPLIT programs: the normalised B's and C's gradient partials
    (SPLIT, R, G, N) float32 summed and taken back through the norm, as the rotation kernel's epilogue does."""
    blk = tl.program_id(0).to(tl.int64)
    gg = tl.program_id(1).to(tl.int64)
    rows = blk * ROWS + tl.arange(0, ROWS)
    pair = tl.arange(0, HALF)
    pmask = pair < N // 2
    mask = (rows < R)[:, None] & pmask[None, :]
    f, s = pair_cols(pair, N, False)
    for which in tl.static_range(2):
        dn_ptr = dBn_ptr if which == 0 else dCn_ptr
        g0 = tl.zeros((ROWS, HALF), dtype=tl.float32)
        g1 = tl.zeros((ROWS, HALF), dtype=tl.float32)
        for sp in range(SPLIT):
            p0, p1 = load_pair(dn_ptr + (sp * R * G + gg) * N, rows, G * N, f, s, mask)
            g0 += p0
            g1 += p1
        if which == 0:
            norm_finish(B_ptr, s_B, wB_ptr, eps_B, g0, g1, dB_ptr, dwB_ptr, blk, gg, rows, f, s, mask, pmask, G, H,
                        PB, N)
        else:
            norm_finish(C_ptr, s_C, wC_ptr, eps_C, g0, g1, dC_ptr, dwC_ptr, blk, gg, rows, f, s, mask, pmask, G, H,
                        PB, N)
