"""Mamba-3's per-(position, head) scalars: the step Δ, the decay rate A and, for the SSD route, its decay step
and input weight. PyTorch forms here (the definitions; float64 and CPUs), Triton kernels that fuse each into
one launch a direction in ``triton_step_sizes.py``.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

from ssmkit.ops.backend import resolve_backend
from ssmkit.ops.mamba3.chunked import next_share

__all__ = ["DECAY_ACTIVATIONS", "DecayActivation", "decay_rate", "dt_and_decay", "step_weights"]

DecayActivation = Literal["softplus", "heavy_tail"]
"""How Mamba-3 maps dd_A to its decay rate (see :func:`decay_rate`)."""
DECAY_ACTIVATIONS: tuple[str, ...] = get_args(DecayActivation)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def decay_rate(dd_A: torch.Tensor, A_floor: float, activation: DecayActivation) -> torch.Tensor:
    """Mamba-3's data-dependent decay rate A = -max(f(dd_A), A_floor), computed in at least float32.

    ``activation`` picks f:

    * ``"heavy_tail"`` (mamba_ssm after release 2.3.2, state-spaces/mamba #962, what new Mamba-3 checkpoints
      are trained with): f(x) = 1 + x for x >= 0 and 1 / (1 - x) for x < 0. Its slow negative tail keeps A
      away from 0 where softplus would vanish (softplus let training diverge at high learning rates).
      f is C¹ at 0 (f(0) = 1, f'(0) = 1 from both sides; f'' jumps from 2 to 0), and its gradient at exactly
      0 is that 1. (mamba_ssm writes f as ``clamp_min(x, 0) + 1 / (1 - clamp_max(x, 0))``, whose autograd
      gradient at exactly x = 0 is 2, as both clamps pass it; the values are the same bits.)
    * ``"softplus"`` (mamba_ssm 2.3.2): f = softplus.

    dd_A: any shape; returns A of that shape, negative.
    """
    x = _at_least_fp32(dd_A)
    if activation == "heavy_tail":
        f = torch.where(x >= 0, 1 + x, torch.reciprocal(1 - x.clamp(max=0)))
    elif activation == "softplus":
        f = F.softplus(x)
    else:
        raise ValueError(f"decay activation must be one of {DECAY_ACTIVATIONS}, got {activation!r}")
    return (-f).clamp(max=-A_floor)


def dt_and_decay(dd_dt: torch.Tensor, dd_A: torch.Tensor, dt_bias: torch.Tensor, A_floor: float,
                 activation: DecayActivation, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Δ = softplus(dd_dt + dt_bias) and A = :func:`decay_rate` (dd_A), each (b, l, h) in at least float32.

    dd_dt, dd_A: (b, l, h), any strides (slices of an in-projection's output); dt_bias: (h,). ``backend``
    "auto" takes the fused Triton kernels on CUDA for non-float64 inputs (one launch forward, one backward,
    where PyTorch takes about ten each way), else PyTorch; "triton" forces them (or Triton's interpreter).
    """
    if activation not in DECAY_ACTIVATIONS:
        raise ValueError(f"decay activation must be one of {DECAY_ACTIVATIONS}, got {activation!r}")
    float64 = torch.float64 in (dd_dt.dtype, dd_A.dtype, dt_bias.dtype)
    if dd_dt.dim() == 3 and dd_A.shape == dd_dt.shape and not float64 and _triton(backend, dd_dt.device):
        from ssmkit.ops.mamba3.triton_step_sizes import dt_decay_triton

        return dt_decay_triton(dd_dt, dd_A, dt_bias, A_floor, activation == "heavy_tail")
    return F.softplus(_at_least_fp32(dd_dt) + dt_bias), decay_rate(dd_A, A_floor, activation)


def step_weights(dt: torch.Tensor, A: torch.Tensor, trap: torch.Tensor, seq_idx: torch.Tensor | None, *,
                 dtype: torch.dtype, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SSD route's per-(position, head) inputs from Δ, A and the trapezoid logits, each (b, l, h) in ``dtype``:

    * ``-Δ A``, the SSD op's decay step (its A is -1);
    * ``w_t = λ_t Δ_t + δ_{t+1}``, its input weight (λ = sigmoid(trap));
    * ``δ_{t+1} = (1 - λ_{t+1}) Δ_{t+1}``, the next position's trapezoid share: 0 where t + 1 starts a document
      (``seq_idx``) or is past the end.

    (``via_ssd.py`` derives them.) ``backend`` as in :func:`dt_and_decay`; float64 always takes PyTorch.
    """
    if dtype != torch.float64 and _triton(backend, dt.device):
        from ssmkit.ops.mamba3.triton_step_sizes import step_weights_triton

        return step_weights_triton(dt, A, trap, seq_idx)
    dt = dt.to(dtype)
    lam = torch.sigmoid(trap.to(dtype))
    nxt = next_share((1 - lam) * dt, seq_idx)
    return -(dt * A.to(dtype)), lam * dt + nxt, nxt


def _triton(backend: str, device: torch.device) -> bool:
    return resolve_backend(backend, device, has_triton=True) == "triton"
