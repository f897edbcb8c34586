"""Mamba-1 selective scan: ``selective_scan_fn``, a drop-in for ``mamba_ssm``'s function of that name.

Backends: ``reference`` (one step at a time, the definition), ``chunked`` (time-major chunks with one
fused update per step and matmuls for the read-out, fast on CPU, any device) and ``triton`` (the
hardware-aware scan of ``triton.py``: states kept on chip, chunk-boundary checkpoints for backward). The math is in
``docs/ALGORITHMS.md`` ("Mamba-1 selective scan").
"""

from __future__ import annotations

import torch

from ssmkit.ops._checks import (
    MAX_ROW_OFFSET,
    Dims,
    check_nonempty,
    check_same_device,
    check_tensor,
    row_offset,
)
from ssmkit.ops.backend import resolve_backend
from ssmkit.ops.selective_scan.chunked import selective_scan_chunked
from ssmkit.ops.selective_scan.inputs import ScanInputs
from ssmkit.ops.selective_scan.native import applies as native_applies
from ssmkit.ops.selective_scan.native import selective_scan_native
from ssmkit.ops.selective_scan.reference import selective_scan_reference

__all__ = ["ScanInputs", "selective_scan_fn"]

_BACKENDS = {"reference": selective_scan_reference, "chunked": selective_scan_chunked}


def selective_scan_fn(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 selective SSM, as ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``.

    Per channel ``d`` and state index ``n`` (``Δ = softplus(delta + delta_bias)``, each step optional)::

        h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t
        out_t = (C_t · h_t + D u_t) · silu(z_t)

    Args:
        u: (b, d, l) input. Its dtype is the output's dtype.
        delta: (b, d, l) step sizes before ``delta_bias`` / softplus.
        A: (d, n) real state matrix (diagonal per channel; negative for a stable SSM). Complex A
            (S4D-style) is not supported and raises ``TypeError``.
        B, C: (b, n, l), or (b, g, n, l) with ``d % g == 0``: channel i reads group ``i // (d // g)``.
        D: (d,) skip connection. z: (b, d, l) gate. delta_bias: (d,).
        delta_softplus: apply softplus to ``delta + delta_bias`` (threshold 20, as mamba_ssm).
        return_last_state: also return the state after the last position.
        initial_state: (b, d, n) state before position 0 (ssmkit addition, differentiable); it only
            reaches the first document of a row when ``seq_idx`` packs several.
        seq_idx: (b, l) integer document ids (ssmkit addition): the state restarts at zero wherever
            the id changes from t-1 to t, so packed documents give the outputs each gives alone.
        backend: ``"auto"`` (triton on CUDA when triton imports, else chunked; on a CPU without gradients the
            native kernel where it is built, ``native.py``), ``"reference"``, ``"chunked"`` or ``"triton"``.

    Returns:
        ``out`` (b, d, l) in u's dtype, or ``(out, last_state)`` with ``last_state`` (b, d, n) in
        float32 (float64 when an input is float64). bf16/fp16 inputs are computed in float32.
        Every tensor input gets a gradient, ``initial_state`` included (first-order only on the
        chunked and triton backends, whose backward passes are hand-written). Those two return ``out``
        in u's memory layout: time-major (a transposed view of a (b, l, d) tensor) when u is one, as
        in a Mamba layer, which then needs no transposes; contiguous otherwise (the reference: always
        contiguous).

    NaN/inf are not checked (that would cost a device sync); they travel with the state as in the
    recurrence: a NaN in u, delta or delta_bias (one channel) or in B (every channel of its group) at
    step t makes ``out`` NaN from t to the end of that row's document, and ``last_state`` NaN when that
    document is the last; a NaN in C, D or z only makes ``out`` NaN where it is read (C at step t:
    every channel of its group at t). A ``seq_idx`` change stops it: the next document is clean.

    Example:
        >>> b, d, n, l = 2, 8, 4, 16
        >>> u, delta, z = torch.randn(b, d, l), torch.randn(b, d, l), torch.randn(b, d, l)
        >>> A = -torch.rand(d, n)
        >>> B, C = torch.randn(b, n, l), torch.randn(b, n, l)
        >>> out, h = selective_scan_fn(u, delta, A, B, C, D=torch.ones(d), z=z,
        ...                            delta_softplus=True, return_last_state=True)
        >>> out.shape, h.shape
        (torch.Size([2, 8, 16]), torch.Size([2, 8, 4]))
    """
    if isinstance(A, torch.Tensor) and A.is_complex():
        raise TypeError(f"A must be real: complex A (S4D-style) is not supported by selective_scan_fn, got {A.dtype}")
    dims = Dims()
    check_tensor("u", u, ("b", "d", "l"), dims)
    check_tensor("delta", delta, ("b", "d", "l"), dims)
    check_tensor("A", A, ("d", "n"), dims)
    for name, t in (("B", B), ("C", C)):
        if isinstance(t, torch.Tensor) and t.dim() == 3:
            if dims.setdefault("g", 1) != 1:
                raise ValueError(f"{name} must have shape (b, g={dims['g']}, n, l) like B, got {tuple(t.shape)}")
            check_tensor(name, t, ("b", "n", "l"), dims)
        else:
            check_tensor(name, t, ("b", "g", "n", "l"), dims)
    check_nonempty("u", dims["b"], "batch")
    check_nonempty("u", dims["d"], "channel")
    check_nonempty("u", dims["l"], "length")
    check_nonempty("A", dims["n"], "state")
    if dims["g"] == 0 or dims["d"] % dims["g"]:
        raise ValueError(f"B/C groups g={dims['g']} must divide the channels d={dims['d']} (d % g == 0)")
    if D is not None:
        check_tensor("D", D, ("d",), dims)
    if z is not None:
        check_tensor("z", z, ("b", "d", "l"), dims)
    if delta_bias is not None:
        check_tensor("delta_bias", delta_bias, ("d",), dims)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ("b", "d", "n"), dims)
    if seq_idx is not None:
        check_tensor("seq_idx", seq_idx, ("b", "l"), dims, floating=False, integer=True)
    device = check_same_device(
        u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
        initial_state=initial_state, seq_idx=seq_idx,
    )
    name = resolve_backend(backend, device, has_triton=True)
    if name == "triton" and backend == "auto" and not _triton_rows_fit(u, delta, z, B, C):
        name = "chunked"  # past the Triton kernels' 32-bit offsets within a batch row
    if name == "triton":
        # Imported here so that ``import ssmkit`` never imports triton.
        from ssmkit.ops.selective_scan.triton import selective_scan_triton as impl
    else:
        impl = _BACKENDS[name]
    inputs = ScanInputs.from_args(locals())
    if name == "chunked" and backend == "auto" and native_applies(inputs):
        # Inference on a CPU: one pass of the native kernel, where the chunked form takes a torch op a step.
        impl = selective_scan_native
    out, last_state = impl(inputs)
    return (out, last_state) if return_last_state else out


def _triton_rows_fit(u, delta, z, B, C) -> bool:
    """Whether every offset within a batch row the Triton kernels reach fits their 32-bit indexing (u's layout
    for the output too, and the backward's contiguous (b, g, n, l) dB, dC)."""
    g_n_l = B.shape[-3] * B.shape[-2] * B.shape[-1] if B.dim() == 4 else B.shape[-2] * B.shape[-1]
    return g_n_l - 1 <= MAX_ROW_OFFSET and all(
        t is None or row_offset(t) <= MAX_ROW_OFFSET for t in (u, delta, z, B, C))

