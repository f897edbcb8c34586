"""Mamba-2 SSD (structured state space duality) scan: ``mamba_chunk_scan_combined``.

Backends: ``reference`` (token-by-token recurrence, the definition) and ``chunked`` (the SSD matmul
form of Dao & Gu 2024, "Transformers are SSMs", section 6; fast on CPU, any device) and ``triton``
(the same algorithm in eight Triton kernels: four forward, four backward).
"""

from __future__ import annotations

import torch

from ssmkit.ops._step_sizes import NO_LIMIT
from ssmkit.ops.backend import resolve_backend
from ssmkit.ops.ssd.chunked import ssd_chunked
from ssmkit.ops.ssd.inputs import SSDInputs, check_ssd_inputs
from ssmkit.ops.ssd.launch import DEFAULT_LAUNCH, SSDLaunch
from ssmkit.ops.ssd.reference import ssd_reference

__all__ = ["SSDInputs", "SSDLaunch", "check_ssd_inputs", "mamba_chunk_scan_combined", "ssd_scan"]

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
    if not isinstance(return_final_states, bool):
        raise TypeError(f"return_final_states must be a bool, got {type(return_final_states).__name__}")
    out, final_states, varlen_states = ssd_scan(check_ssd_inputs(locals()), backend=backend, launch=launch)
    results = (out,) + ((final_states,) if return_final_states else ()) + (
        (varlen_states,) if return_varlen_states else ()
    )
    return results[0] if len(results) == 1 else results


def ssd_scan(
    inputs: SSDInputs, *, backend: str = "auto", launch: SSDLaunch | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run checked inputs on a backend: ``(out (b, l, h, p), final_states (b, h, p, n), varlen_states (s, h, p,
    n) or None)``, as :func:`mamba_chunk_scan_combined` with every state returned."""
    if launch is not None and not isinstance(launch, SSDLaunch):
        raise TypeError(f"launch must be an SSDLaunch or None, got {type(launch).__name__}")
    backend = resolve_backend(backend, inputs.device, has_triton=True)
    if backend == "triton":
        # Imported here, not at the top: `import ssmkit` must never import triton.
        from ssmkit.ops.ssd.triton import ssd_triton

        return ssd_triton(inputs, launch or DEFAULT_LAUNCH)
    return _BACKENDS[backend](inputs)
