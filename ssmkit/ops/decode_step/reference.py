"""The fused decode steps' definitions: the separate decode ops in order.

``backend="reference"`` gives every op's float64-exact reference (the definition the Triton kernels are
tested against); ``"auto"`` the separate ops as the layers ran them before the fused kernels (each on its
own kernel on CUDA), the path for what the fused kernels do not take.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops.causal_conv1d import causal_conv1d_update
from ssmkit.ops.decode_step.inputs import ConvStepInputs2, InnerStepInputs
from ssmkit.ops.norm import rms_norm_fn
from ssmkit.ops.state_update import selective_state_update

__all__ = ["conv_step_composed", "inner_step_composed"]


def conv_step_composed(inputs: ConvStepInputs2, backend: str) -> torch.Tensor:
    """Convolution update + SiLU of xBC, split into x, B, C, then the selective state update: y (b, h, p)."""
    xBC, conv_state, weight, bias, state, dt, A, D, z, dt_bias, ngroups, softplus, dt_limit = inputs.unpack()
    _, h, p, n = state.shape
    xBC = causal_conv1d_update(xBC, conv_state, weight, bias, activation="silu", backend=backend)
    x, B, C = xBC.split([h * p, ngroups * n, ngroups * n], dim=-1)
    return selective_state_update(
        state, x.unflatten(-1, (h, p)), dt, A, B.unflatten(-1, (ngroups, n)), C.unflatten(-1, (ngroups, n)), D,
        z, dt_bias, softplus, dt_limit=dt_limit, backend=backend,
    )


def inner_step_composed(inputs: InnerStepInputs, backend: str) -> torch.Tensor:
    """Convolution update + SiLU of x, x_proj, the optional norms, dt_proj, the state update gated by
    silu(z): y (b, d)."""
    (xz, conv_state, weight, bias, x_proj_weight, dt_proj_weight, dt_proj_bias, state, A, D, dt_rms, b_rms, c_rms,
     eps, softplus) = inputs.unpack()
    n = state.shape[-1]
    rank = dt_proj_weight.shape[1]
    x, z = xz.chunk(2, dim=-1)
    x = causal_conv1d_update(x, conv_state, weight, bias, activation="silu", backend=backend)
    dt, B, C = F.linear(x, x_proj_weight).split([rank, n, n], dim=-1)
    norm_backend = "reference" if backend == "reference" else "auto"
    if dt_rms is not None:
        dt = rms_norm_fn(dt, dt_rms, eps=eps, backend=norm_backend)
    if b_rms is not None:
        B = rms_norm_fn(B, b_rms, eps=eps, backend=norm_backend)
    if c_rms is not None:
        C = rms_norm_fn(C, c_rms, eps=eps, backend=norm_backend)
    return selective_state_update(state, x, F.linear(dt, dt_proj_weight), A, B, C, D, z, dt_proj_bias, softplus,
                                  backend=backend)
