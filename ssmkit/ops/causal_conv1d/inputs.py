"""The checked arguments of one convolution (:class:`ConvInputs`) or decode step (:class:`ConvStepInputs`)
as every backend takes them: the public functions check, then build these; a backend neither re-checks them
nor repeats the functions' argument lists."""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["ConvInputs", "ConvStepInputs"]


class _Unpack:
    def unpack(self) -> tuple:
        """The fields in order, the tensors themselves (``dataclasses.astuple`` would copy them)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclasses.dataclass(frozen=True)
class ConvInputs(_Unpack):
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
class ConvStepInputs(_Unpack):
    """Arguments of ``causal_conv1d_update`` (see there): x (b, d) or (b, d, l), conv_state (b or slots, d,
    state_len), weight (d, w), bias (d,), cache_seqlens (b,), conv_state_indices (b,)."""

    x: torch.Tensor
    conv_state: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    activation: str | None
    cache_seqlens: torch.Tensor | None
    conv_state_indices: torch.Tensor | None
