"""One decode step of a selective SSM: ``selective_state_update``, as ``mamba_ssm``'s function of that name.

A single step needs no chunking: the public function validates, maps Mamba-1 and compact Mamba-2 shapes
onto the full Mamba-2 form (b, h, p, n) by views, and runs either the vectorised torch step of
``reference.py`` (backends "reference" and "chunked", which are the same thing for one step) or the
Triton kernel of ``triton.py`` ("auto" on CUDA).
"""

from __future__ import annotations

import dataclasses

import torch

from ssmkit.ops._checks import Dims, check_nonempty, check_same_device, check_tensor
from ssmkit.ops._step_sizes import NO_LIMIT, check_dt_limit
from ssmkit.ops.backend import resolve_backend
from ssmkit.ops.state_update.inputs import StepInputs
from ssmkit.ops.state_update.reference import (
    PAD_SLOT_ID,
    selective_state_update_reference,
)

__all__ = ["selective_state_update"]


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: torch.Tensor | None = None,
    *,
    pad_slot_id: int = PAD_SLOT_ID,
    dt_limit: tuple[float, float] = NO_LIMIT,
    backend: str = "auto",
) -> torch.Tensor:
    """Advance the SSM state by one token, **in place**, and return that token's output.

    ``Δ = clamp(softplus(dt + dt_bias), *dt_limit)`` (each part optional), then::

        state ← exp(Δ A) ⊙ state + Δ x ⊗ B
        y = (state · C + D x) · silu(z)

    Shapes, told apart by the rank of ``state``:

    ==========  ===================  ==========================================
    argument    Mamba-1              Mamba-2 (``h % g == 0``)
    ==========  ===================  ==========================================
    state       (b, d, n)            (b, h, p, n)  (b → s slots with state_batch_indices)
    x, z        (b, d)               (b, h, p)
    dt          (b, d)               (b, h, p) or (b, h)
    A           (d, n)               (h, p, n) or (h,)
    B, C        (b, n) or (b, g, n)  (b, g, n) or (b, n)
    D, dt_bias  (d,)                 (h, p) or (h,)
    ==========  ===================  ==========================================

    Channel / head ``i`` reads B/C group ``i // (heads / g)``.

    Args:
        state: the SSM state in any floating dtype, updated in place (the same tensor object, so a
            cache slice or a CUDA-graph buffer stays valid). float16/bfloat16 states are read, stepped
            in float32 and rounded back once per step (as mamba_ssm). Not differentiable.
        x, dt, A, B, C, D, z, dt_bias: any floating dtype; see the table.
        dt_softplus: apply softplus to ``dt + dt_bias`` (threshold 20, as mamba_ssm).
        state_batch_indices: (b,) integer, row i of the inputs steps state slot
            ``state_batch_indices[i]`` of a pool ``state`` of s slots (continuous batching: a server's
            cache pool, in any order). Rows whose index is negative or equals ``pad_slot_id`` are
            padding: their y is 0 and no slot is touched. Two rows must not name the same slot.
            Indices >= s raise (checked on the host, a device sync, except during CUDA-graph capture,
            where the Triton kernel treats them as padding instead of writing out of bounds).
        pad_slot_id: the index value that marks a padding row (vLLM's ``PAD_SLOT_ID``, -1), besides
            any negative index (mamba_ssm skips every index < 0).
        dt_limit: (lo, hi) clamp of Δ after softplus; the default ``(0, inf)`` means no clamp.
        backend: "auto" (Triton on CUDA when triton imports, else the torch step), "reference" or
            "chunked" (both the vectorised torch step: a single step has nothing to chunk) or "triton"
            (float32 state and no float64 input; on CPU only under ``TRITON_INTERPRET=1``). "auto"
            takes the torch step for float64.

    Returns:
        y with x's shape and dtype. The step is computed in float32 (float64 when the state or an
        input is float64) and written back in the state's dtype.

    NaN/inf are not checked (that would cost a device sync). A NaN in x, dt or dt_bias of one channel
    (or head), or in B of one group, makes that channel's (group's) ``y`` and state NaN, and the state
    stays NaN at later steps until the caller resets it; a NaN in C, D or z only makes ``y`` NaN.

    Example:
        >>> b, d, n = 2, 8, 4
        >>> state = torch.zeros(b, d, n)
        >>> A = -torch.rand(d, n)
        >>> y = selective_state_update(state, torch.randn(b, d), torch.rand(b, d), A,
        ...                            torch.randn(b, n), torch.randn(b, n), D=torch.ones(d))
        >>> y.shape, bool(state.abs().sum() > 0)
        (torch.Size([2, 8]), True)
    """
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"state must be a torch.Tensor, got {type(state).__name__}")
    if not state.is_floating_point():
        raise TypeError(f"state must be a floating-point tensor, got {state.dtype}")
    dt_limit = check_dt_limit(dt_limit)
    if isinstance(pad_slot_id, bool) or not isinstance(pad_slot_id, int):
        raise TypeError(f"pad_slot_id must be an int, got {type(pad_slot_id).__name__}")
    # With state_batch_indices the state is a pool of s slots and x binds the batch b.
    dims = Dims()
    if state.dim() == 3:
        views = _mamba1_views(dims, state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices is not None)
    elif state.dim() == 4:
        views = _mamba2_views(dims, state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices is not None)
    else:
        raise ValueError(
            f"state must have shape (b, d, n) (Mamba-1) or (b, h, p, n) (Mamba-2), got {tuple(state.shape)}"
        )
    if state_batch_indices is not None:
        check_tensor("state_batch_indices", state_batch_indices, ("b",), dims, floating=False, integer=True)
    check_same_device(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                      state_batch_indices=state_batch_indices)
    inputs = StepInputs(*views, dt_softplus, dt_limit)
    has_fp64 = any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in inputs.unpack())
    backend = resolve_backend("reference" if backend == "auto" and has_fp64 else backend, state.device,
                              has_triton=True)
    if state_batch_indices is not None and not _capturing(state):
        _check_slots(state_batch_indices, state.shape[0], pad_slot_id)
    if backend == "triton":
        if has_fp64:
            raise ValueError("backend='triton' computes in float32: use backend='reference' for float64 "
                             "states or inputs ('auto' does)")
        from ssmkit.ops.state_update.triton import selective_state_update_triton

        y = selective_state_update_triton(inputs, state_batch_indices, pad_slot_id)
    elif state_batch_indices is not None:
        y = _step_slots(inputs, state_batch_indices, pad_slot_id)
    else:
        y = selective_state_update_reference(inputs)
    return y.view(x.shape)


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_slots(indices: torch.Tensor, slots: int, pad_slot_id: int) -> None:
    """Every index that is not padding names an existing slot (one host sync)."""
    live = indices[(indices >= 0) & (indices != pad_slot_id)]
    if live.numel() and int(live.max()) >= slots:
        raise ValueError(f"state_batch_indices must be < the {slots} state slots (or padding), "
                         f"got {int(live.max())}")


def _step_slots(inputs: StepInputs, indices: torch.Tensor, pad_slot_id: int) -> torch.Tensor:
    """The torch step on the slots the rows name: gathered, stepped, written back; padding rows give 0."""
    state, x, dt, B, C, z = inputs.state, inputs.x, inputs.dt, inputs.B, inputs.C, inputs.z
    live = ((indices >= 0) & (indices != pad_slot_id)).nonzero().squeeze(1)
    slots = indices[live].long()
    y = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    if live.numel() == 0:
        return y
    sub = state.index_select(0, slots)

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, live)

    y[live] = selective_state_update_reference(dataclasses.replace(
        inputs, state=sub, x=rows(x), dt=rows(dt), B=rows(B), C=rows(C), z=rows(z)
    ))
    state.index_copy_(0, slots, sub)
    return y


def _check_bc(dims: Dims, B: object, C: object, heads: str) -> None:
    """B and C as (b, n) or (b, g, n), with the same groups, dividing the heads."""
    for name, t in (("B", B), ("C", C)):
        if isinstance(t, torch.Tensor) and t.dim() == 2:
            if dims.setdefault("g", 1) != 1:
                raise ValueError(f"{name} must have shape (b, g={dims['g']}, n) like B, got {tuple(t.shape)}")
            check_tensor(name, t, ("b", "n"), dims)
        else:
            check_tensor(name, t, ("b", "g", "n"), dims)
    if dims["g"] == 0 or dims[heads] % dims["g"]:
        raise ValueError(f"B/C groups g={dims['g']} must divide the {heads}={dims[heads]} (B of shape (b, g, n))")


def _groups(t: torch.Tensor) -> torch.Tensor:
    return t[:, None] if t.dim() == 2 else t


def _mamba1_views(dims, state, x, dt, A, B, C, D, z, dt_bias, pooled):
    """Mamba-1 shapes as the (b, h=d, p=1, n) form."""
    check_tensor("state", state, ("s" if pooled else "b", "d", "n"), dims)
    check_tensor("x", x, ("b", "d"), dims)
    check_nonempty("x", dims["b"], "batch")
    check_tensor("dt", dt, ("b", "d"), dims)
    check_tensor("A", A, ("d", "n"), dims)
    _check_bc(dims, B, C, "d")
    if D is not None:
        check_tensor("D", D, ("d",), dims)
    if z is not None:
        check_tensor("z", z, ("b", "d"), dims)
    if dt_bias is not None:
        check_tensor("dt_bias", dt_bias, ("d",), dims)
    return (
        state[:, :, None], x[..., None], dt[..., None], A[:, None], _groups(B), _groups(C),
        None if D is None else D[:, None], None if z is None else z[..., None],
        None if dt_bias is None else dt_bias[:, None],
    )


def _mamba2_views(dims, state, x, dt, A, B, C, D, z, dt_bias, pooled):
    """Mamba-2 shapes, compact per-head forms broadcast over p (and n) by views."""
    check_tensor("state", state, ("s" if pooled else "b", "h", "p", "n"), dims)
    check_tensor("x", x, ("b", "h", "p"), dims)
    check_nonempty("x", dims["b"], "batch")
    compact = {}
    for name, t, full, short in (
        ("dt", dt, ("b", "h", "p"), ("b", "h")),
        ("A", A, ("h", "p", "n"), ("h",)),
        ("D", D, ("h", "p"), ("h",)),
        ("dt_bias", dt_bias, ("h", "p"), ("h",)),
    ):
        if t is None:
            continue
        is_short = isinstance(t, torch.Tensor) and t.dim() == len(short)
        check_tensor(name, t, short if is_short else full, dims)
        compact[name] = is_short
    _check_bc(dims, B, C, "h")
    if z is not None:
        check_tensor("z", z, ("b", "h", "p"), dims)
    return (
        state, x,
        dt[..., None] if compact["dt"] else dt,
        A[:, None, None] if compact["A"] else A,
        _groups(B), _groups(C),
        D[:, None] if D is not None and compact["D"] else D,
        z,
        dt_bias[:, None] if dt_bias is not None and compact["dt_bias"] else dt_bias,
    )
