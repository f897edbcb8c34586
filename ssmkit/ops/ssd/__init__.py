"""Mamba-2 SSD (structured state space duality) scan: ``mamba_chunk_scan_combined``.

Backends: ``reference`` (token-by-token recurrence, the definition) and ``chunked`` (the SSD matmul
form of Dao & Gu 2024, "Transformers are SSMs", section 6; fast on CPU, any device) and ``triton``
(the same algorithm in eight Triton kernels: four forward, four backward).
"""

from __future__ import annotations

import functools
import math

import torch

from ssmkit.ops._checks import Dims, check_nonempty, check_same_device, check_tensor
from ssmkit.ops.backend import resolve_backend
from ssmkit.ops.chunking import check_chunk_size
from ssmkit.ops.ssd.chunked import ssd_chunked
from ssmkit.ops.ssd.launch import DEFAULT_LAUNCH, SSDLaunch
from ssmkit.ops.ssd.reference import NO_LIMIT, doc_starts, ssd_reference

__all__ = ["SSDLaunch", "mamba_chunk_scan_combined"]

_BACKENDS = {"reference": ssd_reference, "chunked": ssd_chunked}


def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_LIMIT,
    return_final_states: bool = False,
    return_varlen_states: bool = False,
    *,
    input_scale: torch.Tensor | None = None,
    backend: str = "auto",
    launch: SSDLaunch | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Mamba-2 selective SSM with a scalar decay per head, as ``mamba_ssm``'s function of this name.

    For each head (``Δ = clamp(softplus(dt + dt_bias), *dt_limit)``, each step optional)::

        H_t = exp(Δ_t A) H_{t-1} + Δ_t x_t ⊗ B_t        H: (p, n)
        out_t = (H_t C_t + D x_t) · silu(z_t)

    Args:
        x: (b, l, h, p) input. Its dtype is the output's dtype.
        dt: (b, l, h) step sizes before ``dt_bias`` / softplus / clamp.
        A: (h,) decay rate per head (negative for a stable SSM).
        B, C: (b, l, g, n) input and output projections; ``h % g == 0``, head i uses group
            ``i // (h // g)``.
        chunk_size: positive int, the chunk length of the chunked algorithm (any length l works: the
            sequence is padded to a multiple of it). Every backend follows the rule of
            :mod:`ssmkit.ops.chunking`: it never changes the result, only where the sums are cut.
        D: (h,) or (h, p) skip connection. z: (b, l, h, p) gate. dt_bias: (h,).
        initial_states: (b, h, p, n) state before position 0; it only reaches the first document
            when ``seq_idx`` packs several. Differentiable.
        seq_idx: (b, l) integer document ids; the state restarts at zero wherever the id changes,
            so packed documents give the same outputs as each run alone.
        cu_seqlens: (s + 1,) integer cumulative sequence boundaries ``0 = c_0 < ... < c_s = l`` of
            ``s`` sequences packed in a batch of 1. When ``seq_idx`` is omitted it is derived from
            ``cu_seqlens``; when both are given they must mark the same boundaries. This differs
            deliberately from mamba_ssm, which reads cu_seqlens only for ``return_varlen_states`` and
            lets sequences see each other unless seq_idx is passed too: a packed batch described by
            its boundaries should never leak state across them.
        dt_softplus: apply softplus to ``dt + dt_bias`` (threshold 20, as mamba_ssm).
        dt_limit: (lo, hi) clamp of Δ; the default ``(0, inf)`` means no clamp.
        return_final_states: also return the (b, h, p, n) state after the last position.
        return_varlen_states: also return the (s, h, p, n) state at the end of each ``cu_seqlens``
            sequence (the first includes ``initial_states``); needs ``cu_seqlens``.
        input_scale: (b, l, h) the weight of x_t in the update, in place of Δ_t (ssmkit's extension,
            not in mamba_ssm): ``H_t = exp(Δ_t A) H_{t-1} + input_scale_t x_t ⊗ B_t``, Δ still from ``dt``.
            Mamba-3's trapezoidal rule needs this (its input weight is not its decay step); None: Δ.
        backend: ``"auto"`` (triton on CUDA when importable, else chunked), ``"reference"``, ``"chunked"``
            or ``"triton"``.
        launch: warps, stages and tiles of the triton backend's kernels, a frozen :class:`SSDLaunch`
            (one of ``ssmkit.ops.ssd.launch.CONFIGS`` or your own); None: the defaults. The other
            backends have no launches and ignore it.

    Returns:
        ``out`` (b, l, h, p) alone, or the tuple ``(out, final_states)``, ``(out, varlen_states)``
        or ``(out, final_states, varlen_states)``. States are float32 (float64 when an input is
        float64). bf16/fp16 inputs are computed in float32 (triton: bf16/fp16 matmul operands, float32
        accumulation). Every tensor input gets a gradient.

    NaN/inf are not checked (that would cost a device sync); like the recurrence they travel
    forward with the state: a NaN in x, dt or input_scale (one head) or B (its group) at position t makes ``out``
    NaN from t to the end of that document, and that document's final/varlen state; a NaN in C or
    z at t only reaches ``out`` at t; one in A, D or dt_bias reaches the whole head, and one in
    initial_states the first document of its head.
    With the chunked and triton backends a NaN can also reach the other positions of its chunk
    (masked matmul entries are products with zero, and 0·NaN = NaN). Other batch rows, other heads,
    and documents that start in a later chunk stay finite.

    Example:
        >>> b, l, h, p, g, n = 2, 100, 4, 16, 1, 32
        >>> x, z = torch.randn(b, l, h, p), torch.randn(b, l, h, p)
        >>> dt, A = torch.randn(b, l, h), -torch.rand(h)
        >>> B, C = torch.randn(b, l, g, n), torch.randn(b, l, g, n)
        >>> out, state = mamba_chunk_scan_combined(x, dt, A, B, C, 64, D=torch.ones(h), z=z,
        ...     dt_bias=torch.zeros(h), dt_softplus=True, return_final_states=True)
        >>> out.shape, state.shape
        (torch.Size([2, 100, 4, 16]), torch.Size([2, 4, 16, 32]))
    """
    dims = Dims()
    check_tensor("x", x, ("b", "l", "h", "p"), dims)
    check_tensor("dt", dt, ("b", "l", "h"), dims)
    check_tensor("A", A, ("h",), dims)
    check_tensor("B", B, ("b", "l", "g", "n"), dims)
    check_tensor("C", C, ("b", "l", "g", "n"), dims)
    check_chunk_size(chunk_size)
    if D is not None:
        check_tensor("D", D, ("h",) if isinstance(D, torch.Tensor) and D.dim() == 1 else ("h", "p"), dims)
    if z is not None:
        check_tensor("z", z, ("b", "l", "h", "p"), dims)
    if dt_bias is not None:
        check_tensor("dt_bias", dt_bias, ("h",), dims)
    if initial_states is not None:
        check_tensor("initial_states", initial_states, ("b", "h", "p", "n"), dims)
    if input_scale is not None:
        check_tensor("input_scale", input_scale, ("b", "l", "h"), dims)
    if seq_idx is not None:
        check_tensor("seq_idx", seq_idx, ("b", "l"), dims, floating=False, integer=True)
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, ("num_seqs+1",), dims, floating=False, integer=True)
    for name, what in (("b", "batch"), ("l", "length"), ("h", "heads"), ("p", "head dim"), ("g", "groups"),
                       ("n", "state")):
        check_nonempty("x" if name in "blhp" else "B", dims[name], f"{what} ({name})")
    if dims["h"] % dims["g"] != 0:
        raise ValueError(f"B and C: heads (h={dims['h']}) must be divisible by groups (g={dims['g']})")
    for name, flag in (("dt_softplus", dt_softplus), ("return_final_states", return_final_states),
                       ("return_varlen_states", return_varlen_states)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    dt_limit = _check_dt_limit(dt_limit)
    device = check_same_device(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                               initial_states=initial_states, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                               input_scale=input_scale)
    if return_varlen_states and cu_seqlens is None:
        raise ValueError("return_varlen_states=True needs cu_seqlens")
    if cu_seqlens is not None:
        seq_idx = _seq_idx_from_cu_seqlens(cu_seqlens, seq_idx, dims["b"], dims["l"])
    backend = resolve_backend(backend, device, has_triton=True)
    if launch is not None and not isinstance(launch, SSDLaunch):
        raise TypeError(f"launch must be an SSDLaunch or None, got {type(launch).__name__}")
    if backend == "triton":
        # Imported here, not at the top: `import ssmkit` must never import triton.
        from ssmkit.ops.ssd.triton import ssd_triton

        run = functools.partial(ssd_triton, launch=launch or DEFAULT_LAUNCH)
    else:
        run = _BACKENDS[backend]

    out, final_states, varlen_states = run(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
        seq_idx=seq_idx, cu_seqlens=cu_seqlens if return_varlen_states else None,
        dt_softplus=dt_softplus, dt_limit=dt_limit, input_scale=input_scale,
    )
    results = (out,) + ((final_states,) if return_final_states else ()) + (
        (varlen_states,) if return_varlen_states else ()
    )
    return results[0] if len(results) == 1 else results


def _check_dt_limit(dt_limit: object) -> tuple[float, float]:
    if not isinstance(dt_limit, (tuple, list)) or len(dt_limit) != 2:
        raise TypeError(f"dt_limit must be a (lo, hi) pair of floats, got {dt_limit!r}")
    lo, hi = (float(v) for v in dt_limit)
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"dt_limit must be (lo, hi) with lo <= hi, got {dt_limit!r}")
    return lo, hi


def _seq_idx_from_cu_seqlens(
    cu_seqlens: torch.Tensor, seq_idx: torch.Tensor | None, batch: int, length: int
) -> torch.Tensor:
    """Check ``cu_seqlens`` and return the ``seq_idx`` it implies (checked against a given one)."""
    if batch != 1:
        raise ValueError(f"cu_seqlens packs sequences into a batch of 1; x has batch {batch}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != length or any(e <= s for s, e in zip(bounds[:-1], bounds[1:])):
        raise ValueError(
            f"cu_seqlens must rise strictly from 0 to the length {length} (no empty sequences), got {bounds}"
        )
    lengths = torch.tensor([e - s for s, e in zip(bounds[:-1], bounds[1:])], device=cu_seqlens.device)
    implied = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)[None]
    if seq_idx is None:
        return implied.to(torch.int32)
    if not torch.equal(doc_starts(seq_idx), doc_starts(implied)):
        raise ValueError("seq_idx must change exactly at the cu_seqlens boundaries")
    return seq_idx
