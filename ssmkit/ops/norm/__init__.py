"""Norms of the Mamba blocks: RMS pre-norm with a fused residual add, and Mamba-2's gated group norm.

The gated norm comes under ssmkit's name (``gated_rms_norm_fn``) and under mamba_ssm's
(``rmsnorm_fn`` / ``layernorm_fn`` of ``mamba_ssm.ops.triton.layernorm_gated``, with their argument
order), where LayerNorm (the group mean subtracted first) is an option.
"""

from __future__ import annotations

import functools

import torch

from ssmkit.ops._checks import Dims, check_nonempty, check_same_device, check_tensor
from ssmkit.ops.backend import resolve_backend
from ssmkit.ops.norm.chunked import gated_rms_norm_chunked, rms_norm_chunked
from ssmkit.ops.norm.inputs import GatedNormInputs, NormInputs
from ssmkit.ops.norm.reference import gated_rms_norm_ref, rms_norm_ref

__all__ = ["gated_rms_norm_fn", "layernorm_fn", "rms_norm_fn", "rmsnorm_fn"]


def _check_x(x: object, dims: Dims) -> tuple[str, ...]:
    """Check x (..., n) and return its dimension names, binding them in ``dims``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (..., n), got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have shape (..., n) with at least one dimension, got a scalar")
    names = _dim_names(x.dim())
    check_tensor("x", x, names, dims)
    for name in names:
        check_nonempty("x", dims[name], "last (normalised)" if name == "n" else "leading")
    return names


@functools.cache
def _dim_names(ndim: int) -> tuple[str, ...]:
    """("s0", ..., "n") for an ndim-dimensional x, built once per ndim (the checks run on every call)."""
    return tuple(f"s{i}" for i in range(ndim - 1)) + ("n",)


def _check_eps(eps: object) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def rms_norm_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    eps: float = 1e-6,
    *,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMS norm over the last dimension with an optional fused residual add (pre-norm blocks).

    ``h = x + residual`` (just x when residual is None), ``out = h / sqrt(mean(h ** 2) + eps) * weight
    + bias``, computed in float32 at least (float64 stays float64), returned in x's dtype.

    Args:
        x: (..., n). weight, bias: (n,). residual: x's shape, any float dtype, or None.
        prenorm: also return the new residual stream ``h``.
        residual_in_fp32: return ``h`` in at least float32 (else in residual's dtype, or x's without one).
        eps: added to the mean square.
        backend: "auto" | "reference" | "chunked" | "triton" ("auto": Triton on CUDA when installed).

    Returns:
        out, or (out, h) when prenorm. Differentiable in x, weight, bias and residual (also through h).

    As ``mamba_ssm.ops.triton.layer_norm.rms_norm_fn`` (its fused kernel: the norm is taken of the
    unrounded float32 sum), except: there ``bias`` is required, and ``x1``, ``weight1``, ``bias1``,
    ``dropout_p``, ``rowscale`` and ``return_dropout_mask`` come between residual and eps, so pass
    prenorm/residual_in_fp32/eps by keyword. With a residual given, mamba_ssm ignores
    ``residual_in_fp32`` (h keeps residual's dtype); here the flag still raises h to float32. mamba_ssm
    returns h in float32 even for float64 inputs; here float64 stays float64. Compared with
    transformers' ``MambaRMSNorm``, which rounds the normalised value to the input dtype before
    multiplying by weight and returns promote(weight, input) dtype, this rounds once, to x's dtype.

    NaN: a NaN in x or residual makes the whole row (all n entries) of out NaN, and that one entry of
    h; other rows stay finite. A NaN in weight[i] or bias[i] makes column i of out NaN. With eps=0 an
    all-zero row gives NaN (0/0); with eps > 0 it gives bias (or 0).

    Example:
        >>> h = torch.randn(2, 10, 64)
        >>> out, h = rms_norm_fn(torch.randn(2, 10, 64), torch.ones(64), residual=h, prenorm=True)
    """
    dims = Dims()
    names = _check_x(x, dims)
    check_tensor("weight", weight, ("n",), dims)
    if bias is not None:
        check_tensor("bias", bias, ("n",), dims)
    if residual is not None:
        check_tensor("residual", residual, names, dims)
    _check_flag("prenorm", prenorm)
    _check_flag("residual_in_fp32", residual_in_fp32)
    _check_eps(eps)
    device = check_same_device(x=x, weight=weight, bias=bias, residual=residual)
    resolved = resolve_backend(backend, device, has_triton=True)
    if resolved == "triton":
        from ssmkit.ops.norm.triton import rms_norm_triton as impl
    else:
        impl = rms_norm_ref if resolved == "reference" else rms_norm_chunked
    return impl(NormInputs(x, weight, bias, residual, prenorm, residual_in_fp32, float(eps)))


def gated_rms_norm_fn(
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
    *,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Mamba-2's gated RMS norm, normalising over groups of the last dimension.

    norm_before_gate=True:  ``out = (rmsnorm(x) * weight + bias) * silu(z)``
    norm_before_gate=False: ``out = rmsnorm(x * silu(z)) * weight + bias`` (Mamba-2 / Hugging Face)
    where rmsnorm divides each group of ``group_size`` consecutive entries of the last dimension by
    ``sqrt(mean(group ** 2) + eps)``; weight and bias span the whole last dimension. z=None: no gate.
    Computed in float32 at least (float64 stays float64), returned in x's dtype.

    Args:
        x: (..., n). z: x's shape or None. weight, bias: (n,).
        group_size: entries per group, must divide n; None = n (one group). Mamba-2 uses
            n / ngroups (d_inner / ngroups).
        backend: "auto" | "reference" | "chunked" | "triton" ("auto": Triton on CUDA when installed).

    Returns:
        out (..., n); differentiable in x, z, weight and bias.

    As ``mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn(x, weight, bias, z, eps, group_size,
    norm_before_gate)`` but with the argument order of ssmkit's design (x, z, weight, ...) and bias
    keyword-only: pass arguments by keyword when switching. transformers' ``MambaRMSNormGated`` is the
    norm_before_gate=False case without bias; it rounds the normalised value to x's dtype before
    multiplying by weight and returns promote(weight, x) dtype (float32 for bfloat16 x with a float32
    weight), where this rounds once, to x's dtype.

    NaN: a NaN in x[..., i] makes out NaN over i's group in that row (other groups and rows stay
    finite). A NaN in z[..., i] makes out[..., i] NaN when norm_before_gate, else i's whole group. A
    NaN in weight[i] or bias[i] makes column i NaN. With eps=0 an all-zero group gives NaN (0/0).

    Example:
        >>> x, z = torch.randn(2, 10, 64), torch.randn(2, 10, 64)
        >>> out = gated_rms_norm_fn(x, z, torch.ones(64), group_size=32, norm_before_gate=False)
    """
    return _gated_norm(x, z, weight, bias, eps, group_size, norm_before_gate, False, backend)


def rmsnorm_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """mamba_ssm's gated RMSNorm (``mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn``), same arguments.

    ``norm_before_gate=True``: ``(rmsnorm(x) * weight + bias) * silu(z)``; False:
    ``rmsnorm(x * silu(z)) * weight + bias``; z=None: no gate. The norm runs over groups of
    ``group_size`` entries of the last dimension (None: all of it). Shapes, dtypes, gradients and
    NaN behaviour as :func:`gated_rms_norm_fn` (this is the same function with mamba_ssm's argument
    order: ``bias`` is the third positional argument and required, possibly None).

    Example:
        >>> x, z = torch.randn(2, 10, 64), torch.randn(2, 10, 64)
        >>> out = rmsnorm_fn(x, torch.ones(64), None, z=z, group_size=32, norm_before_gate=False)
    """
    return _gated_norm(x, z, weight, bias, eps, group_size, norm_before_gate, False, backend)


def layernorm_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
    is_rms_norm: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """mamba_ssm's gated LayerNorm (``mamba_ssm.ops.triton.layernorm_gated.layernorm_fn``), same arguments.

    As :func:`rmsnorm_fn`, but each group is centred before it is scaled:
    ``(h - mean(h)) / sqrt(var(h) + eps) * weight + bias`` (biased variance, as torch's LayerNorm),
    unless ``is_rms_norm`` (then it is :func:`rmsnorm_fn`). Gradients flow to x, z, weight and bias.

    Example:
        >>> x = torch.randn(4, 64)
        >>> out = layernorm_fn(x, torch.ones(64), torch.zeros(64), group_size=16)
    """
    _check_flag("is_rms_norm", is_rms_norm)
    return _gated_norm(x, z, weight, bias, eps, group_size, norm_before_gate, not is_rms_norm, backend)


def _gated_norm(x, z, weight, bias, eps, group_size, norm_before_gate, center: bool, backend: str) -> torch.Tensor:
    dims = Dims()
    names = _check_x(x, dims)
    if z is not None:
        check_tensor("z", z, names, dims)
    check_tensor("weight", weight, ("n",), dims)
    if bias is not None:
        check_tensor("bias", bias, ("n",), dims)
    n = dims["n"]
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size must be an int or None, got {type(group_size).__name__}")
        if group_size <= 0 or n % group_size != 0:
            raise ValueError(f"group_size must be a positive divisor of the last dimension n={n}, got {group_size}")
    _check_flag("norm_before_gate", norm_before_gate)
    _check_eps(eps)
    device = check_same_device(x=x, z=z, weight=weight, bias=bias)
    resolved = resolve_backend(backend, device, has_triton=True)
    if resolved == "triton":
        from ssmkit.ops.norm.triton import gated_rms_norm_triton as impl
    else:
        impl = gated_rms_norm_ref if resolved == "reference" else gated_rms_norm_chunked
    return impl(GatedNormInputs(x, z, weight, float(eps), group_size, norm_before_gate, bias, center))
