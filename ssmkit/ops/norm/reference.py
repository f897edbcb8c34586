"""Plain formulas for the RMS norms (the definition the fast path is tested against).

Glossary:
    ...  any leading dimensions (batch, length, heads)
    n    normalised (last) dimension, split into n / g groups of g = group_size entries
    rms(v) = sqrt(mean(v ** 2) + eps) over one group;  silu(z) = z * sigmoid(z)

    rms_norm:        h = x + residual;           y = h / rms(h) * weight + bias
    gated, before:   y = (x / rms(x) * weight + bias) * silu(z)        (norm_before_gate=True)
    gated, after:    h = x * silu(z);  y = h / rms(h) * weight + bias  (norm_before_gate=False)

Math is done in float32 at least (float64 inputs stay float64); outputs come back in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops._precision import compute_dtype
from ssmkit.ops.norm.inputs import GatedNormInputs, NormInputs


def residual_dtype(x: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool) -> torch.dtype:
    """dtype of the returned residual stream: the incoming one's (or x's), raised to float32 on request."""
    dtype = residual.dtype if residual is not None else x.dtype
    return torch.promote_types(dtype, torch.float32) if residual_in_fp32 else dtype


def _rms_normalize(h: torch.Tensor, eps: float, group_size: int, center: bool = False) -> torch.Tensor:
    """Each group of ``group_size`` entries divided by its RMS (LayerNorm: minus its mean first)."""
    groups = h.reshape(*h.shape[:-1], h.shape[-1] // group_size, group_size)
    if center:
        groups = groups - groups.mean(dim=-1, keepdim=True)
    rms = torch.sqrt(groups.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (groups / rms).reshape(h.shape)


def rms_norm_ref(inputs: NormInputs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """See :func:`ssmkit.ops.norm.rms_norm_fn`."""
    x, weight, bias, residual, prenorm, residual_in_fp32, eps = inputs.unpack()
    cdtype = compute_dtype(x, weight, bias, residual)
    h = x.to(cdtype)
    if residual is not None:
        h = h + residual.to(cdtype)
    y = _rms_normalize(h, eps, h.shape[-1]) * weight.to(cdtype)
    if bias is not None:
        y = y + bias.to(cdtype)
    out = y.to(x.dtype)
    if not prenorm:
        return out
    return out, h.to(residual_dtype(x, residual, residual_in_fp32))


def gated_rms_norm_ref(inputs: GatedNormInputs) -> torch.Tensor:
    """See :func:`ssmkit.ops.norm.gated_rms_norm_fn` (``center``: LayerNorm, :func:`~ssmkit.ops.norm.layernorm_fn`)."""
    x, z, weight, eps, group_size, norm_before_gate, bias, center = inputs.unpack()
    cdtype = compute_dtype(x, z, weight, bias)
    h = x.to(cdtype)
    gate = F.silu(z.to(cdtype)) if z is not None else None
    if gate is not None and not norm_before_gate:
        h = h * gate
    y = _rms_normalize(h, eps, group_size or h.shape[-1], center) * weight.to(cdtype)
    if bias is not None:
        y = y + bias.to(cdtype)
    if gate is not None and norm_before_gate:
        y = y * gate
    return y.to(x.dtype)
