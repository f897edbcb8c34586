"""The checked arguments of one norm call as every backend takes them: :class:`NormInputs` (``rms_norm_fn``)
and :class:`GatedNormInputs` (``gated_rms_norm_fn``, ``layernorm_fn``)."""

from __future__ import annotations

import dataclasses

import torch

from ssmkit.ops._inputs import OpInputs

__all__ = ["GatedNormInputs", "NormInputs"]


@dataclasses.dataclass(frozen=True)
class NormInputs(OpInputs):
    """Arguments of ``rms_norm_fn`` (see there): x, residual (..., d); weight, bias (d,)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    residual: torch.Tensor | None
    prenorm: bool
    residual_in_fp32: bool
    eps: float


@dataclasses.dataclass(frozen=True)
class GatedNormInputs(OpInputs):
    """Arguments of ``gated_rms_norm_fn`` (see there): x, z (..., d); weight, bias (d,); ``center``: LayerNorm."""

    x: torch.Tensor
    z: torch.Tensor | None
    weight: torch.Tensor
    eps: float
    group_size: int | None
    norm_before_gate: bool
    bias: torch.Tensor | None
    center: bool
