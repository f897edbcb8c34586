"""Fast RMS norms: one autograd Function with a hand-written backward (as mamba_ssm's Triton kernels).

Letting autograd differentiate the formula keeps several (..., n) intermediates alive and runs about
ten elementwise passes backwards; this Function saves only its inputs and the per-group 1/rms, and
recomputes the normalised values in the backward (the usual fused-norm trade of a little compute for
memory traffic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops._precision import compute_dtype
from ssmkit.ops.norm.inputs import GatedNormInputs, NormInputs
from ssmkit.ops.norm.reference import residual_dtype


def _grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """(..., n) -> (M, n / g, g)."""
    return t.reshape(-1, t.shape[-1] // group_size, group_size)


class _GatedRMSNorm(torch.autograd.Function):
    """y = norm(x [* silu(z)]) * weight + bias [* silu(z)], group-wise; all inputs in one dtype.

    norm is RMSNorm, or LayerNorm (the group's mean subtracted first) when ``center``.

    Every full-size temporary is written in place where it is not needed any more: on CPU each fresh
    buffer of a few megabytes costs page faults comparable to the arithmetic.
    """

    @staticmethod
    def forward(ctx, x, z, weight, bias, eps, group_size, norm_before_gate, center=False):
        h = F.silu(z).mul_(x) if z is not None and not norm_before_gate else x
        hg = _grouped(h, group_size)
        if center:
            hg = hg - hg.mean(dim=-1, keepdim=True)
        # vector_norm reads the group once without materialising its square.
        rstd = torch.linalg.vector_norm(hg, dim=-1, keepdim=True).square_().div_(group_size).add_(eps).rsqrt_()
        y = (hg * rstd).reshape(x.shape).mul_(weight)
        if bias is not None:
            y.add_(bias)
        if z is not None and norm_before_gate:
            y.mul_(F.silu(z))
        ctx.save_for_backward(x, z, weight, bias, rstd)
        ctx.group_size = group_size
        ctx.norm_before_gate = norm_before_gate
        ctx.center = center
        return y

    @staticmethod
    def backward(ctx, dout):
        x, z, weight, bias, rstd = ctx.saved_tensors
        group_size, norm_before_gate = ctx.group_size, ctx.norm_before_gate
        n = x.shape[-1]
        gate_first = z is not None and not norm_before_gate
        if z is not None:
            sig = torch.sigmoid(z)
            silu_z = z * sig
            # d silu(z) / dz = sigmoid(z) * (1 + z * (1 - sigmoid(z))), built in one buffer.
            silu_grad = torch.rsub(sig, 1.0).mul_(z).add_(1.0).mul_(sig)
        h = x * silu_z if gate_first else x
        hg = _grouped(h, group_size)
        if ctx.center:
            hg = hg - hg.mean(dim=-1, keepdim=True)
        xhat = (hg * rstd).reshape(x.shape)
        dz = None
        if z is not None and norm_before_gate:
            y = xhat * weight
            if bias is not None:
                y.add_(bias)
            dz = y.mul_(dout).mul_(silu_grad)
            dy = silu_z.mul_(dout)
        else:
            dy = dout
        dbias = dy.reshape(-1, n).sum(dim=0) if bias is not None and ctx.needs_input_grad[3] else None
        # d/dh of (h * rstd): remove the component along xhat within each group, then scale.
        wdy = _grouped(dy * weight, group_size)
        xhat_g = _grouped(xhat, group_size)
        c = (xhat_g * wdy).mean(dim=-1, keepdim=True)
        if ctx.center:
            # LayerNorm: the mean's gradient removes the component along the constant vector too.
            wdy = wdy - wdy.mean(dim=-1, keepdim=True)
        dh = wdy.addcmul_(xhat_g, c, value=-1.0).mul_(rstd).reshape(x.shape)
        dweight = xhat.mul_(dy).reshape(-1, n).sum(dim=0) if ctx.needs_input_grad[2] else None
        if gate_first:
            dz = (dh * x).mul_(silu_grad)
            dh = dh.mul_(silu_z)
        return dh, dz, dweight, dbias, None, None, None, None


def rms_norm_chunked(inputs: NormInputs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fast path of :func:`ssmkit.ops.norm.rms_norm_fn` (same arguments and results)."""
    x, weight, bias, residual, prenorm, residual_in_fp32, eps = inputs.unpack()
    cdtype = compute_dtype(x, weight, bias, residual)
    h = x.to(cdtype)
    if residual is not None:
        h = h + residual.to(cdtype)
    b = bias.to(cdtype) if bias is not None else None
    out = _GatedRMSNorm.apply(h, None, weight.to(cdtype), b, eps, h.shape[-1], True).to(x.dtype)
    if not prenorm:
        return out
    return out, h.to(residual_dtype(x, residual, residual_in_fp32))


def gated_rms_norm_chunked(inputs: GatedNormInputs) -> torch.Tensor:
    """Fast path of :func:`ssmkit.ops.norm.gated_rms_norm_fn` (same arguments and results)."""
    x, z, weight, eps, group_size, norm_before_gate, bias, center = inputs.unpack()
    cdtype = compute_dtype(x, z, weight, bias)
    zc = z.to(cdtype) if z is not None else None
    b = bias.to(cdtype) if bias is not None else None
    out = _GatedRMSNorm.apply(
        x.to(cdtype), zc, weight.to(cdtype), b, eps, group_size or x.shape[-1], norm_before_gate, center
    )
    return out.to(x.dtype)
