"""Activation checkpointing of the short convolution shared by the fused layer functions."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ssmkit.ops.causal_conv1d import causal_conv1d_fn


def conv_recomputed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    activation: str | None,
    backend: str,
    recompute: bool = True,
) -> torch.Tensor:
    """``causal_conv1d_fn(x, weight, bias, seq_idx, activation=activation)`` (x (b, d, l)).

    When a gradient is needed and ``recompute``, the convolution's own saved values (its pre-activation
    output, as large as x) are dropped after the forward and recomputed in the backward: one depthwise
    convolution, cheap next to the scan that follows.
    """

    def run(x_, weight_, bias_):
        return causal_conv1d_fn(x_, weight_, bias_, seq_idx, activation=activation, backend=backend)

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    )
    if recompute and needs_grad:
        return checkpoint(run, x, weight, bias, use_reentrant=False)
    return run(x, weight, bias)
