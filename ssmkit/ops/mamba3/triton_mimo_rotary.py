"""Triton kernels of the MIMO route's B/C preparation: per-(head, rank) bias, rotation, rounding and the r×r scores.

MIMO (rank r) through the SSD op (``via_ssd.py``) needs, per position t, head and rank j, the rotated B̃_{t,j} and
C̃_{t,j} in the SSD op's operand dtype, laid out (b, l, r, h, n) — the (b, l·r, h, n) sequence of sub-steps the SSD
op reads, with no reshape copy — and the per-position scores of the r×r correction::

    B̃_{t,j} = R(θ_t) (B_{t,j} + B_bias_j),  C̃_{t,j} = R(θ_t) (C_{t,j} + C_bias_j)   (rounded to the operand dtype)
    S_{t,j,j'} = C̃_{t,j} · B̃_{t,j'}                                          (of the rounded values, float32)

In PyTorch that is the rank-expanded ``prepare`` / ``rotated_BC`` passes over float32 (b, l, r, h, n) tensors, the
casts and an einsum over (b, l, h, r, r) each way; here it is one kernel forward and one backward, reading B and C
once per group. The rank-1 kernels (``triton_rotary.py``) are this with r = 1 and the diagonal score only.

Layouts: B, C (b·l, r, g, n) with each rank's g·n entries contiguous, rows and ranks at any stride; biases (h, r, n)
float32; theta (b·l, h, a) float32; Bt, Ct (b·l, r, h, n); S (b·l, h, r, r) float32. Tiles are (positions, ranks,
pairs): the ranks padded to a power of two and masked. Pair i < a is (2i, 2i+1) when INTERLEAVED, else
(i, i + n/2); pairs past a pass unrotated. Interleaved rows are read and written whole and split in registers.

Forward: a program takes POS positions of one head, heads varying fastest (the programs of a group share B and C
rows in L2). Backward: a program walks a run of positions of one group (or a split of its heads) POS at a time and
loops over the heads, summing their B and C gradients in registers. The bias gradients sum the other way (over
positions): each program adds them into a (h, r, n) slot of its own, read back and rewritten once a block with a
barrier between blocks (L2 traffic), so the partials the caller sums are one slot per program, not one per
block of positions (at POS positions a block, per-block partials would write and read 4/POS times the gradient
bytes the kernel reads). The scores' gradient enters both operands through the rounding unchanged (straight
through), as the rank-1 kernel's C̃·B̃ does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ssmkit.ops._host import cdiv, next_power_of_2
from ssmkit.ops.mamba3.triton_pairs import pair_cols
from ssmkit.ops.mamba3.triton_rotary import _TL, _half, _split

# Positions per tile and warps (a tile is positions x padded ranks x pairs; rank 4, N 128: 4 x 4 x 64 forward, 2 x 4
# x 64 backward). The backward walks a run of positions per program, its bias gradients summed over the run, so the
# partials no longer grow with the positions (one (h, r, n) slot per program, not per block).
_FWD_POS = 4
_FWD_WARPS = 4
_POS = 2
_WARPS = 8
_STAGES = 2  # software pipelining of the backward's head loop
_RUN_PROGRAMS = 4 * 132  # backward: runs of positions per group (and head split) until about this many programs run


@triton.jit
def _load3(ptr, lp, rk, s_row, s_rank, mask2, N: tl.constexpr, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """(positions, ranks, pairs) float32 tiles of each pair's two entries, rows lp (int32, from ``ptr``) at stride
    s_row, ranks at s_rank; ``mask2`` (positions, ranks)."""
    base = ptr + (lp[:, None, None] * s_row + rk[None, :, None] * s_rank)
    if INTERLEAVED:
        cols = tl.arange(0, 2 * HALF)
        row = tl.load(base + cols[None, None, :], mask=mask2[:, :, None] & (cols < N)[None, None, :], other=0.0)
        first, second = tl.split(tl.reshape(row.to(tl.float32), (row.shape[0], row.shape[1], HALF, 2)))
        return first, second
    pair = tl.arange(0, HALF)
    mask = mask2[:, :, None] & (pair < N // 2)[None, None, :]
    return (tl.load(base + pair[None, None, :], mask=mask, other=0.0).to(tl.float32),
            tl.load(base + N // 2 + pair[None, None, :], mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _store3(ptr, lp, rk, s_row, s_rank, v0, v1, mask2, N: tl.constexpr, HALF: tl.constexpr,
            INTERLEAVED: tl.constexpr):
    """Store pair tiles as whole rows (the inverse of ``_load3``)."""
    base = ptr + (lp[:, None, None] * s_row + rk[None, :, None] * s_rank)
    if INTERLEAVED:
        cols = tl.arange(0, 2 * HALF)
        row = tl.reshape(tl.join(v0, v1), (v0.shape[0], v0.shape[1], 2 * HALF))
        tl.store(base + cols[None, None, :], row.to(ptr.dtype.element_ty),
                 mask=mask2[:, :, None] & (cols < N)[None, None, :])
    else:
        pair = tl.arange(0, HALF)
        mask = mask2[:, :, None] & (pair < N // 2)[None, None, :]
        tl.store(base + pair[None, None, :], v0.to(ptr.dtype.element_ty), mask=mask)
        tl.store(base + N // 2 + pair[None, None, :], v1.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _head_inputs(Bb_ptr, Cb_ptr, theta_ptr, start, lp, pm, rk, km, hh, H, A, RANK: tl.constexpr, N: tl.constexpr,
                 HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """One head's biases (1, ranks, pairs) and cos, sin of θ (positions, 1, pairs) at positions start + lp, θ's
    offsets from the block's first (positions, pairs), the mask of the rotated pairs; pairs past a get θ = 0."""
    pair = tl.arange(0, HALF)
    f, s = pair_cols(pair, N, INTERLEAVED)
    bmask = km[:, None] & (pair < N // 2)[None, :]
    boff = (hh * RANK + rk[:, None]) * N
    bb0 = tl.load(Bb_ptr + boff + f[None, :], mask=bmask, other=0.0)[None]
    bb1 = tl.load(Bb_ptr + boff + s[None, :], mask=bmask, other=0.0)[None]
    cc0 = tl.load(Cb_ptr + boff + f[None, :], mask=bmask, other=0.0)[None]
    cc1 = tl.load(Cb_ptr + boff + s[None, :], mask=bmask, other=0.0)[None]
    tmask = pm[:, None] & (pair < A)[None, :]
    toff = (start * H + hh) * A + (lp[:, None] * (H * A) + pair[None, :])
    th = tl.load(theta_ptr + toff, mask=tmask, other=0.0)
    return bb0, bb1, cc0, cc1, tl.cos(th)[:, None, :], tl.sin(th)[:, None, :], toff, tmask


@triton.jit
def _scores(c0, c1, b0, b1):
    """S[t, j, j'] = c_{t,j} · b_{t,j'} of (positions, ranks, pairs) tiles: (positions, ranks, ranks)."""
    return tl.sum(c0[:, :, None, :] * b0[:, None, :, :] + c1[:, :, None, :] * b1[:, None, :, :], 3)


@triton.jit
def _score_offsets(start, hh, lp, rk, H, RANK: tl.constexpr):
    """Offsets of S[t, j, j'] (b·l, h, r, r) for t = start + lp: (positions, ranks, ranks)."""
    return (start * H + hh) * (RANK * RANK) + ((lp[:, None, None] * H * RANK + rk[None, :, None]) * RANK
                                               + rk[None, None, :])


@triton.jit(do_not_specialize=["R"])
def _mimo_rotate_fwd(
    B_ptr, C_ptr, Bb_ptr, Cb_ptr, theta_ptr, Bt_ptr, Ct_ptr, S_ptr,
    R, H, G, A, s_B, s_Br, s_C, s_Cr,
    RANK: tl.constexpr, RP: tl.constexpr, N: tl.constexpr, HALF: tl.constexpr, POS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    pid = tl.program_id(0)
    hh = pid % H
    start = (pid // H).to(tl.int64) * POS
    gg = hh // (H // G)
    lp, rk = tl.arange(0, POS), tl.arange(0, RP)
    pm, km = start + lp < R, rk < RANK
    m2 = pm[:, None] & km[None, :]
    b0, b1 = _load3(B_ptr + start * s_B + gg * N, lp, rk, s_B, s_Br, m2, N, HALF, INTERLEAVED)
    c0, c1 = _load3(C_ptr + start * s_C + gg * N, lp, rk, s_C, s_Cr, m2, N, HALF, INTERLEAVED)
    bb0, bb1, cc0, cc1, cos, sin, _, _ = _head_inputs(Bb_ptr, Cb_ptr, theta_ptr, start, lp, pm, rk, km, hh, H, A, RANK,
                                                      N, HALF, INTERLEAVED)
    u0, u1 = b0 + bb0, b1 + bb1
    v0, v1 = c0 + cc0, c1 + cc1
    rb0 = (u0 * cos - u1 * sin).to(Bt_ptr.dtype.element_ty).to(tl.float32)
    rb1 = (u0 * sin + u1 * cos).to(Bt_ptr.dtype.element_ty).to(tl.float32)
    rc0 = (v0 * cos - v1 * sin).to(Ct_ptr.dtype.element_ty).to(tl.float32)
    rc1 = (v0 * sin + v1 * cos).to(Ct_ptr.dtype.element_ty).to(tl.float32)
    # Row (t, j) of the (b·l·r, h, n) outputs: t·RANK + j.
    out = (start * RANK * H + hh) * N
    _store3(Bt_ptr + out, lp, rk, RANK * H * N, H * N, rb0, rb1, m2, N, HALF, INTERLEAVED)
    _store3(Ct_ptr + out, lp, rk, RANK * H * N, H * N, rc0, rc1, m2, N, HALF, INTERLEAVED)
    tl.store(S_ptr + _score_offsets(start, hh, lp, rk, H, RANK), _scores(rc0, rc1, rb0, rb1),
             mask=m2[:, :, None] & km[None, None, :])


@triton.jit(do_not_specialize=["R", "RUN"])
def _mimo_rotate_bwd(
    B_ptr, C_ptr, Bb_ptr, Cb_ptr, theta_ptr, dBt_ptr, dCt_ptr, dS_ptr,
    dB_ptr, dC_ptr, dBb_ptr, dCb_ptr, dtheta_ptr,
    R, H, G, A, SPLIT, RUN, s_B, s_Br, s_C, s_Cr,
    RANK: tl.constexpr, RP: tl.constexpr, N: tl.constexpr, HALF: tl.constexpr, POS: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_DS: tl.constexpr, OUT_DTYPE: tl.constexpr, STAGES: tl.constexpr,
):
    run = tl.program_id(0)
    gg = tl.program_id(1)
    sp = tl.program_id(2)
    lp, rk = tl.arange(0, POS), tl.arange(0, RP)
    km = rk < RANK
    pair = tl.arange(0, HALF)
    f, s = pair_cols(pair, N, INTERLEAVED)
    bmask = km[:, None] & (pair < N // 2)[None, :]
    hps = H // G // SPLIT
    first = run.to(tl.int64) * RUN
    for start in range(first, tl.minimum(first + RUN, R), POS):
        pm = start + lp < R
        m2 = pm[:, None] & km[None, :]
        b0, b1 = _load3(B_ptr + start * s_B + gg * N, lp, rk, s_B, s_Br, m2, N, HALF, INTERLEAVED)
        c0, c1 = _load3(C_ptr + start * s_C + gg * N, lp, rk, s_C, s_Cr, m2, N, HALF, INTERLEAVED)
        db0 = tl.zeros((POS, RP, HALF), dtype=tl.float32)
        db1 = tl.zeros((POS, RP, HALF), dtype=tl.float32)
        dc0 = tl.zeros((POS, RP, HALF), dtype=tl.float32)
        dc1 = tl.zeros((POS, RP, HALF), dtype=tl.float32)
        for k in tl.range(0, hps, num_stages=STAGES):
            hh = (gg * SPLIT + sp) * hps + k
            bb0, bb1, cc0, cc1, cos, sin, toff, tmask = _head_inputs(Bb_ptr, Cb_ptr, theta_ptr, start, lp, pm, rk, km,
                                                                     hh, H, A, RANK, N, HALF, INTERLEAVED)
            u0, u1 = b0 + bb0, b1 + bb1
            v0, v1 = c0 + cc0, c1 + cc1
            rb0, rb1 = u0 * cos - u1 * sin, u0 * sin + u1 * cos
            rc0, rc1 = v0 * cos - v1 * sin, v0 * sin + v1 * cos
            rows = (start * RANK * H + hh) * N
            gb0, gb1 = _load3(dBt_ptr + rows, lp, rk, RANK * H * N, H * N, m2, N, HALF, INTERLEAVED)
            gc0, gc1 = _load3(dCt_ptr + rows, lp, rk, RANK * H * N, H * N, m2, N, HALF, INTERLEAVED)
            if HAS_DS:
                # S = C̃ B̃ᵀ of the rounded values: dB̃_{j'} += Σ_j dS_{j,j'} C̃_j, dC̃_j += Σ_{j'} dS_{j,j'} B̃_{j'}.
                dS = tl.load(dS_ptr + _score_offsets(start, hh, lp, rk, H, RANK),
                             mask=m2[:, :, None] & km[None, None, :], other=0.0)[:, :, :, None]
                qb0, qb1 = rb0.to(OUT_DTYPE).to(tl.float32), rb1.to(OUT_DTYPE).to(tl.float32)
                qc0, qc1 = rc0.to(OUT_DTYPE).to(tl.float32), rc1.to(OUT_DTYPE).to(tl.float32)
                gb0 += tl.sum(dS * qc0[:, :, None, :], 1)
                gb1 += tl.sum(dS * qc1[:, :, None, :], 1)
                gc0 += tl.sum(dS * qb0[:, None, :, :], 2)
                gc1 += tl.sum(dS * qb1[:, None, :, :], 2)
            # Back through the rotation: the transpose of R(θ); d/dθ of (r0, r1) is (-r1, r0); θ is shared by the ranks.
            ub0, ub1 = gb0 * cos + gb1 * sin, gb1 * cos - gb0 * sin
            uc0, uc1 = gc0 * cos + gc1 * sin, gc1 * cos - gc0 * sin
            dth = tl.sum(gb1 * rb0 - gb0 * rb1 + gc1 * rc0 - gc0 * rc1, 1)
            tl.store(dtheta_ptr + toff, dth, mask=tmask)
            db0 += ub0
            db1 += ub1
            dc0 += uc0
            dc1 += uc1
            # Bias gradients: summed over the run in this program's slot (ranks, n) of the head, written by the first
            # block, read back and rewritten by the next (the barrier below orders the blocks' accesses).
            slot = ((run * H + hh) * RANK + rk[:, None]) * N
            keep = bmask & (tl.zeros((RP, HALF), dtype=tl.int64) + start > first)
            tl.store(dBb_ptr + slot + f[None, :], tl.load(dBb_ptr + slot + f[None, :], mask=keep, other=0.0)
                     + tl.sum(ub0, 0), mask=bmask)
            tl.store(dBb_ptr + slot + s[None, :], tl.load(dBb_ptr + slot + s[None, :], mask=keep, other=0.0)
                     + tl.sum(ub1, 0), mask=bmask)
            tl.store(dCb_ptr + slot + f[None, :], tl.load(dCb_ptr + slot + f[None, :], mask=keep, other=0.0)
                     + tl.sum(uc0, 0), mask=bmask)
            tl.store(dCb_ptr + slot + s[None, :], tl.load(dCb_ptr + slot + s[None, :], mask=keep, other=0.0)
                     + tl.sum(uc1, 0), mask=bmask)
        # dB, dC: (SPLIT, R, RANK, G, N), the partial of this program's split (SPLIT 1: the gradient itself).
        out = (sp.to(tl.int64) * R + start) * RANK * G * N + gg * N
        _store3(dB_ptr + out, lp, rk, RANK * G * N, G * N, db0, db1, m2, N, HALF, INTERLEAVED)
        _store3(dC_ptr + out, lp, rk, RANK * G * N, G * N, dc0, dc1, m2, N, HALF, INTERLEAVED)
        tl.debug_barrier()  # every slot's read-modify-write of this block is done before the next block's


def _rows(v: torch.Tensor) -> torch.Tensor:
    """v (R, r, g, n) as the kernels read it: each rank's g·n entries contiguous, rows and ranks at any stride (B and C
    may be slices of one normalised in-projection output: no copy)."""
    return v if v.stride(3) == 1 and v.stride(2) == v.shape[3] else v.contiguous()


class _MimoRotateBC(torch.autograd.Function):
    """B, C (b, l, r, g, n); B_bias, C_bias (h, r, n) float32; theta (b, l, h, a) float32 -> Bt, Ct (b, l·r, h, n)
    in ``out_dtype`` (the SSD op's sub-steps: made in that shape here, so no view node runs outside) and S
    (b, l, h, r, r) float32."""

    @staticmethod
    def forward(ctx, B, C, B_bias, C_bias, theta, interleaved, out_dtype):
        b, l, h, a = theta.shape
        r, g, n = B.shape[2:]
        R = b * l
        B2, C2 = _rows(B.reshape(R, r, g, n)), _rows(C.reshape(R, r, g, n))
        Bt = torch.empty(b, l * r, h, n, device=B.device, dtype=out_dtype)
        Ct = torch.empty_like(Bt)
        S = torch.empty(b, l, h, r, r, device=B.device, dtype=torch.float32)
        _mimo_rotate_fwd[(cdiv(R, _FWD_POS) * h,)](
            B2, C2, B_bias, C_bias, theta, Bt, Ct, S, R, h, g, a, B2.stride(0), B2.stride(1), C2.stride(0),
            C2.stride(1), RANK=r, RP=next_power_of_2(r), N=n, HALF=_half(n), POS=_FWD_POS, INTERLEAVED=interleaved,
            num_warps=_FWD_WARPS,
        )
        ctx.save_for_backward(B, C, B_bias, C_bias, theta)
        ctx.meta = (interleaved, out_dtype)
        ctx.set_materialize_grads(False)
        return Bt, Ct, S

    @staticmethod
    @once_differentiable
    def backward(ctx, dBt, dCt, dS):
        B, C, B_bias, C_bias, theta = ctx.saved_tensors
        interleaved, out_dtype = ctx.meta
        b, l, h, a = theta.shape
        r, g, n = B.shape[2:]
        R = b * l
        B2, C2 = _rows(B.reshape(R, r, g, n)), _rows(C.reshape(R, r, g, n))
        dBt = torch.zeros(b, l * r, h, n, device=B.device, dtype=out_dtype) if dBt is None else dBt.contiguous()
        dCt = torch.zeros_like(dBt) if dCt is None else dCt.contiguous()
        runs = max(1, min(cdiv(R, _POS), cdiv(_RUN_PROGRAMS, g)))
        split = _split(h // g, runs * g)
        runs = max(1, min(cdiv(R, _POS), cdiv(_RUN_PROGRAMS, g * split)))
        run = cdiv(cdiv(R, runs), _POS) * _POS
        runs = cdiv(R, run)
        if split == 1:
            dB = torch.empty(B.shape, device=B.device, dtype=B.dtype)
            dC = torch.empty(C.shape, device=C.device, dtype=C.dtype)
        else:
            dB = torch.empty(split, *B.shape, device=B.device, dtype=torch.float32)
            dC = torch.empty_like(dB)
        dBCb = torch.empty(2, runs, h, r, n, device=B.device, dtype=torch.float32)  # per-run partials of the biases'
        dtheta = torch.empty_like(theta)
        _mimo_rotate_bwd[(runs, g, split)](
            B2, C2, B_bias, C_bias, theta, dBt, dCt, dBt if dS is None else dS.contiguous(),
            dB, dC, dBCb[0], dBCb[1], dtheta, R, h, g, a, split, run, B2.stride(0), B2.stride(1), C2.stride(0),
            C2.stride(1), RANK=r, RP=next_power_of_2(r), N=n, HALF=_half(n), POS=_POS, INTERLEAVED=interleaved,
            HAS_DS=dS is not None, OUT_DTYPE=_TL[out_dtype], STAGES=_STAGES, num_warps=_WARPS,
        )
        if split > 1:
            dB, dC = dB.sum(0).to(B.dtype), dC.sum(0).to(C.dtype)
        dBb, dCb = dBCb.sum(1).unbind(0) if runs > 1 else dBCb[:, 0].unbind(0)
        return dB, dC, dBb, dCb, dtheta, None, None


def mimo_rotate_bc_triton(
    B: torch.Tensor,
    C: torch.Tensor,
    B_bias: torch.Tensor | None,
    C_bias: torch.Tensor | None,
    theta: torch.Tensor,
    interleaved: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotated B̃, C̃ (b, l·r, h, n) in ``out_dtype`` (position t's rank j at sub-step t·r + j) and the scores
    S = C̃ B̃ᵀ (b, l, h, r, r) float32 of the rounded values, with gradients of B, C (in their dtype), the biases and
    theta.

    B, C: (b, l, r, g, n), any float dtype but float64 (n even), each rank's g·n entries contiguous or copied so;
    B_bias, C_bias: (h, r, n) or None (zero); theta: (b, l, h, a) float32 with a <= n/2.
    """
    r, n, a, h = B.shape[2], B.shape[-1], theta.shape[3], theta.shape[2]
    if n % 2 or a > n // 2 or out_dtype not in _TL:
        raise ValueError(f"mimo_rotate_bc_triton: n={n} must be even, a={a} <= n/2, out dtype {out_dtype} "
                         "bf16/fp16/fp32")
    Bb, Cb = (torch.zeros(h, r, n, device=B.device) if v is None else v.float().contiguous() for v in (B_bias, C_bias))
    return _MimoRotateBC.apply(B, C, Bb, Cb, theta.float().contiguous(), interleaved, out_dtype)
