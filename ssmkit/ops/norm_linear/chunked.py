"""The unfused path: the norm op (its Triton kernel on CUDA), a cast, ``F.linear`` and the add, as a block
runs them outside decode steps. Used for many rows (where cuBLAS's matmul wins), under autograd and
wherever the fused kernel does not apply."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops.norm import gated_rms_norm_fn, rms_norm_fn


def rms_norm_linear_chunked(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None,
    eps: float,
    group_size: int | None,
    norm_before_gate: bool,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """See :func:`ssmkit.ops.norm_linear.rms_norm_linear`."""
    if z is None and group_size in (None, x.shape[-1]):
        normed = rms_norm_fn(x, norm_weight, eps=eps)
    else:
        normed = gated_rms_norm_fn(x, z, norm_weight, eps, group_size, norm_before_gate)
    out = F.linear(normed.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
    return out if residual is None else residual + out
