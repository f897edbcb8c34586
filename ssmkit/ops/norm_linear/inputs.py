"""The checked arguments of one ``rms_norm_linear`` call as every backend takes them."""

from __future__ import annotations

import dataclasses

import torch

from ssmkit.ops._inputs import OpInputs

__all__ = ["NormLinearInputs"]


@dataclasses.dataclass(frozen=True)
class NormLinearInputs(OpInputs):
    """Arguments of ``rms_norm_linear`` (see there): x, z (m, k); norm_weight (k,); weight (n, k); bias (n,);
    residual (m, n); ``eps`` a float."""

    x: torch.Tensor
    norm_weight: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    z: torch.Tensor | None
    eps: float
    group_size: int | None
    norm_before_gate: bool
    residual: torch.Tensor | None
