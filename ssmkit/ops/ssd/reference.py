"""Mamba-2 SSD as a plain sequential recurrence: the definition the fast backends are checked against.

Dimensions:
    b  batch
    l  sequence length
    h  heads
    p  head dimension (channels per head)
    g  groups of B/C (head i reads group i // (h // g))
    n  state size
    s  number of packed sequences (``cu_seqlens``)

The recurrence (Mamba-2 paper, "Transformers are SSMs", eq. 2 with a scalar decay per head):
    Δ_t = clamp(softplus(dt_t + dt_bias))          (each step optional, see ``discretize_dt``)
    H_t = exp(Δ_t A) H_{t-1} + Δ_t x_t ⊗ B_t       H: (p, n) per head (input_scale_t in place of the
                                                   second Δ_t when given)
    y_t = H_t C_t + D x_t,  out_t = y_t · silu(z_t)
``seq_idx`` restarts the state (at zero) wherever its value changes; ``initial_states`` is the state
before the first position, so it only reaches the first document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops._precision import compute_dtype
from ssmkit.ops._step_sizes import discretize_dt
from ssmkit.ops.ssd.inputs import SSDInputs, doc_starts


def gate_and_skip(
    y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None
) -> torch.Tensor:
    """``(y + D x) · silu(z)`` in y's dtype. y, x, z: (b, l, h, p); D: (h,) or (h, p)."""
    if D is not None:
        skip = D.to(y.dtype)
        y = y + x.to(y.dtype) * (skip[:, None] if skip.dim() == 1 else skip)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def ssd_reference(inputs: SSDInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Token-by-token SSD recurrence of checked :class:`~ssmkit.ops.ssd.inputs.SSDInputs`.

    ``chunk_size`` is ignored (there are no chunks here; the rule of :mod:`ssmkit.ops.chunking`).
    Returns ``(out (b, l, h, p) in x.dtype, final_states (b, h, p, n), varlen_states (s, h, p, n)
    or None)``; states are float32, or float64 when an input is float64.
    """
    (x, dt, A, B, C, _chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_softplus, dt_limit,
     input_scale) = inputs.unpack()
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    dtype = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_states, input_scale)
    delta = discretize_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)
    weight = delta if input_scale is None else input_scale.to(dtype)  # of x_t in the update
    xs = x.to(dtype)
    # Head i reads group i // (h // g): repeat each group for its heads (clear, not fast).
    Bh = B.to(dtype).repeat_interleave(h // g, dim=2)  # (b, l, h, n)
    Ch = C.to(dtype).repeat_interleave(h // g, dim=2)  # (b, l, h, n)
    decay = torch.exp(delta * A.to(dtype))  # (b, l, h)
    starts = doc_starts(seq_idx) if seq_idx is not None else None
    ends = set((cu_seqlens[1:] - 1).tolist()) if cu_seqlens is not None else set()

    if initial_states is not None:
        state = initial_states.to(dtype)
    else:
        state = x.new_zeros(b, h, p, n, dtype=dtype)
    ys, varlen = [], []
    for t in range(l):
        if starts is not None:
            # torch.where (not a multiply by 0) so that NaN of one document stays in it.
            state = torch.where(starts[:, t, None, None, None], torch.zeros_like(state), state)
        inp = (weight[:, t, :, None] * xs[:, t])[..., None] * Bh[:, t, :, None, :]  # (b, h, p, n)
        state = decay[:, t, :, None, None] * state + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
        if t in ends:
            varlen.append(state[0])
    y = gate_and_skip(torch.stack(ys, dim=1), xs, D, z)
    varlen_states = torch.stack(varlen) if cu_seqlens is not None else None
    return y.to(x.dtype), state, varlen_states
