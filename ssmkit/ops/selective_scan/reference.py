"""Sequential reference for the Mamba-1 selective scan: the definition the fast paths are tested against.

Dimensions: ``b`` batch, ``d`` channels, ``l`` length, ``n`` state size, ``g`` groups of B/C
(channel ``d`` reads group ``d // (d / g)``).

Recurrence (Mamba paper, Algorithm 2, zero-order hold for A and Euler for B)::

    Δ_t = softplus(delta_t + delta_bias)        (softplus only if delta_softplus)
    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t     h_{-1} = initial_state (or 0)
    y_t = C_t · h_t + D u_t
    out_t = y_t · silu(z_t)

With ``seq_idx`` the state restarts from zero at every step where ``seq_idx`` changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ssmkit.ops._precision import compute_dtype

if TYPE_CHECKING:
    from ssmkit.ops.selective_scan.inputs import ScanInputs


def selective_scan_reference(inputs: ScanInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """One step at a time over ``l``; arguments already validated, B and C as (b, g, n, l).

    Returns ``out`` (b, d, l) in u's dtype and the last state (b, d, n) in the compute dtype.
    """
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx = inputs.unpack()
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    b, d, l = u.shape
    g, n = B.shape[1], B.shape[2]
    u_, delta_, A_ = u.to(ct), delta.to(ct), A.to(ct)
    if delta_bias is not None:
        delta_ = delta_ + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta_ = F.softplus(delta_)
    if initial_state is None:
        h = u_.new_zeros(b, d, n)
    else:
        h = initial_state.to(ct)
    # Per-step slices by unbind, whose backward is one stack (indexing [..., t] would cost a full-size
    # gradient per step).
    us, deltas = u_.unbind(-1), delta_.unbind(-1)
    Bs, Cs = B.to(ct).unbind(-1), C.to(ct).unbind(-1)
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            # where(), not a multiply by 0, so that inf/NaN of the previous document cannot leak in.
            new_doc = (seq_idx[:, t] != seq_idx[:, t - 1])[:, None, None]
            h = torch.where(new_doc, torch.zeros_like(h), h)
        # Each channel reads the B/C row of its group: (b, g, n) -> (b, d, n).
        B_t = Bs[t].repeat_interleave(d // g, dim=1)
        C_t = Cs[t].repeat_interleave(d // g, dim=1)
        decay = torch.exp(deltas[t][:, :, None] * A_)
        h = decay * h + (deltas[t] * us[t])[:, :, None] * B_t
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(ct)[:, None] * u_
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(u.dtype), h
