"""The checked, broadcast-ready arguments of one decode step as every backend takes them."""

from __future__ import annotations

import dataclasses

import torch

from ssmkit.ops._inputs import OpInputs

__all__ = ["StepInputs"]


@dataclasses.dataclass(frozen=True)
class StepInputs(OpInputs):
    """``selective_state_update``'s arguments in the full Mamba-2 form: state (b, h, p, n), x, z (b, h, p);
    dt (b, h, p or 1); A (h, p or 1, n or 1); B, C (b, g, n); D, dt_bias (h, p or 1)."""

    state: torch.Tensor
    x: torch.Tensor
    dt: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor | None
    z: torch.Tensor | None
    dt_bias: torch.Tensor | None
    dt_softplus: bool
    dt_limit: tuple[float, float]
