"""The checked arguments of one convolution (:class:`ConvInputs`) or decode step (:class:`ConvStepInputs`)
as every backend takes them: the public functions check, then build these; a backend neither re-checks them
nor repeats the functions' argument lists."""

from __future__ import annotations

import dataclasses

import torch

from ssmkit.ops._inputs import OpInputs

__all__ = ["ConvInputs", "ConvStepInputs"]


@dataclasses.dataclass(frozen=True)
class ConvInputs(OpInputs):
    """Arguments of ``causal_conv1d_fn`` (see there): x (b, d, l), weight (d, w), bias (d,), seq_idx (b, l),
    initial_states (b, d, w - 1)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    seq_idx: torch.Tensor | None
    initial_states: torch.Tensor | None
    return_final_states: bool
    activation: str | None


@dataclasses.dataclass(frozen=True)
class ConvStepInputs(OpInputs):
    """Arguments of ``causal_conv1d_update`` (see there): x (b, d) or (b, d, l), conv_state (b or slots, d,
    state_len), weight (d, w), bias (d,), cache_seqlens (b,), conv_state_indices (b,)."""

    x: torch.Tensor
    conv_state: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    activation: str | None
    cache_seqlens: torch.Tensor | None
    conv_state_indices: torch.Tensor | None
