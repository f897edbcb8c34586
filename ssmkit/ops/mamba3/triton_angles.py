"""Triton kernels of Mamba-3's rotary angles: θ_t = θ_{t-1} + Δ_t π tanh(angles_t) (mod 2π), per document.

``chunked.rotary_angles`` builds θ in PyTorch from a float64 cumulative sum over (b, l, h, a) tensors, with
a count of non-finite steps to keep a NaN inside its document: about ten passes forward and as many back.
Here one program per (batch row, head, block of angles) walks the sequence in blocks of ``_BLOCK`` positions, sums each
block with a segmented scan (restarting where a document starts) in float64 and carries θ between blocks
reduced modulo 2π in float64, so the rounding does not grow with the length. A NaN or inf step makes θ NaN
to the end of its document, as in the recurrence, by plain float arithmetic: the segmented scan drops what
came before a document start. The backward is the same walk from the end (the gradient of a step is the
sum of dθ over the rest of its document), and gives dΔ, d angles and the initial angles' gradient.

Layouts: dt (b, l, h) float32 contiguous; angles (b, l, h, a) any strides (the layer passes one set per
token expanded over the heads, stride 0); starts (b, l) int32, 1 where a document starts (position 0
excluded); init (b, h, a) float32; theta (b, l, h, a) float32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ssmkit.ops._host import cdiv, next_power_of_2
from ssmkit.ops.ssd.reference import doc_starts

_BLOCK = 128  # positions per step of the walk
_COLS = 16  # angles per program (more programs than batch x heads alone: the walk is sequential)
_TWO_PI = 2 * math.pi


@triton.jit
def _segmented_add(f1, v1, f2, v2):
    """Combine of a sum that restarts at flagged elements (f: 1 where a segment starts)."""
    return f1 | f2, tl.where(f2 != 0, v2, v1 + v2)


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit(do_not_specialize=["L"])
def _angles_fwd(
    dt_ptr, ang_ptr, starts_ptr, init_ptr, theta_ptr,
    L, H, A, s_b, s_l, s_h, s_a,
    BA: tl.constexpr, BL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_INIT: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b, hh = bh // H, bh % H
    cols = tl.program_id(1) * BA + tl.arange(0, BA)
    cmask = cols < A
    carry = tl.zeros([BA], dtype=tl.float64)
    if HAS_INIT:
        carry += tl.load(init_ptr + bh * A + cols, mask=cmask, other=0.0).to(tl.float64)
    for k in range(0, L, BL):
        t = (k + tl.arange(0, BL)).to(tl.int64)  # int64: t times the angles' row stride can pass 2^31
        tm = t < L
        mask = tm[:, None] & cmask[None, :]
        d = tl.load(dt_ptr + (b * L + t) * H + hh, mask=tm, other=0.0)
        ang = tl.load(ang_ptr + b * s_b + t[:, None] * s_l + hh * s_h + cols[None, :] * s_a, mask=mask, other=0.0)
        inc = (d[:, None] * 3.141592653589793 * _tanh(ang.to(tl.float32))).to(tl.float64)
        if HAS_DOC:
            f = tl.load(starts_ptr + b * L + t, mask=tm, other=0)
            f = tl.broadcast_to(f[:, None], (BL, BA))
            flag, val = tl.associative_scan((f, inc), 0, _segmented_add)
            tot = tl.where(flag != 0, val, carry[None, :] + val)
        else:
            tot = carry[None, :] + tl.cumsum(inc, 0)
        th = tot - tl.floor(tot / 6.283185307179586) * 6.283185307179586
        tl.store(theta_ptr + ((b * L + t[:, None]) * H + hh) * A + cols[None, :], th.to(tl.float32), mask=mask)
        # Rows past the end add nothing, so the last row holds the carry (NaN stays NaN: where, not 0 * NaN).
        carry = tl.sum(tl.where((tl.arange(0, BL) == BL - 1)[:, None], th, 0.0), 0)


@triton.jit(do_not_specialize=["L"])
def _angles_bwd(
    dt_ptr, ang_ptr, starts_ptr, dtheta_ptr, ddt_ptr, dang_ptr, dinit_ptr,
    L, H, A, s_b, s_l, s_h, s_a,
    BA: tl.constexpr, BL: tl.constexpr, HAS_DOC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b, hh = bh // H, bh % H
    cb = tl.program_id(1)
    cols = cb * BA + tl.arange(0, BA)
    cmask = cols < A
    carry = tl.zeros([BA], dtype=tl.float64)
    nblk = tl.cdiv(L, BL)
    for j in range(nblk):
        # Rows in descending position order, so that a forward scan is the sum over the rest of the document.
        t = ((nblk - 1 - j) * BL + BL - 1 - tl.arange(0, BL)).to(tl.int64)
        tm = t < L
        mask = tm[:, None] & cmask[None, :]
        g = tl.load(dtheta_ptr + ((b * L + t[:, None]) * H + hh) * A + cols[None, :], mask=mask, other=0.0)
        g = g.to(tl.float64)
        if HAS_DOC:
            # Walking back, a segment starts at the last position of each document (the next one starts after).
            e = tl.load(starts_ptr + b * L + t + 1, mask=t + 1 < L, other=0)
            e = tl.broadcast_to(e[:, None], (BL, BA))
            flag, val = tl.associative_scan((e, g), 0, _segmented_add)
            tot = tl.where(flag != 0, val, carry[None, :] + val)
        else:
            tot = carry[None, :] + tl.cumsum(g, 0)
        d = tl.load(dt_ptr + (b * L + t) * H + hh, mask=tm, other=0.0)
        ang = tl.load(ang_ptr + b * s_b + t[:, None] * s_l + hh * s_h + cols[None, :] * s_a, mask=mask, other=0.0)
        th = _tanh(ang.to(tl.float32))
        dinc = tot.to(tl.float32) * 3.141592653589793
        # This program's angles' share of dΔ (the caller sums the column blocks).
        tl.store(ddt_ptr + ((b * L + t) * H + hh) * tl.num_programs(1) + cb, tl.sum(tl.where(mask, dinc * th, 0.0), 1),
                 mask=tm)
        dang = (dinc * d[:, None] * (1 - th * th)).to(dang_ptr.dtype.element_ty)
        tl.store(dang_ptr + ((b * L + t[:, None]) * H + hh) * A + cols[None, :], dang, mask=mask)
        carry = tl.sum(tl.where((tl.arange(0, BL) == BL - 1)[:, None], tot, 0.0), 0)
    tl.store(dinit_ptr + bh * A + cols, carry.to(tl.float32), mask=cmask)


def angles_fwd(dt: torch.Tensor, angles: torch.Tensor, starts: torch.Tensor | None,
               init: torch.Tensor | None) -> torch.Tensor:
    """Launch the forward: θ (b, l, h, a) float32 (layouts in the module docstring)."""
    b, l, h, a = angles.shape
    theta = torch.empty(b, l, h, a, device=dt.device, dtype=torch.float32)
    if a == 0:  # no rotary pair: nothing to launch (a grid of 0 column blocks)
        return theta
    dummy = dt
    BA = min(_COLS, next_power_of_2(a))
    _angles_fwd[(b * h, cdiv(a, BA))](
        dt, angles, dummy if starts is None else starts, dummy if init is None else init, theta,
        l, h, a, *angles.stride(), BA=BA, BL=_BLOCK, HAS_DOC=starts is not None,
        HAS_INIT=init is not None, num_warps=4,
    )
    return theta


def angles_bwd(dt, angles, starts, dtheta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: Δ's gradient as (b, l, h, k) float32 partials (one per block of angles, summed by the
    caller), the angles' gradient in their dtype and the initial angles' (b, h, a) float32."""
    b, l, h, a = angles.shape
    dang = torch.empty(b, l, h, a, device=dt.device, dtype=angles.dtype)  # stored in its dtype: no cast after
    dinit = torch.empty(b, h, a, device=dt.device, dtype=torch.float32)
    if a == 0:  # no rotary pair: Δ gets no gradient from the angles (one zero partial: callers read at least one)
        return torch.zeros(b, l, h, 1, device=dt.device, dtype=torch.float32), dang, dinit
    BA = min(_COLS, next_power_of_2(a))
    ncb = cdiv(a, BA)
    ddt = torch.empty(b, l, h, ncb, device=dt.device, dtype=torch.float32)
    _angles_bwd[(b * h, ncb)](
        dt, angles, dt if starts is None else starts, dtheta.contiguous(), ddt, dang, dinit,
        l, h, a, *angles.stride(), BA=BA, BL=_BLOCK, HAS_DOC=starts is not None, num_warps=4,
    )
    return ddt, dang, dinit


class _Angles(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dt, angles, starts, init):
        ctx.save_for_backward(dt, angles, starts)
        ctx.has_init = init is not None
        return angles_fwd(dt, angles, starts, init)

    @staticmethod
    @once_differentiable
    def backward(ctx, dtheta):
        ddt, dang, dinit = angles_bwd(*ctx.saved_tensors, dtheta)
        ddt = ddt.sum(-1) if ddt.shape[-1] > 1 else ddt.view(ddt.shape[:-1])
        return ddt, dang, None, dinit if ctx.has_init else None


def rotary_angles_triton(
    dt: torch.Tensor,
    angles: torch.Tensor,
    seq_idx: torch.Tensor | None,
    initial: torch.Tensor | None,
) -> torch.Tensor:
    """θ (b, l, h, a) float32 from dt (b, l, h) and angle logits (b, l, h, a): the running sum of
    Δ π tanh(angles) within each document (from ``initial`` (b, h, a) in the first), modulo 2π, as
    ``chunked.rotary_angles`` of ``prepare``'s dtheta. Gradients reach dt, angles and ``initial``."""
    starts = None if seq_idx is None else doc_starts(seq_idx).to(torch.int32).contiguous()
    return _Angles.apply(dt.float().contiguous(), angles, starts, None if initial is None else initial.float().contiguous())
