"""RMSNorm and Mamba-2's gated RMSNorm as modules over :mod:`ssmkit.ops` (statistics in float32)."""

from __future__ import annotations

import torch
from torch import nn

from ssmkit import ops


def no_weight_decay(*params: nn.Parameter | None) -> None:
    """Mark parameters to be kept out of weight decay (mamba_ssm's ``_no_weight_decay`` attribute)."""
    for p in params:
        if p is not None:
            p._no_weight_decay = True


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x²) + eps) · weight`` over the last dimension.

    Args:
        d: size of the last dimension. eps: added to the mean square.

    Shapes: x (..., d) -> (..., d), in x's dtype.

    Example::

        norm = RMSNorm(64)
        y = norm(torch.randn(2, 10, 64))
    """

    def __init__(self, d: int, eps: float = 1e-5, *, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        no_weight_decay(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm_fn(x, self.weight, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RMSNormGated(nn.Module):
    """Mamba-2's gated RMSNorm over groups of ``group_size`` channels.

    ``norm_before_gate=False`` (Mamba-2's default): ``norm(x · silu(z)) · weight``;
    ``True``: ``norm(x) · weight · silu(z)``. The mean square is taken per group of ``group_size``
    consecutive channels (``d_inner / ngroups`` in Mamba-2).

    Shapes: x, z (..., d) -> (..., d), in x's dtype.

    Example::

        norm = RMSNormGated(128, group_size=64)
        y = norm(torch.randn(2, 10, 128), torch.randn(2, 10, 128))
    """

    def __init__(self, d: int, eps: float = 1e-5, *, group_size: int | None = None, norm_before_gate: bool = False,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = d if group_size is None else group_size
        if d % self.group_size:
            raise ValueError(f"RMSNormGated: group_size {self.group_size} must divide d={d}")
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        no_weight_decay(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        return ops.gated_rms_norm_fn(x, z, self.weight, eps=self.eps, group_size=self.group_size,
                                     norm_before_gate=self.norm_before_gate)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")
