"""``mamba_ssm.ops.triton.layernorm_gated``: the gated RMS/Layer norm of Mamba-2, as functions and modules."""

from __future__ import annotations

import functools

import torch

from ssmkit.ops.norm import layernorm_fn, rmsnorm_fn

rms_norm_ref = functools.partial(rmsnorm_fn, backend="reference")

__all__ = ["LayerNorm", "RMSNorm", "layernorm_fn", "rms_norm_ref", "rmsnorm_fn"]


class _GatedNorm(torch.nn.Module):
    def __init__(self, hidden_size: int, eps: float, group_size: int | None, norm_before_gate: bool,
                 bias: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype)) if bias else None

    def reset_parameters(self) -> None:
        torch.nn.init.ones_(self.weight)
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)


class LayerNorm(_GatedNorm):
    """Gated group LayerNorm with weight and bias: ``norm(x) · silu(z)`` or ``norm(x · silu(z))``.

    Example:
        >>> norm = LayerNorm(64, group_size=16, norm_before_gate=False)
        >>> y = norm(torch.randn(2, 5, 64), z=torch.randn(2, 5, 64))
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None) -> None:
        super().__init__(hidden_size, eps, group_size, norm_before_gate, True, device, dtype)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return layernorm_fn(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                            norm_before_gate=self.norm_before_gate)


class RMSNorm(_GatedNorm):
    """Gated group RMSNorm with a weight (no bias), as mamba_ssm's.

    Example:
        >>> norm = RMSNorm(64, group_size=32)
        >>> y = norm(torch.randn(2, 5, 64), z=torch.randn(2, 5, 64))
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None) -> None:
        super().__init__(hidden_size, eps, group_size, norm_before_gate, False, device, dtype)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return rmsnorm_fn(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                          norm_before_gate=self.norm_before_gate)
