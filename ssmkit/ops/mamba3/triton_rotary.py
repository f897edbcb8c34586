"""Triton kernels of the SSD route's B/C preparation: per-head bias, rotation, rounding and the diagonal C̃·B̃.

For single-input Mamba-3 through the SSD op (``via_ssd.py``) every head needs its own rotated B̃ and C̃
(b, l, h, n): the biases are per head and so is θ (Δ is). In PyTorch that is a dozen passes over
(b, l, h, n) float32 tensors each way (bias add, the pair split, four products, stack, cat, the casts, the
diagonal dot); here it is one kernel forward and one backward, reading B and C once per group::

    B̃_t = R(θ_t) (B_t + B_bias),  C̃_t = R(θ_t) (C_t + C_bias)   (stored in the SSD op's operand dtype)
    cb_t = C̃_t · B̃_t                                          (of the stored, rounded values, float32)

With ``NORM`` (the layer's folded route, ``projected.py``) B and C come raw from the in-projection and each
group's N entries pass mamba_ssm's RMS norm first, B_t <- B_t / rms(B_t) · w_B (w_C for C), in float32 in
registers: the norm's own launch and autograd node each way, and its rounded output, are gone.

Layouts (contiguous, except that B's and C's rows may lie at any stride): B, C (b·l, g, n); B_bias, C_bias
(h, n) float32; theta (b·l, h, a) float32; Bt, Ct (b·l, h, n); cb (b·l, h) float32. Pair i < a is
(2i, 2i+1) when INTERLEAVED, else (i, i + n/2); pairs past a pass unrotated. Rows are read and written whole (interleaved pairs split and joined in
registers), never as two stride-2 halves: stride-2 bf16 stores left every sector half written.

Forward: a program takes ROWS positions of one head, heads varying fastest between programs, so the
programs of one group that read the same B, C rows run together (L2 hits) and nothing is serial. Backward:
a program takes ROWS positions of one group and loops over its heads, summing their gradients of B and C in
registers, and the bias gradients per program. With ``NORM`` its epilogue takes the gradient back through the
norm (the weights' gradients per program beside the biases'), unless a group's heads are split over programs:
then a second kernel (``norm_bc_bwd``) sums the splits' partials and does it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ssmkit.ops._host import cdiv, next_power_of_2
from ssmkit.ops.mamba3.triton_pairs import (
    load_pair,
    norm_bc_bwd,
    norm_finish,
    normed,
    pair_cols,
    store_pair,
)

# Positions per program, and warps. The forward runs one head a program: many small programs hide the latency.
# The backward loops over a group's heads, so the loop's loads must be in flight while the previous head
# computes: measured on an H100 (benchmarks/gpu_mamba3_rotary.py, b 8, L 8192, 24 heads, N 128), its time
# went 2.54 ms (16 rows, 8 warps, no pipelining) -> 1.09 ms (8 rows, 4 warps, the head loop in 2 stages).
_ROWS = 8
_WARPS = 4
_FWD_ROWS = 16
_FWD_WARPS = 4
_STAGES = 2  # software pipelining of the backward's head loop (the next head's loads in flight)
_SPLIT_PROGRAMS = 4 * 132  # backward: split a group's heads until about this many programs (a few per SM) run
# With the norms (NORM) the same tiles at 8 warps (sm_90 as the JIT specializes the layer's call,
# benchmarks/layer_registers.py: backward 103 / 88 registers on Triton 3.6 / 3.9, 128 / 113 at 4 warps; forward
# 84 / 114, 135 / 151 at 4). Not yet timed on a GPU: benchmarks/gpu_mamba3_rotary.py --norm --warps 8 4.
_NORM_WARPS = 8
_NORM_FWD_WARPS = 8


@triton.jit
def _load_rows(ptr, rows, stride, rmask, N: tl.constexpr, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """(rows, pairs) float32 tiles of each pair's entries, from whole rows (contiguous loads)."""
    base = ptr + rows[:, None] * stride
    if INTERLEAVED:
        cols = tl.arange(0, 2 * HALF)
        row = tl.load(base + cols[None, :], mask=rmask[:, None] & (cols < N)[None, :], other=0.0)
        first, second = tl.split(tl.reshape(row.to(tl.float32), (row.shape[0], HALF, 2)))
        return first, second
    pair = tl.arange(0, HALF)
    mask = rmask[:, None] & (pair < N // 2)[None, :]
    return (tl.load(base + pair[None, :], mask=mask, other=0.0).to(tl.float32),
            tl.load(base + N // 2 + pair[None, :], mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _store_rows(ptr, rows, stride, v0, v1, rmask, N: tl.constexpr, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Store pair tiles as whole rows (the inverse of ``_load_rows``)."""
    base = ptr + rows[:, None] * stride
    if INTERLEAVED:
        cols = tl.arange(0, 2 * HALF)
        row = tl.reshape(tl.join(v0, v1), (v0.shape[0], 2 * HALF))
        tl.store(base + cols[None, :], row.to(ptr.dtype.element_ty), mask=rmask[:, None] & (cols < N)[None, :])
    else:
        pair = tl.arange(0, HALF)
        mask = rmask[:, None] & (pair < N // 2)[None, :]
        tl.store(base + pair[None, :], v0.to(ptr.dtype.element_ty), mask=mask)
        tl.store(base + N // 2 + pair[None, :], v1.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _head_inputs(Bb_ptr, Cb_ptr, theta_ptr, rows, hh, pair, f, s, mask, pmask, H, A, N: tl.constexpr):
    """One head's biases (pairs,) and cos, sin of θ (rows, pairs); pairs past a get θ = 0 (no rotation)."""
    bb0 = tl.load(Bb_ptr + hh * N + f, mask=pmask, other=0.0)
    bb1 = tl.load(Bb_ptr + hh * N + s, mask=pmask, other=0.0)
    cc0 = tl.load(Cb_ptr + hh * N + f, mask=pmask, other=0.0)
    cc1 = tl.load(Cb_ptr + hh * N + s, mask=pmask, other=0.0)
    tmask = mask & (pair < A)[None, :]
    th = tl.load(theta_ptr + (rows[:, None] * H + hh) * A + pair[None, :], mask=tmask, other=0.0)
    return bb0, bb1, cc0, cc1, tl.cos(th), tl.sin(th), tmask


@triton.jit(do_not_specialize=["R"])
def _rotate_bc_fwd(
    B_ptr, C_ptr, Bb_ptr, Cb_ptr, wB_ptr, wC_ptr, theta_ptr, Bt_ptr, Ct_ptr, cb_ptr,
    R, H, G, A, s_B, s_C, eps_B, eps_C,
    N: tl.constexpr, HALF: tl.constexpr, ROWS: tl.constexpr, INTERLEAVED: tl.constexpr, NORM: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    blk, hh = pid // H, pid % H
    gg = hh // (H // G)
    rows = blk * ROWS + tl.arange(0, ROWS)
    rmask = rows < R
    pair = tl.arange(0, HALF)
    pmask = pair < N // 2
    mask = rmask[:, None] & pmask[None, :]
    f, s = pair_cols(pair, N, INTERLEAVED)
    b0, b1 = _load_rows(B_ptr + gg * N, rows, s_B, rmask, N, HALF, INTERLEAVED)
    c0, c1 = _load_rows(C_ptr + gg * N, rows, s_C, rmask, N, HALF, INTERLEAVED)
    if NORM:
        b0, b1 = normed(b0, b1, wB_ptr, eps_B, f, s, pmask, N)
        c0, c1 = normed(c0, c1, wC_ptr, eps_C, f, s, pmask, N)
    bb0, bb1, cc0, cc1, cos, sin, _ = _head_inputs(Bb_ptr, Cb_ptr, theta_ptr, rows, hh, pair, f, s, mask,
                                                   pmask, H, A, N)
    u0, u1 = b0 + bb0[None, :], b1 + bb1[None, :]
    v0, v1 = c0 + cc0[None, :], c1 + cc1[None, :]
    rb0 = (u0 * cos - u1 * sin).to(Bt_ptr.dtype.element_ty).to(tl.float32)
    rb1 = (u0 * sin + u1 * cos).to(Bt_ptr.dtype.element_ty).to(tl.float32)
    rc0 = (v0 * cos - v1 * sin).to(Ct_ptr.dtype.element_ty).to(tl.float32)
    rc1 = (v0 * sin + v1 * cos).to(Ct_ptr.dtype.element_ty).to(tl.float32)
    _store_rows(Bt_ptr + hh * N, rows, H * N, rb0, rb1, rmask, N, HALF, INTERLEAVED)
    _store_rows(Ct_ptr + hh * N, rows, H * N, rc0, rc1, rmask, N, HALF, INTERLEAVED)
    tl.store(cb_ptr + rows * H + hh, tl.sum(rb0 * rc0 + rb1 * rc1, 1), mask=rmask)


@triton.jit(do_not_specialize=["R"])
def _rotate_bc_bwd(
    B_ptr, C_ptr, Bb_ptr, Cb_ptr, wB_ptr, wC_ptr, theta_ptr, dBt_ptr, dCt_ptr, dcb_ptr,
    dB_ptr, dC_ptr, dBb_ptr, dCb_ptr, dtheta_ptr,
    R, H, G, A, SPLIT, PB, s_B, s_C, eps_B, eps_C,
    N: tl.constexpr, HALF: tl.constexpr, ROWS: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_DCB: tl.constexpr,
    OUT_DTYPE: tl.constexpr, STAGES: tl.constexpr, NORM: tl.constexpr, FINISH: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)
    gg = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2).to(tl.int64)
    rows = blk * ROWS + tl.arange(0, ROWS)
    pair = tl.arange(0, HALF)
    pmask = pair < N // 2
    mask = (rows < R)[:, None] & pmask[None, :]
    f, s = pair_cols(pair, N, INTERLEAVED)
    b0, b1 = load_pair(B_ptr + gg * N, rows, s_B, f, s, mask)
    c0, c1 = load_pair(C_ptr + gg * N, rows, s_C, f, s, mask)
    if NORM:  # the normalised values (the epilogue loads the raw ones again: fewer registers live in the loop)
        b0, b1 = normed(b0, b1, wB_ptr, eps_B, f, s, pmask, N)
        c0, c1 = normed(c0, c1, wC_ptr, eps_C, f, s, pmask, N)
    db0 = tl.zeros((ROWS, HALF), dtype=tl.float32)
    db1 = tl.zeros((ROWS, HALF), dtype=tl.float32)
    dc0 = tl.zeros((ROWS, HALF), dtype=tl.float32)
    dc1 = tl.zeros((ROWS, HALF), dtype=tl.float32)
    hps = H // G // SPLIT
    for k in tl.range(0, hps, num_stages=STAGES):
        hh = (gg * SPLIT + sp) * hps + k
        bb0, bb1, cc0, cc1, cos, sin, tmask = _head_inputs(Bb_ptr, Cb_ptr, theta_ptr, rows, hh, pair, f, s, mask,
                                                           pmask, H, A, N)
        u0, u1 = b0 + bb0[None, :], b1 + bb1[None, :]
        v0, v1 = c0 + cc0[None, :], c1 + cc1[None, :]
        rb0, rb1 = u0 * cos - u1 * sin, u0 * sin + u1 * cos
        rc0, rc1 = v0 * cos - v1 * sin, v0 * sin + v1 * cos
        gb0, gb1 = _load_rows(dBt_ptr + hh * N, rows, H * N, rows < R, N, HALF, INTERLEAVED)
        gc0, gc1 = _load_rows(dCt_ptr + hh * N, rows, H * N, rows < R, N, HALF, INTERLEAVED)
        if HAS_DCB:
            # cb = C̃·B̃ of the rounded values: its gradient passes the rounding unchanged (straight through).
            dcb = tl.load(dcb_ptr + rows * H + hh, mask=rows < R, other=0.0).to(tl.float32)[:, None]
            gb0 += dcb * rc0.to(OUT_DTYPE).to(tl.float32)
            gb1 += dcb * rc1.to(OUT_DTYPE).to(tl.float32)
            gc0 += dcb * rb0.to(OUT_DTYPE).to(tl.float32)
            gc1 += dcb * rb1.to(OUT_DTYPE).to(tl.float32)
        # Back through the rotation: the transpose of R(θ); d/dθ of (r0, r1) is (-r1, r0).
        ub0, ub1 = gb0 * cos + gb1 * sin, gb1 * cos - gb0 * sin
        uc0, uc1 = gc0 * cos + gc1 * sin, gc1 * cos - gc0 * sin
        dth = gb1 * rb0 - gb0 * rb1 + gc1 * rc0 - gc0 * rc1
        tl.store(dtheta_ptr + (rows[:, None] * H + hh) * A + pair[None, :], dth, mask=tmask)
        db0 += ub0
        db1 += ub1
        dc0 += uc0
        dc1 += uc1
        # Bias gradients: this program's rows summed, one partial per program (the caller sums them).
        tl.store(dBb_ptr + (blk * PB + hh) * N + f, tl.sum(ub0, 0), mask=pmask)
        tl.store(dBb_ptr + (blk * PB + hh) * N + s, tl.sum(ub1, 0), mask=pmask)
        tl.store(dCb_ptr + (blk * PB + hh) * N + f, tl.sum(uc0, 0), mask=pmask)
        tl.store(dCb_ptr + (blk * PB + hh) * N + s, tl.sum(uc1, 0), mask=pmask)
    if FINISH:  # NORM with the group's heads in this program: back through the norm here
        norm_finish(B_ptr, s_B, wB_ptr, eps_B, db0, db1, dB_ptr, dBb_ptr, blk, gg, rows, f, s, mask, pmask, G, H, PB,
                    N)
        norm_finish(C_ptr, s_C, wC_ptr, eps_C, dc0, dc1, dC_ptr, dCb_ptr, blk, gg, rows, f, s, mask, pmask, G, H, PB,
                    N)
    else:  # dB, dC: (SPLIT, R, G, N), the partial of this program's split (SPLIT 1: the gradient itself)
        store_pair(dB_ptr + (sp * R * G + gg) * N, rows, G * N, f, s, db0, db1, mask)
        store_pair(dC_ptr + (sp * R * G + gg) * N, rows, G * N, f, s, dc0, dc1, mask)


def _split(heads_per_group: int, programs: int) -> int:
    """How many programs share a group's heads in the backward: the smallest divisor of heads_per_group that
    gives about _SPLIT_PROGRAMS programs (the float32 partials cost 2·SPLIT·R·g·n·8 bytes of traffic)."""
    for split in range(1, heads_per_group + 1):
        if heads_per_group % split == 0 and programs * split >= _SPLIT_PROGRAMS:
            return split
    return heads_per_group


def _half(n: int) -> int:
    """Pairs per row, padded to a power of two (Triton's tiles)."""
    return next_power_of_2(max(n // 2, 1))


_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


class _RotateBC(torch.autograd.Function):
    """B, C (b, l, [1,] g, n); B_bias, C_bias (h, [1,] n) float32; theta (b, l, h, a) float32; with the norm,
    its weights B_weight, C_weight (n,) and eps (eps_B, eps_C), else None -> Bt, Ct (b, l, h, n), cb (b, l, h).
    The flattening to the kernels' rows happens in here, not around the node: each reshape or view outside would
    be an autograd node more, run by the engine every backward."""

    @staticmethod
    def forward(ctx, B, C, B_bias, C_bias, theta, B_weight, C_weight, interleaved, out_dtype, eps):
        b, l, h, a = theta.shape
        g, n = B.shape[-2:]
        R = b * l
        B2, C2 = _rows(B.reshape(R, g, n)), _rows(C.reshape(R, g, n))
        Bb, Cb, th = B_bias.reshape(h, n), C_bias.reshape(h, n), theta.reshape(R, h, a)
        Bt = torch.empty(b, l, h, n, device=B.device, dtype=out_dtype)
        Ct = torch.empty_like(Bt)
        cb = torch.empty(b, l, h, device=B.device, dtype=torch.float32)
        norm = eps is not None
        grid = (cdiv(R, _FWD_ROWS) * h,)
        _rotate_bc_fwd[grid](B2, C2, Bb, Cb, B_weight if norm else Bb, C_weight if norm else Cb, th, Bt, Ct, cb,
                             R, h, g, a, B2.stride(0), C2.stride(0), *(eps or (0.0, 0.0)), N=n, HALF=_half(n),
                             ROWS=_FWD_ROWS, INTERLEAVED=interleaved, NORM=norm,
                             num_warps=_NORM_FWD_WARPS if norm else _FWD_WARPS)
        ctx.save_for_backward(B, C, B_bias, C_bias, theta, B_weight, C_weight)
        ctx.meta = (interleaved, out_dtype, eps)
        ctx.set_materialize_grads(False)
        return Bt, Ct, cb

    @staticmethod
    @once_differentiable
    def backward(ctx, dBt, dCt, dcb):
        B, C, B_bias, C_bias, theta, B_weight, C_weight = ctx.saved_tensors
        interleaved, out_dtype, eps = ctx.meta
        norm = eps is not None
        b, l, h, a = theta.shape
        g, n = B.shape[-2:]
        R = b * l
        B2, C2 = _rows(B.reshape(R, g, n)), _rows(C.reshape(R, g, n))
        Bb, Cb, th = B_bias.reshape(h, n), C_bias.reshape(h, n), theta.reshape(R, h, a)
        nblk = cdiv(R, _ROWS)
        dBt = torch.zeros(R, h, n, device=B.device, dtype=out_dtype) if dBt is None else dBt.contiguous()
        dCt = torch.zeros_like(dBt) if dCt is None else dCt.contiguous()
        split = _split(h // g, nblk * g)
        if split == 1:  # contiguous, whatever B's and C's row strides
            dB = torch.empty(B.shape, device=B.device, dtype=B.dtype)
            dC = torch.empty(C.shape, device=C.device, dtype=C.dtype)
        else:
            dB = torch.empty(split, *B.shape, device=B.device, dtype=torch.float32)
            dC = torch.empty_like(dB)
        # Both biases' per-program partials in one buffer, and with the norm its weights' after them (rows h + group
        # of each block): one reduction launch for all.
        pb = h + g if norm else h
        dBCb = torch.empty(2, nblk, pb, n, device=B.device, dtype=torch.float32)
        dtheta = torch.empty_like(theta)
        wB, wC = (B_weight, C_weight) if norm else (Bb, Cb)
        eps_BC = eps or (0.0, 0.0)
        _rotate_bc_bwd[(nblk, g, split)](
            B2, C2, Bb, Cb, wB, wC, th, dBt, dCt, dBt if dcb is None else dcb.contiguous(),
            dB, dC, dBCb[0], dBCb[1], dtheta, R, h, g, a, split, pb, B2.stride(0), C2.stride(0), *eps_BC, N=n,
            HALF=_half(n), ROWS=_ROWS, INTERLEAVED=interleaved, HAS_DCB=dcb is not None, OUT_DTYPE=_TL[out_dtype],
            STAGES=_STAGES, NORM=norm, FINISH=norm and split == 1, num_warps=_NORM_WARPS if norm else _WARPS,
        )
        if split > 1 and norm:
            dBn, dCn = dB, dC
            dB = torch.empty(B.shape, device=B.device, dtype=B.dtype)
            dC = torch.empty(C.shape, device=C.device, dtype=C.dtype)
            norm_bc_bwd[(nblk, g)](B2, C2, wB, wC, dBn, dCn, dB, dC, dBCb[0], dBCb[1], R, g, h, split, pb,
                                    B2.stride(0), C2.stride(0), *eps_BC, N=n, HALF=_half(n), ROWS=_ROWS,
                                    num_warps=_WARPS)
        elif split > 1:
            dB, dC = dB.sum(0).to(B.dtype), dC.sum(0).to(C.dtype)
        sums = dBCb.sum(1)  # (2, pb, n)
        dw = None
        if norm:
            dw = sums[:, h:] if g == 1 else sums[:, h:].sum(1, keepdim=True)
            dw = dw.to(B_weight.dtype)  # one cast for both weights (a no-op for float32 weights)
        dBb, dCb = sums[:, :h].unbind(0) if norm else sums.unbind(0)
        return (dB, dC, dBb.view(B_bias.shape), dCb.view(C_bias.shape), dtheta,
                None if dw is None else dw[0].view(n), None if dw is None else dw[1].view(n), None, None, None)


def _rows(v: torch.Tensor) -> torch.Tensor:
    """v (R, g, n) as the kernels read it: each row's g·n entries contiguous, rows at any stride (B and C may be
    slices of one normalised in-projection output: no copy)."""
    return v if v.stride(2) == 1 and v.stride(1) == v.shape[2] else v.contiguous()


def rotate_bc_triton(
    B: torch.Tensor,
    C: torch.Tensor,
    B_bias: torch.Tensor,
    C_bias: torch.Tensor,
    theta: torch.Tensor,
    interleaved: bool,
    out_dtype: torch.dtype,
    norm: tuple[torch.Tensor, torch.Tensor, float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head rotated B̃, C̃ (b, l, h, n) in ``out_dtype`` and cb = C̃·B̃ (b, l, h) float32, with gradients.

    B, C: (b, l, g, n) or (b, l, 1, g, n), any float dtype but float64 (n even), each row's g·n entries
    contiguous or copied so; B_bias, C_bias: (h, n) or (h, 1, n); theta: (b, l, h, a) float32 with a <= n/2.
    ``norm``: (B_weight, C_weight, eps_B, eps_C), the weights (n,) of the RMS norms B and C pass first (each
    group's n entries apart), or None. Gradients reach B, C (in their dtype), the biases, theta and the weights.
    """
    n, a = B.shape[-1], theta.shape[3]
    if n % 2 or a > n // 2 or out_dtype not in _TL:
        raise ValueError(f"rotate_bc_triton: n={n} must be even, a={a} <= n/2, out dtype {out_dtype} bf16/fp16/fp32")
    weights, eps = (None, None), None
    if norm is not None:
        weights, eps = (w.contiguous() for w in norm[:2]), (float(norm[2]), float(norm[3]))
    return _RotateBC.apply(B, C, B_bias.float().contiguous(), C_bias.float().contiguous(),
                           theta.float().contiguous(), *weights, interleaved, out_dtype, eps)
