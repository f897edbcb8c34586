"""A (gated) RMS norm feeding a linear layer, with an optional residual add: one kernel for decode steps.

The unfused form is three or four launches (norm, cast, matmul, add); at batch 1 each costs about as
much as the work, so the decode step of a Mamba-2 block runs its pre-norm + ``in_proj`` and its gated
norm + ``out_proj`` + residual add through this op. Inference only: there is no backward.
"""

from __future__ import annotations

import torch

from ssmkit.ops._checks import Dims, check_nonempty, check_same_device, check_tensor
from ssmkit.ops.backend import resolve_backend
from ssmkit.ops.norm_linear.chunked import rms_norm_linear_chunked
from ssmkit.ops.norm_linear.inputs import NormLinearInputs
from ssmkit.ops.norm_linear.reference import rms_norm_linear_ref

__all__ = ["rms_norm_linear"]

# The kernel's rows are CUDA-core dot products against one weight read; past a few rows cuBLAS's tensor
# cores win (on an H200 the kernel led at 1 and 4 rows; batch 64 takes the unfused ops).
MAX_ROWS = 8
# The longest input row the kernel takes (a program holds a whole row of the weight in registers).
MAX_K = 8192


def rms_norm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    z: torch.Tensor | None = None,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``residual + linear(gated_rms_norm(x, z) in weight's dtype, weight, bias)``.

    The norm is :func:`ssmkit.ops.gated_rms_norm_fn` (``z=None``: the plain RMS norm, over groups of
    ``group_size``), computed in float32 at least; its output is rounded to ``weight``'s dtype, as when a
    norm module feeds an ``nn.Linear`` of that dtype, and the linear layer's output is in that dtype.

    Args:
        x: (m, k) rows to normalise. z: (m, k) gate or None. norm_weight: (k,).
        weight: (n, k), bias: (n,) or None — an ``nn.Linear``'s parameters.
        group_size: entries per norm group, a divisor of k (None: k).
        norm_before_gate: as in ``gated_rms_norm_fn``; ignored without z.
        residual: (m, n) added to the output (the result then has promote(residual, weight) dtype), or None.
        backend: "auto" (the Triton kernel on CUDA for at most ``MAX_ROWS`` rows of at most ``MAX_K``
            features without autograd, else "chunked"), "reference" (the definition: the reference norm,
            cast, linear, add), "chunked" (the same with the dispatching norm op, Triton on CUDA) or "triton".

    Returns:
        (m, n).

    Example:
        >>> x, w_norm, w = torch.randn(1, 64), torch.ones(64), torch.randn(32, 64)
        >>> rms_norm_linear(x, w_norm, w).shape
        torch.Size([1, 32])
    """
    dims = Dims()
    check_tensor("x", x, ("m", "k"), dims)
    check_nonempty("x", dims["m"], "row")
    check_nonempty("x", dims["k"], "feature")
    if z is not None:
        check_tensor("z", z, ("m", "k"), dims)
    check_tensor("norm_weight", norm_weight, ("k",), dims)
    check_tensor("weight", weight, ("n", "k"), dims)
    if bias is not None:
        check_tensor("bias", bias, ("n",), dims)
    if residual is not None:
        check_tensor("residual", residual, ("m", "n"), dims)
    k = dims["k"]
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size <= 0 or k % group_size):
        raise ValueError(f"group_size must be a positive divisor of x's last dimension k={k}, got {group_size!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    device = check_same_device(x=x, z=z, norm_weight=norm_weight, weight=weight, bias=bias, residual=residual)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, z, norm_weight, weight, bias, residual))
    fits = (dims["m"] <= MAX_ROWS and k <= MAX_K and not needs_grad
            and torch.float64 not in {x.dtype, weight.dtype})
    if backend == "auto" and not fits:
        backend = "chunked"
    resolved = resolve_backend(backend, device, has_triton=True)
    if resolved == "triton":
        from ssmkit.ops.norm_linear.triton import rms_norm_linear_triton as impl

        if not fits:
            raise ValueError(f"backend='triton' takes at most {MAX_ROWS} rows of at most {MAX_K} features, "
                             f"no float64 and no autograd (got {dims['m']} x {k} of {x.dtype}, weight "
                             f"{weight.dtype}, gradient needed: {needs_grad}); use backend='chunked'")
    else:
        impl = rms_norm_linear_ref if resolved == "reference" else rms_norm_linear_chunked
    return impl(NormLinearInputs(x, norm_weight, weight, bias, z, float(eps), group_size, norm_before_gate, residual))
