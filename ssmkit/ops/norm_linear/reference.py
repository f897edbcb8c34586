"""The definition of the fused norm + linear: the two ops one after the other, as the unfused layer runs them.

    normed = gated_rms_norm(x, z, norm_weight, eps, group_size, norm_before_gate)   (z=None: plain RMS norm)
    out    = linear(normed in weight's dtype, weight, bias)                         (weight's dtype)
    out    = residual + out                                                         (when residual is given)

Rounding the normalised activations to the weight's dtype before the matmul is what a block does when it
feeds its norm's output to a bf16 ``nn.Linear``; the fused kernel rounds at the same place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops.norm.inputs import GatedNormInputs
from ssmkit.ops.norm.reference import gated_rms_norm_ref
from ssmkit.ops.norm_linear.inputs import NormLinearInputs


def rms_norm_linear_ref(inputs: NormLinearInputs) -> torch.Tensor:
    """See :func:`ssmkit.ops.norm_linear.rms_norm_linear`."""
    x, norm_weight, weight, bias, z, eps, group_size, norm_before_gate, residual = inputs.unpack()
    normed = gated_rms_norm_ref(GatedNormInputs(x, z, norm_weight, eps, group_size, norm_before_gate, None, False))
    return project(normed, weight, bias, residual)


def project(normed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            residual: torch.Tensor | None) -> torch.Tensor:
    """The part after the norm: round to weight's dtype, ``F.linear``, add the residual."""
    out = F.linear(normed.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
    return out if residual is None else residual + out
