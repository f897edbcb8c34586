"""The SSD route's per-(position, head) scalars and its rotary angles in one autograd node, from Δ.

``via_ssd.py`` needs, from Δ, A, the trapezoid logits and the angle logits, the SSD op's decay step -ΔA, its
input weight w, the next share δ_next (``triton_step_sizes.py``) and θ (``triton_angles.py``). Made apart, they
are two autograd nodes, and Δ's gradient arrives in two parts that autograd adds (with a reduction of the
angle kernel's per-block partials before): two launches and a node of host time each step, at sizes where the
layer is bound by the host. Here one node launches both kernels each way and the step weights' backward kernel
adds the angles' partials of dΔ itself.
"""

from __future__ import annotations

import torch

from ssmkit.ops.mamba3.triton_angles import angles_bwd, angles_fwd
from ssmkit.ops.mamba3.triton_step_sizes import step_weights_bwd, step_weights_fwd
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
    def backward(ctx, g_sdt, g_w, g_nxt, dtheta):
        dt, A, trap, angles, starts = ctx.saved_tensors
        ddt_angles, dang, dinit = angles_bwd(dt, angles, starts, dtheta)
        ddt, dA, dtrap = step_weights_bwd(dt, A, trap, starts, g_sdt, g_w, g_nxt, ddt_angles)
        return ddt, dA, dtrap, dang, None, dinit if ctx.has_init else None


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
    starts = None if seq_idx is None else doc_starts(seq_idx).to(torch.int32).contiguous()
    return _RouteScalars.apply(dt.float().contiguous(), A.float().contiguous(), trap, angles, starts,
                               None if initial is None else initial.float().contiguous())
