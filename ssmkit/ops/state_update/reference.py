"""One decode step of a selective SSM (Mamba-1 and Mamba-2), vectorised over batch, heads and state.

Dimensions: ``b`` batch, ``h`` heads, ``p`` head dim, ``n`` state size, ``g`` groups of B/C (head ``i``
reads group ``i // (h / g)``). Mamba-1 is the case ``h = d`` channels, ``p = 1``; its shapes are mapped
onto this one by the public function, as are Mamba-2's compact per-head forms.

Step (the recurrence of ``selective_scan`` / ``ssd`` for a single position)::

    Δ = clamp(softplus(dt + dt_bias), *dt_limit)       (each part optional)
    state ← exp(Δ A) ⊙ state + (Δ x) ⊗ B
    y = state · C + D x,  then y · silu(z)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops._precision import compute_dtype
from ssmkit.ops._step_sizes import discretize_dt
from ssmkit.ops.state_update.inputs import StepInputs

# The index that marks a padding row of a continuous batch (vLLM's PAD_SLOT_ID); any negative index does too.
PAD_SLOT_ID = -1


def selective_state_update_reference(inputs: StepInputs) -> torch.Tensor:
    """Advance ``state`` (b, h, p, n) by one step in place and return y (b, h, p) in x's dtype.

    Arguments are validated and broadcast-ready: x, z (b, h, p); dt (b, h, p or 1);
    A (h, p or 1, n or 1); B, C (b, g, n); D, dt_bias (h, p or 1). The step is computed in float64
    if the state or any input is float64, else in float32, and written back in the state's dtype.
    """
    state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit = inputs.unpack()
    ct = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    b, h, p, n = state.shape
    g = B.shape[1]
    delta = discretize_dt(dt, dt_bias, dt_softplus, dt_limit, ct)
    x_ = x.to(ct)
    # Heads as (g, h / g) so that each head reads its group's B and C by broadcasting.
    hg = h // g
    decay = torch.exp(delta[..., None] * A.to(ct))  # (b, h, p or 1, n or 1)
    # The update runs in the state's own memory when it is contiguous and in the compute dtype
    # (the common decode case): no (b, h, p, n) temporaries.
    work = state.to(ct).contiguous()
    s = work.view(b, g, hg, p, n)
    s.mul_(decay.view(b, g, hg, *decay.shape[2:]))
    s.addcmul_((delta * x_).view(b, g, hg, p, 1), B.to(ct).reshape(b, g, 1, 1, n))
    y = torch.matmul(s.view(b * g, hg * p, n), C.to(ct).reshape(b * g, n, 1)).view(b, h, p)
    if work is not state:
        state.copy_(work)
    if D is not None:
        y = y + D.to(ct) * x_
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(x.dtype)
