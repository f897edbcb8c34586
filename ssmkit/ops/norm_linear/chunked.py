"""The unfused path: the norm op (its Triton kernel on CUDA), then the reference's cast, ``F.linear`` and
add, as a block runs them outside decode steps. Used for many rows (where cuBLAS's matmul wins), under
autograd and wherever the fused kernel does not apply."""

from __future__ import annotations

import torch

from ssmkit.ops.norm import gated_rms_norm_fn
from ssmkit.ops.norm_linear.inputs import NormLinearInputs
from ssmkit.ops.norm_linear.reference import project


def rms_norm_linear_chunked(inputs: NormLinearInputs) -> torch.Tensor:
    """See :func:`ssmkit.ops.norm_linear.rms_norm_linear`."""
    x, norm_weight, weight, bias, z, eps, group_size, norm_before_gate, residual = inputs.unpack()
    return project(gated_rms_norm_fn(x, z, norm_weight, eps, group_size, norm_before_gate), weight, bias, residual)
