"""Triton kernels of the MIMO route's SSD inputs: x̃ and each sub-step's decay step and input weight, one pass a way.

The SSD op runs MIMO (rank r) as r sub-steps (t, 0) … (t, r-1) per position (``via_ssd.py``). Its x, decay step
and input weight are then (b, l·r, h, p) and (b, l·r, h)::

    x̃_{t,j} = x_t ⊙ mimo_x_j (rounded to the operand dtype)    step_{t,j} = [j = 0] (-Δ_t A_t)    scale_{t,j} = w_t

In PyTorch: a float32 product over (b, l, r, h, p), a cast, a concatenation with zeros and an expand copied by the
SSD op, each with its backward. Here one kernel writes all three in the layout the SSD op reads, and one takes
their gradients back to x, mimo_x, -ΔA and w.

Layouts: x (b·l, h, p) with any row stride (a slice of the layer's in-projection output is read in place);
mimo_x (h, r, p) float32; sdt, w (b·l, h) float32. Outputs x̃ (b·l, r, h, p) in the operand dtype, step and scale
(b·l, r, h) float32. Forward: a program takes POS positions of one head; backward:
a run of positions of one head, mimo_x's gradient summed over the run in registers (one partial per program).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ssmkit.ops._host import cdiv, next_power_of_2
from ssmkit.ops.mamba3.triton_mimo_output import (
    _BWD_PROGRAMS,
    _tile_inputs,
    position_rows,
)
from ssmkit.ops.mamba3.triton_rotary import _TL

_POS = 8
_WARPS = 4


@triton.jit(do_not_specialize=["R"])
def _mimo_inputs_fwd(
    x_ptr, mx_ptr, sdt_ptr, w_ptr, xt_ptr, step_ptr, scale_ptr, R, H, s_x,
    RANK: tl.constexpr, RP: tl.constexpr, P: tl.constexpr, BP: tl.constexpr, POS: tl.constexpr,
    HAS_MX: tl.constexpr, OPS: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * POS
    hh = tl.program_id(1)
    lp, rk, cols = tl.arange(0, POS), tl.arange(0, RP), tl.arange(0, BP)
    pm, km = start + lp < R, rk < RANK
    m2 = pm[:, None] & km[None, :]
    _, _, xt = _tile_inputs(x_ptr, s_x, mx_ptr, start, R, hh, RANK, RP, P, BP, POS, HAS_MX, OPS)
    sub = (lp[:, None] * RANK + rk[None, :]) * H  # (positions, ranks): the sub-step rows, from the block's first
    first = start * RANK * H + hh
    tl.store(xt_ptr + first * P + sub[:, :, None] * P + cols[None, None, :], xt.to(xt_ptr.dtype.element_ty),
             mask=m2[:, :, None] & (cols < P)[None, None, :])
    sdt = tl.load(sdt_ptr + start * H + hh + lp * H, mask=pm, other=0.0)
    w = tl.load(w_ptr + start * H + hh + lp * H, mask=pm, other=0.0)
    tl.store(step_ptr + first + sub, tl.where(rk[None, :] == 0, sdt[:, None], 0.0), mask=m2)
    tl.store(scale_ptr + first + sub, tl.broadcast_to(w[:, None], (POS, RP)), mask=m2)


@triton.jit(do_not_specialize=["R"])
def _mimo_inputs_bwd(
    x_ptr, mx_ptr, dxt_ptr, dstep_ptr, dscale_ptr, dx_ptr, dmx_ptr, dsdt_ptr, dw_ptr, R, H, s_x, RUN,
    RANK: tl.constexpr, RP: tl.constexpr, P: tl.constexpr, BP: tl.constexpr, POS: tl.constexpr,
    HAS_MX: tl.constexpr, HAS_DSTEP: tl.constexpr, HAS_DSCALE: tl.constexpr,
):
    run = tl.program_id(0)
    hh = tl.program_id(1)
    lp, rk, cols = tl.arange(0, POS), tl.arange(0, RP), tl.arange(0, BP)
    km, cm = rk < RANK, cols < P
    if HAS_MX:
        mx = tl.load(mx_ptr + (hh * RANK + rk[:, None]) * P + cols[None, :], mask=km[:, None] & cm[None, :], other=0.0)
    else:
        mx = tl.where(km[:, None] & cm[None, :], 1.0, 0.0)
    dmx = tl.zeros((RP, BP), dtype=tl.float32)
    begin = run.to(tl.int64) * RUN
    for start in range(begin, tl.minimum(begin + RUN, R), POS):
        pm = start + lp < R
        m2 = pm[:, None] & km[None, :]
        pmask = pm[:, None] & cm[None, :]
        prow = (start * H + hh) * P + lp[:, None] * (H * P) + cols[None, :]
        sub = (lp[:, None] * RANK + rk[None, :]) * H
        first = start * RANK * H + hh
        g = tl.load(dxt_ptr + first * P + sub[:, :, None] * P + cols[None, None, :],
                    mask=m2[:, :, None] & cm[None, None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + start * s_x + hh * P + lp[:, None] * s_x + cols[None, :], mask=pmask,
                    other=0.0).to(tl.float32)
        tl.store(dx_ptr + prow, tl.sum(g * mx[None, :, :], 1).to(dx_ptr.dtype.element_ty), mask=pmask)
        dmx += tl.sum(g * x[:, None, :], 0)
        if HAS_DSTEP:  # only the first sub-step carries the decay
            dsdt = tl.load(dstep_ptr + first + lp * (RANK * H), mask=pm, other=0.0)
        else:
            dsdt = tl.zeros((POS,), dtype=tl.float32)
        tl.store(dsdt_ptr + start * H + hh + lp * H, dsdt, mask=pm)
        if HAS_DSCALE:
            dw = tl.sum(tl.load(dscale_ptr + first + sub, mask=m2, other=0.0), 1)
        else:
            dw = tl.zeros((POS,), dtype=tl.float32)
        tl.store(dw_ptr + start * H + hh + lp * H, dw, mask=pm)
    tl.store(dmx_ptr + ((run * H + hh) * RANK + rk[:, None]) * P + cols[None, :], dmx, mask=km[:, None] & cm[None, :])


class _MimoInputs(torch.autograd.Function):
    """x (b, l, h, p), each position's h·p entries contiguous, any row stride; mimo_x (h, r, p) float32 or None; sdt, w (b, l, h) float32 contiguous -> x̃
    (b, l·r, h, p) in ``ops``, step and scale (b, l·r, h) float32."""

    @staticmethod
    def forward(ctx, x, mimo_x, sdt, w, rank, ops):
        b, l, h, p = x.shape
        R = b * l
        xt = torch.empty(b, l * rank, h, p, device=x.device, dtype=ops)
        step = torch.empty(b, l * rank, h, device=x.device, dtype=torch.float32)
        scale = torch.empty_like(step)
        _mimo_inputs_fwd[(cdiv(R, _POS), h)](
            x, w if mimo_x is None else mimo_x, sdt, w, xt, step, scale, R, h, x.stride(1), RANK=rank, RP=next_power_of_2(rank),
            P=p, BP=next_power_of_2(p), POS=_POS, HAS_MX=mimo_x is not None, OPS=_TL[ops], num_warps=_WARPS,
        )
        ctx.save_for_backward(x, mimo_x)
        ctx.rank = rank
        ctx.set_materialize_grads(False)
        return xt, step, scale

    @staticmethod
    @once_differentiable
    def backward(ctx, dxt, dstep, dscale):
        x, mimo_x = ctx.saved_tensors
        rank = ctx.rank
        b, l, h, p = x.shape
        R = b * l
        runs = max(1, min(cdiv(R, _POS), cdiv(_BWD_PROGRAMS, h)))
        run = cdiv(cdiv(R, runs), _POS) * _POS
        runs = cdiv(R, run)
        if dxt is None:
            dxt = torch.zeros(b, l * rank, h, p, device=x.device, dtype=x.dtype)
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)  # contiguous, whatever x's row stride
        dmx = torch.empty(runs, h, rank, p, device=x.device, dtype=torch.float32)
        dsdt = torch.empty(b, l, h, device=x.device, dtype=torch.float32)
        dw = torch.empty_like(dsdt)
        dummy = dsdt
        _mimo_inputs_bwd[(runs, h)](
            x, dummy if mimo_x is None else mimo_x, dxt.contiguous(), dummy if dstep is None else dstep.contiguous(),
            dummy if dscale is None else dscale.contiguous(), dx, dmx, dsdt, dw, R, h, x.stride(1), run, RANK=rank,
            RP=next_power_of_2(rank), P=p, BP=next_power_of_2(p), POS=_POS, HAS_MX=mimo_x is not None,
            HAS_DSTEP=dstep is not None, HAS_DSCALE=dscale is not None, num_warps=_WARPS,
        )
        return dx, None if mimo_x is None else dmx.sum(0), dsdt, dw, None, None


def mimo_inputs_triton(
    x: torch.Tensor,
    mimo_x: torch.Tensor | None,
    sdt: torch.Tensor,
    w: torch.Tensor,
    rank: int,
    ops: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SSD op's x, decay step and input weight for r sub-steps a position (module docstring): x̃ (b, l·r, h, p)
    in ``ops``, step and scale (b, l·r, h) float32; with gradients of x, mimo_x (h, r, p), sdt and w (b, l, h)."""
    if ops not in _TL:
        raise ValueError(f"mimo_inputs_triton: operand dtype {ops} must be bf16/fp16/fp32")
    return _MimoInputs.apply(position_rows(x), None if mimo_x is None else mimo_x.float().contiguous(),
                             sdt.float().contiguous(), w.float().contiguous(), int(rank), ops)
