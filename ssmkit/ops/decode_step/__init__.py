"""Fused decode steps: the convolution update folded into the selective state update, fewer kernels a token.

* :func:`conv1d_selective_state_update` (Mamba-2): ``causal_conv1d_update`` of xBC with SiLU, the split into
  x, B, C and ``selective_state_update``, one kernel on CUDA (two before);
* :func:`mamba_inner_step` (Mamba-1): the convolution update, ``x_proj``, the optional dt/B/C norms,
  ``dt_proj`` and the gated state update, one kernel on CUDA (five to eight before).

Both update the conv state and the SSM state **in place** and are defined as the separate ops in order
(``reference.py``); "auto" runs the Triton kernels on CUDA for at most :data:`MAX_ROWS` rows and the separate
ops otherwise (setting ``MAX_ROWS = 0`` switches the fused kernels off, as the decode benchmark does to
compare). Inference only: no autograd. Under :mod:`ssmkit.ops.decode_launch`'s programmatic dependent launch
(on by default on sm_90 and later) the Mamba-2 kernel reads the convolution's weight and bias, dt_bias and D
before waiting for the kernel launched just before it: pass parameters (as the layers do), never a tensor that
kernel may still be writing, or switch PDL off for the call (``decode_launch.use("plain")``).
"""

from __future__ import annotations

import torch

from ssmkit.ops._checks import Dims, check_nonempty, check_same_device, check_tensor
from ssmkit.ops._step_sizes import NO_LIMIT, check_dt_limit
from ssmkit.ops.backend import resolve_backend
from ssmkit.ops.decode_step.inputs import (
    COUNTERS_ATTR,
    ConvStepInputs2,
    InnerStepInputs,
)
from ssmkit.ops.decode_step.reference import conv_step_composed, inner_step_composed

__all__ = ["MAX_ROWS", "adopt_step_scratch", "conv1d_selective_state_update", "mamba_inner_step"]

# Rows (batch) up to which "auto" takes the fused kernels. Mamba-2's kernel does the separate kernels' work
# at any batch; Mamba-1's x_proj is a dot product per row there, where cuBLAS reuses the weight across rows,
# so both stop where decoding stops being launch-bound.
MAX_ROWS = 16


def adopt_step_scratch(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Give ``dst`` its own zeroed copy of the ticket counters the fused step kernels keep on ``src``.

    The kernels allocate (and zero) their counters on a conv state's first step. A CUDA graph captured on a
    state whose warm-up ran on a copy would capture that zero fill and replay it every step (a kernel a layer);
    adopting the copy's counters first keeps the allocation out of the graph. Nothing happens when ``src`` has
    none or ``dst`` has its own.
    """
    counters = getattr(src, COUNTERS_ATTR, None)
    if counters is not None and getattr(dst, COUNTERS_ATTR, None) is None and src.device == dst.device:
        setattr(dst, COUNTERS_ATTR, torch.zeros_like(counters))


def _fits(tensors: tuple[torch.Tensor | None, ...], rows: int) -> bool:
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    no_fp64 = all(t is None or t.dtype != torch.float64 for t in tensors)
    return rows <= MAX_ROWS and not needs_grad and no_fp64


def _resolve(backend: str, fits: bool, device: torch.device, what: str) -> str:
    if backend == "auto" and not fits:
        return "chunked"
    if backend == "triton" and not fits:
        raise ValueError(f"backend='triton' ({what}) takes at most MAX_ROWS={MAX_ROWS} rows, no float64 and no "
                         "autograd; use backend='chunked'")
    return resolve_backend(backend, device, has_triton=True)


def _check_conv(dims: Dims, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                channels: str) -> None:
    check_tensor("conv_weight", weight, (channels, "w"), dims)
    check_tensor("conv_state", conv_state, ("b", channels, "S"), dims)
    check_nonempty("conv_weight", dims["w"], "width")
    if dims["S"] < dims["w"] - 1:
        raise ValueError(f"conv_state holds {dims['S']} inputs; the width-{dims['w']} convolution needs "
                         f"at least {dims['w'] - 1}")
    if bias is not None:
        check_tensor("conv_bias", bias, (channels,), dims)


def conv1d_selective_state_update(
    xBC: torch.Tensor,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    state: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    *,
    ngroups: int = 1,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = NO_LIMIT,
    backend: str = "auto",
) -> torch.Tensor:
    """One Mamba-2 token after ``in_proj``: convolution update, SiLU, split, state update, in place.

    ``xBC = silu(causal_conv1d_update(xBC, conv_state, conv_weight, conv_bias))`` split into
    x (h·p), B, C (ngroups·n each), then ``selective_state_update(state, x, dt, A, B, C, D, z, dt_bias,
    dt_softplus, dt_limit=dt_limit)``.

    Args:
        xBC: (b, h·p + 2·ngroups·n) the token's convolution inputs (any strides: a slice of in_proj's output).
        conv_state: (b, conv_dim, S), S >= w - 1, its last S inputs; shifted and appended in place.
        conv_weight: (conv_dim, w); conv_bias: (conv_dim,) or None.
        state: (b, h, p, n) SSM state, updated in place. dt: (b, h); A: (h,); D: (h,) or (h, p) or None;
        z: (b, h, p) gate or None; dt_bias: (h,) or None.
        backend: "auto" (Triton on CUDA for at most ``MAX_ROWS`` rows without float64, else the separate
            ops), "reference" (each op's reference), "chunked" (the separate ops) or "triton".

    Returns:
        y (b, h, p) in xBC's dtype.
    """
    dims = Dims()
    check_tensor("state", state, ("b", "h", "p", "n"), dims)
    check_nonempty("state", dims["b"], "batch")
    if isinstance(ngroups, bool) or not isinstance(ngroups, int) or ngroups <= 0 or dims["h"] % ngroups:
        raise ValueError(f"ngroups must be a positive divisor of the {dims['h']} heads, got {ngroups!r}")
    dims["conv_dim"] = dims["h"] * dims["p"] + 2 * ngroups * dims["n"]
    check_tensor("xBC", xBC, ("b", "conv_dim"), dims)
    _check_conv(dims, conv_state, conv_weight, conv_bias, "conv_dim")
    check_tensor("dt", dt, ("b", "h"), dims)
    check_tensor("A", A, ("h",), dims)
    if D is not None:
        check_tensor("D", D, ("h",) if D.dim() == 1 else ("h", "p"), dims)
    if z is not None:
        check_tensor("z", z, ("b", "h", "p"), dims)
    if dt_bias is not None:
        check_tensor("dt_bias", dt_bias, ("h",), dims)
    dt_limit = check_dt_limit(dt_limit)
    device = check_same_device(xBC=xBC, conv_state=conv_state, conv_weight=conv_weight, conv_bias=conv_bias,
                               state=state, dt=dt, A=A, D=D, z=z, dt_bias=dt_bias)
    inputs = ConvStepInputs2(xBC, conv_state, conv_weight, conv_bias, state, dt, A, D, z, dt_bias, ngroups,
                             bool(dt_softplus), dt_limit)
    backend = _resolve(backend, _fits(inputs.unpack()[:10], dims["b"]), device, "conv1d_selective_state_update")
    if backend == "triton":
        from ssmkit.ops.decode_step.triton import conv_ssm_step_triton

        return conv_ssm_step_triton(inputs)
    return conv_step_composed(inputs, "reference" if backend == "reference" else "auto")


def mamba_inner_step(
    xz: torch.Tensor,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_proj_bias: torch.Tensor | None,
    state: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    dt_rms_weight: torch.Tensor | None = None,
    b_rms_weight: torch.Tensor | None = None,
    c_rms_weight: torch.Tensor | None = None,
    rms_eps: float = 1e-6,
    dt_softplus: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """One Mamba-1 token after ``in_proj`` and before ``out_proj`` (the one-token ``mamba_inner_fn``), in place.

    With ``x, z = xz.chunk(2, -1)``::

        x = silu(causal_conv1d_update(x, conv_state, conv_weight, conv_bias))
        dt (R), B (N), C (N) = x_proj_weight @ x            (each RMS-normalised by its weight, if given)
        y = selective_state_update(state, x, dt_proj_weight @ dt, A, B, C, D, z, dt_proj_bias, dt_softplus)

    Args:
        xz: (b, 2d). conv_state: (b, d, S), S >= w - 1; conv_weight: (d, w); conv_bias: (d,) or None.
        x_proj_weight: (R + 2N, d); dt_proj_weight: (d, R); dt_proj_bias: (d,) or None.
        state: (b, d, N) updated in place; A: (d, N); D: (d,) or None.
        dt_rms_weight: (R,), b_rms_weight / c_rms_weight: (N,) RMSNorm weights (eps ``rms_eps``) or None.
        backend: as :func:`conv1d_selective_state_update`.

    Returns:
        y (b, d) in xz's dtype, gated by silu(z).
    """
    dims = Dims()
    check_tensor("state", state, ("b", "d", "n"), dims)
    check_nonempty("state", dims["b"], "batch")
    dims["2d"] = 2 * dims["d"]
    check_tensor("xz", xz, ("b", "2d"), dims)
    _check_conv(dims, conv_state, conv_weight, conv_bias, "d")
    check_tensor("dt_proj_weight", dt_proj_weight, ("d", "r"), dims)
    dims["rows"] = dims["r"] + 2 * dims["n"]
    check_tensor("x_proj_weight", x_proj_weight, ("rows", "d"), dims)
    check_tensor("A", A, ("d", "n"), dims)
    for name, t, shape in (("dt_proj_bias", dt_proj_bias, ("d",)), ("D", D, ("d",)),
                           ("dt_rms_weight", dt_rms_weight, ("r",)), ("b_rms_weight", b_rms_weight, ("n",)),
                           ("c_rms_weight", c_rms_weight, ("n",))):
        if t is not None:
            check_tensor(name, t, shape, dims)
    if isinstance(rms_eps, bool) or not isinstance(rms_eps, (int, float)) or not rms_eps >= 0:
        raise ValueError(f"rms_eps must be a number >= 0, got {rms_eps!r}")
    device = check_same_device(xz=xz, conv_state=conv_state, conv_weight=conv_weight, conv_bias=conv_bias,
                               x_proj_weight=x_proj_weight, dt_proj_weight=dt_proj_weight, dt_proj_bias=dt_proj_bias,
                               state=state, A=A, D=D, dt_rms_weight=dt_rms_weight, b_rms_weight=b_rms_weight,
                               c_rms_weight=c_rms_weight)
    inputs = InnerStepInputs(xz, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias,
                             state, A, D, dt_rms_weight, b_rms_weight, c_rms_weight, float(rms_eps), bool(dt_softplus))
    backend = _resolve(backend, _fits(inputs.unpack()[:13], dims["b"]), device, "mamba_inner_step")
    if backend == "triton":
        from ssmkit.ops.decode_step.triton import inner_step_triton

        return inner_step_triton(inputs)
    return inner_step_composed(inputs, "reference" if backend == "reference" else "auto")
