"""The checked arguments of the fused decode steps as every backend takes them."""

from __future__ import annotations

import dataclasses

import torch

from ssmkit.ops._inputs import OpInputs

__all__ = ["COUNTERS_ATTR", "ConvStepInputs2", "InnerStepInputs"]

# The attribute of a conv state tensor that holds the step kernels' zeroed int32 ticket counters.
COUNTERS_ATTR = "_ssmkit_step_counters"


@dataclasses.dataclass(frozen=True)
class ConvStepInputs2(OpInputs):
    """``conv1d_selective_state_update``'s arguments (Mamba-2): xBC (b, conv_dim) before the convolution,
    conv_state (b, conv_dim, S), conv_weight (conv_dim, w), conv_bias (conv_dim,) or None; state (b, h, p, n),
    dt (b, h), A (h,), D (h,) or (h, p) or None, z (b, h, p) or None, dt_bias (h,) or None."""

    xBC: torch.Tensor
    conv_state: torch.Tensor
    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None
    state: torch.Tensor
    dt: torch.Tensor
    A: torch.Tensor
    D: torch.Tensor | None
    z: torch.Tensor | None
    dt_bias: torch.Tensor | None
    ngroups: int
    dt_softplus: bool
    dt_limit: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class InnerStepInputs(OpInputs):
    """``mamba_inner_step``'s arguments (Mamba-1): xz (b, 2d) = [x, z] before the convolution, conv_state
    (b, d, S), conv_weight (d, w), conv_bias (d,) or None, x_proj_weight (R + 2N, d), dt_proj_weight (d, R),
    dt_proj_bias (d,) or None, state (b, d, N), A (d, N), D (d,) or None; the optional RMSNorm weights of dt
    (R,), B and C (N,) with their eps."""

    xz: torch.Tensor
    conv_state: torch.Tensor
    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None
    x_proj_weight: torch.Tensor
    dt_proj_weight: torch.Tensor
    dt_proj_bias: torch.Tensor | None
    state: torch.Tensor
    A: torch.Tensor
    D: torch.Tensor | None
    dt_rms_weight: torch.Tensor | None
    b_rms_weight: torch.Tensor | None
    c_rms_weight: torch.Tensor | None
    rms_eps: float
    dt_softplus: bool
