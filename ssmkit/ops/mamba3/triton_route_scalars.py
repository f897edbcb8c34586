"""The SSD route's per-(position, head) scalars and its rotary angles in one autograd node, from Δ.

``via_ssd.py`` needs, from Δ, A, the trapezoid logits and the angle logits, the SSD op's decay step -ΔA, its
input weight w, the next share δ_next (``triton_step_sizes.py``) and θ (``triton_angles.py``). Made apart, they
are two autograd nodes, and Δ's gradient arrives in two parts that autograd adds (with a reduction of the
angle kernel's per-block partials before): two launches and a node of host time each step, at sizes where the
layer is bound by the host. Here one node launches both kernels each way and the step weights' backward kernel
adds the angles' partials of dΔ itself.

``route_scalars_raw_triton`` goes one step further back for the layer's folded route (``projected.py``): from the
projection's dd_dt, dd_A and dt_bias (Δ and A made inside the step-weight kernels) and the angle logits as the
projection gives them, one set per token (b, l, a), expanded over the heads inside the node.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ssmkit.ops.mamba3.triton_angles import angles_bwd, angles_fwd
from ssmkit.ops.mamba3.triton_step_sizes import (
    RawScalars,
    step_weights_bwd,
    step_weights_fwd,
)
from ssmkit.ops.ssd.reference import doc_starts


class _RouteScalars(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dt, A, trap, angles, starts, init):
        sdt, w, nxt = step_weights_fwd(dt, A, trap, starts)
        theta = angles_fwd(dt, angles, starts, init)
        ctx.save_for_backward(dt, A, trap, angles, starts)
        ctx.has_init = init is not None
        return sdt, w, nxt, theta

    @staticmethod
    @once_differentiable
    def backward(ctx, g_sdt, g_w, g_nxt, dtheta):
        dt, A, trap, angles, starts = ctx.saved_tensors
        ddt_angles, dang, dinit = angles_bwd(dt, angles, starts, dtheta)
        ddt, dA, dtrap = step_weights_bwd(dt, A, trap, starts, g_sdt, g_w, g_nxt, ddt_angles)
        return ddt, dA, dtrap, dang, None, dinit if ctx.has_init else None


def _starts(seq_idx: torch.Tensor | None) -> torch.Tensor | None:
    return None if seq_idx is None else doc_starts(seq_idx).to(torch.int32).contiguous()


def route_scalars_triton(
    dt: torch.Tensor,
    A: torch.Tensor,
    trap: torch.Tensor,
    angles: torch.Tensor,
    seq_idx: torch.Tensor | None,
    initial: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(-ΔA, w, δ_next) (b, l, h) and θ (b, l, h, a), float32, as ``step_weights_triton`` and
    ``rotary_angles_triton`` give them, with gradients of dt, A (b, l, h), trap (b, l, h, any strides), angles
    (b, l, h, a, any strides) and ``initial`` (b, h, a)."""
    return _RouteScalars.apply(dt.float().contiguous(), A.float().contiguous(), trap, angles, _starts(seq_idx),
                               None if initial is None else initial.float().contiguous())


class _RawRouteScalars(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dd_dt, dd_A, dt_bias, trap, angles, starts, init, A_floor, heavy_tail):
        raw = RawScalars(dd_dt, dd_A, dt_bias.float().contiguous(), A_floor, heavy_tail)
        sdt, w, nxt, dt = step_weights_fwd(None, None, trap, starts, raw)
        b, l, h = trap.shape
        heads = angles[:, :, None].expand(b, l, h, angles.shape[-1])  # stride 0 over the heads: no copy
        theta = angles_fwd(dt, heads, starts, init)
        ctx.save_for_backward(dd_dt, dd_A, raw.dt_bias, trap, angles, starts, dt)
        ctx.meta = (A_floor, heavy_tail, init is not None, dt_bias.dtype)
        return sdt, w, nxt, theta

    @staticmethod
    @once_differentiable
    def backward(ctx, g_sdt, g_w, g_nxt, dtheta):
        dd_dt, dd_A, bias, trap, angles, starts, dt = ctx.saved_tensors
        A_floor, heavy_tail, has_init, bias_dtype = ctx.meta
        b, l, h = trap.shape
        heads = angles[:, :, None].expand(b, l, h, angles.shape[-1])
        ddt_angles, dang, dinit = angles_bwd(dt, heads, starts, dtheta)
        raw = RawScalars(dd_dt, dd_A, bias, A_floor, heavy_tail)
        d_ddt, d_ddA, dtrap, dbias = step_weights_bwd(None, None, trap, starts, g_sdt, g_w, g_nxt, ddt_angles, raw)
        return (d_ddt, d_ddA, dbias.to(bias_dtype), dtrap, dang.sum(2), None, dinit if has_init else None, None,
                None)


def route_scalars_raw_triton(
    dd_dt: torch.Tensor,
    dd_A: torch.Tensor,
    dt_bias: torch.Tensor,
    A_floor: float,
    heavy_tail: bool,
    trap: torch.Tensor,
    angles: torch.Tensor,
    seq_idx: torch.Tensor | None,
    initial: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``route_scalars_triton`` of Δ = softplus(dd_dt + dt_bias), A = ``decay_rate(dd_A, A_floor)`` (heavy-tail or
    softplus) and the angle logits shared by the heads, with gradients of dd_dt, dd_A, trap (b, l, h, any strides
    and float dtypes), dt_bias (h,), angles (b, l, a, any strides) and ``initial`` (b, h, a)."""
    return _RawRouteScalars.apply(dd_dt, dd_A, dt_bias, trap, angles, _starts(seq_idx),
                                  None if initial is None else initial.float().contiguous(), float(A_floor),
                                  bool(heavy_tail))
