"""A (gated) RMS norm feeding a linear layer, with an optional residual add: one kernel for decode steps.

The unfused form is three or four launches (norm, cast, matmul, add); at batch 1 each costs about as
much as the work, so the decode step of a Mamba-2 block runs its pre-norm + ``in_proj`` and its gated
norm + ``out_proj`` + residual add through this op (a Mamba block its ``out_proj`` + residual add, no norm).
:func:`rms_norm_linear_argmax` is a greedy decode step's head: the final norm, the head and the argmax.
Inference only: there is no backward. Launch settings: :mod:`ssmkit.ops.decode_launch`. Under its programmatic
dependent launch (on by default on sm_90 and later) the kernels read ``weight``, ``norm_weight`` and ``bias``
before waiting for the kernel launched just before them: pass parameters (as the layers do), never a tensor
that kernel may still be writing (a cast, a dequantised or merged weight made the launch before), or switch
PDL off for the call (``decode_launch.use("plain")``).
"""

from __future__ import annotations

import torch

from ssmkit.ops._checks import Dims, check_nonempty, check_same_device, check_tensor
from ssmkit.ops.backend import resolve_backend
from ssmkit.ops.norm_linear.chunked import rms_norm_linear_chunked
from ssmkit.ops.norm_linear.inputs import NormLinearInputs
from ssmkit.ops.norm_linear.reference import project, rms_norm_linear_ref

__all__ = ["rms_norm_linear", "rms_norm_linear_argmax"]

# The kernel's rows are CUDA-core dot products against one weight read; past a few rows cuBLAS's tensor
# cores win (on an H200 the kernel led at 1 and 4 rows; batch 64 takes the unfused ops).
MAX_ROWS = 8
# The longest input row the kernel takes (a program holds a whole row of the weight in registers).
MAX_K = 8192


def _check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")


def _route(backend: str, device: torch.device, fits: bool) -> str:
    """The backend that runs: "auto" takes the unfused ops where the Triton kernels do not fit."""
    if backend == "auto" and not fits:
        backend = "chunked"
    return resolve_backend(backend, device, has_triton=True)


def rms_norm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
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
        x: (m, k) rows to normalise. z: (m, k) gate or None. norm_weight: (k,), or None for no norm at all
            (``residual + linear(x in weight's dtype)``; z and group_size must then be None).
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
    if norm_weight is not None:
        check_tensor("norm_weight", norm_weight, ("k",), dims)
    elif z is not None or group_size is not None:
        raise ValueError("z and group_size belong to the norm: pass norm_weight, or neither")
    check_tensor("weight", weight, ("n", "k"), dims)
    if bias is not None:
        check_tensor("bias", bias, ("n",), dims)
    if residual is not None:
        check_tensor("residual", residual, ("m", "n"), dims)
    k = dims["k"]
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size <= 0 or k % group_size):
        raise ValueError(f"group_size must be a positive divisor of x's last dimension k={k}, got {group_size!r}")
    _check_eps(eps)
    device = check_same_device(x=x, z=z, norm_weight=norm_weight, weight=weight, bias=bias, residual=residual)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, z, norm_weight, weight, bias, residual))
    fits = (dims["m"] <= MAX_ROWS and k <= MAX_K and not needs_grad
            and torch.float64 not in {x.dtype, weight.dtype})
    resolved = _route(backend, device, fits)
    if resolved == "triton":
        from ssmkit.ops.norm_linear.triton import rms_norm_linear_triton

        if not fits:
            raise ValueError(f"backend='triton' takes at most {MAX_ROWS} rows of at most {MAX_K} features, "
                             f"no float64 and no autograd (got {dims['m']} x {k} of {x.dtype}, weight "
                             f"{weight.dtype}, gradient needed: {needs_grad}); use backend='chunked'")
        inputs = NormLinearInputs(x, norm_weight, weight, bias, z, float(eps), group_size, norm_before_gate, residual)
        return rms_norm_linear_triton(inputs, norm=norm_weight is not None)
    if norm_weight is None:
        return project(x, weight, bias, residual)
    impl = rms_norm_linear_ref if resolved == "reference" else rms_norm_linear_chunked
    return impl(NormLinearInputs(x, norm_weight, weight, bias, z, float(eps), group_size, norm_before_gate, residual))


def rms_norm_linear_argmax(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float = 1e-5,
    vocab_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The greedy token of each row: ``argmax(linear(rms_norm(x) in weight's dtype, weight)[:, :vocab_size])``.

    The logits are those of :func:`rms_norm_linear` (no bias, no residual), in the weight's dtype, compared in
    float32 as a decode step's ``logits.float().argmax(-1)`` compares them: ties go to the lowest index, a NaN
    logit wins (the first NaN), entries at or past ``vocab_size`` (the vocabulary's padding) never do.

    Args:
        x: (m, k) final hidden states. norm_weight: (k,) the final RMSNorm's weight. weight: (n, k) the head.
        vocab_size: tokens that may be picked, 1 <= vocab_size <= n (None: n).
        backend: "auto" (two Triton kernels on CUDA for at most ``MAX_ROWS`` rows of at most ``MAX_K``
            features, no float64, n < 2**31; else the unfused ops), "reference", "chunked" or "triton".

    Returns:
        (m,) int64 token ids.
    """
    dims = Dims()
    check_tensor("x", x, ("m", "k"), dims)
    check_nonempty("x", dims["m"], "row")
    check_nonempty("x", dims["k"], "feature")
    check_tensor("norm_weight", norm_weight, ("k",), dims)
    check_tensor("weight", weight, ("n", "k"), dims)
    n = dims["n"]
    vocab_size = n if vocab_size is None else vocab_size
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= n:
        raise ValueError(f"vocab_size must be an int in [1, {n}] (the head's rows), got {vocab_size!r}")
    _check_eps(eps)
    device = check_same_device(x=x, norm_weight=norm_weight, weight=weight)
    fits = (dims["m"] <= MAX_ROWS and dims["k"] <= MAX_K and n < 2**31
            and torch.float64 not in {x.dtype, weight.dtype})
    resolved = _route(backend, device, fits)
    if resolved == "triton":
        from ssmkit.ops.norm_linear.triton import rms_norm_linear_argmax_triton

        if not fits:
            raise ValueError(f"backend='triton' takes at most {MAX_ROWS} rows of at most {MAX_K} features and no "
                             f"float64 (got {dims['m']} x {dims['k']} of {x.dtype}, weight {weight.dtype})")
        with torch.no_grad():
            return rms_norm_linear_argmax_triton(x, norm_weight, weight, float(eps), vocab_size)
    inputs = NormLinearInputs(x, norm_weight, weight, None, None, float(eps), None, False, None)
    logits = (rms_norm_linear_ref if resolved == "reference" else rms_norm_linear_chunked)(inputs)
    return logits[:, :vocab_size].float().argmax(-1)
