"""Mamba-3 scan as a plain sequential recurrence: the definition the chunked backend is checked against.

Dimensions:
    b  batch
    l  sequence length
    h  heads
    p  head dimension (channels per head)
    r  MIMO rank (1 for the single-input single-output model)
    g  groups of B/C (head i reads group i // (h // g))
    n  state size
    a  rotary angles per head (a <= n // 2; state pairs beyond them are not rotated)

The recurrence (Mamba-3 paper, arXiv 2603.15569: exponential-trapezoidal discretisation, complex state
as data-dependent rotations, MIMO), per head, as mamba_ssm's ``mamba3_siso_combined`` / ``mamba3_mimo``
compute it::

    λ_t = sigmoid(trap_t)      α_t = exp(Δ_t A_t)     β_t = (1 - λ_t) Δ_t α_t     γ_t = λ_t Δ_t
    θ_t = θ_{t-1} + Δ_t · π·tanh(angles_t)                       (mod 2π), θ: (a,)
    B̃_{t,r} = R(θ_t) (B_{t,r} + B_bias_r),  C̃_{t,r} = R(θ_t) (C_{t,r} + C_bias_r)
    x̃_{t,r} = x_t ⊙ mimo_x_r                                       (x_t itself without mimo_x)
    u_t = Σ_r x̃_{t,r} ⊗ B̃_{t,r}                                    (p, n)
    H_t = α_t H_{t-1} + β_t u_{t-1} + γ_t u_t
    y_{t,r} = H_t C̃_{t,r} + D x̃_{t,r},  then y_{t,r} · silu(z_t ⊙ mimo_z_r)
    out_t = Σ_r mimo_o_r ⊙ y_{t,r}     (without mimo_o the r outputs are returned as they are)

R(θ) rotates the state pairs (2i, 2i+1) (``rotary_interleaved``, mamba_ssm's single-input kernel) or
(i, i + n//2) (its MIMO kernel) by θ_i for i < a: a block-diagonal complex state with eigenvalues
α_t e^{iΔθ}, written as rotations of B and C. With λ = 1 and θ = 0 this is Mamba-2's (Euler) update.
The pair (B̃_{t-1}, x_{t-1}) and θ_{t-1} are part of the state. ``seq_idx`` restarts all of it (at
zero) wherever its value changes; ``initial_state`` is the state before position 0 and only reaches
the first document.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ssmkit.ops.mamba3.inputs import Mamba3Inputs, Mamba3ScanState
from ssmkit.ops.ssd.reference import doc_starts

TWO_PI = 2 * math.pi


class Prepared(NamedTuple):
    """Per-token quantities of the recurrence, in the compute dtype (float32 or float64).

    Bh, Ch: (b, l, r, h, n) biased, not yet rotated; xr: (b, l, r, h, p) = x̃; log_a: (b, l, h) = Δ·A;
    gamma: (b, l, h) = λΔ; delta: (b, l, h) = (1 - λ)Δ (so β = α·delta); dtheta: (b, l, h, a) = Δ·π·tanh.
    Bh, Ch and dtheta are None when :func:`prepare` was asked for the ``fused`` form.
    """

    Bh: torch.Tensor | None
    Ch: torch.Tensor | None
    xr: torch.Tensor
    log_a: torch.Tensor | None
    gamma: torch.Tensor | None
    delta: torch.Tensor | None
    dtheta: torch.Tensor | None


def prepare(inputs: Mamba3Inputs, dtype: torch.dtype, fused: bool = False, scalars: bool = True) -> Prepared:
    """Everything the recurrence needs per token (shapes in :class:`Prepared`).

    ``fused``: for a caller whose kernels build B̃, C̃ and θ themselves (the SSD route's Triton form): Bh, Ch
    and dtheta are None, and without ``mimo_x`` xr is a view of x in its own dtype (no float32 copy).
    ``scalars=False``: log_a, gamma and delta are None (the caller makes them).
    """
    x, dt, A, B, C, trap, angles = inputs.x, inputs.dt, inputs.A, inputs.B, inputs.C, inputs.trap, inputs.angles
    B_bias, C_bias, mimo_x = inputs.B_bias, inputs.C_bias, inputs.mimo_x
    h = x.shape[2]
    dt = dt.to(dtype)
    lam = torch.sigmoid(trap.to(dtype)) if scalars else None

    def per_head(v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # The biases are per head, so B and C become per head here even when groups are shared.
        v = v.to(dtype).repeat_interleave(h // v.shape[3], dim=3)
        return v if bias is None else v + bias.to(dtype).transpose(0, 1)

    xr = (x if fused and mimo_x is None else x.to(dtype))[:, :, None]
    if mimo_x is not None:
        xr = xr * mimo_x.to(dtype).transpose(0, 1)
    else:
        xr = xr.expand(-1, -1, B.shape[2], -1, -1)
    return Prepared(
        Bh=None if fused else per_head(B, B_bias),
        Ch=None if fused else per_head(C, C_bias),
        xr=xr,
        log_a=dt * A.to(dtype) if scalars else None,
        gamma=lam * dt if scalars else None,
        delta=(1 - lam) * dt if scalars else None,
        dtheta=None if fused else dt[..., None] * math.pi * torch.tanh(angles.to(dtype)),
    )


def rotate(v: torch.Tensor, theta: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the state pairs of ``v`` (..., n) by ``theta`` (..., a), broadcasting the leading dims.

    Pairs are (2i, 2i+1) when ``interleaved``, else (i, i + n//2), for i < a; other entries pass.
    """
    a, n = theta.shape[-1], v.shape[-1]
    cos, sin = torch.cos(theta), torch.sin(theta)
    if interleaved:
        pairs = v[..., : 2 * a].unflatten(-1, (a, 2))
        v0, v1 = pairs[..., 0], pairs[..., 1]
        turned = torch.stack([v0 * cos - v1 * sin, v0 * sin + v1 * cos], dim=-1).flatten(-2)
        return torch.cat([turned, v[..., 2 * a:].expand(turned.shape[:-1] + (n - 2 * a,))], dim=-1)
    half = n // 2
    v0, v1 = v[..., :a], v[..., half:half + a]
    rest0, rest1 = v[..., a:half], v[..., half + a:]
    r0, r1 = v0 * cos - v1 * sin, v0 * sin + v1 * cos
    lead = r0.shape[:-1]
    return torch.cat([r0, rest0.expand(lead + rest0.shape[-1:]), r1, rest1.expand(lead + rest1.shape[-1:])], dim=-1)


def mix_input(xr: torch.Tensor, Bt: torch.Tensor) -> torch.Tensor:
    """u = Σ_r x̃_r ⊗ B̃_r: (b, h, p, n) from xr (b, r, h, p) and Bt (b, r, h, n)."""
    return torch.einsum("brhp,brhn->bhpn", xr, Bt)


def finish(
    y: torch.Tensor,
    xr: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    mimo_z: torch.Tensor | None,
    mimo_o: torch.Tensor | None,
) -> torch.Tensor:
    """Skip, gate and down-projection: y, xr (b, l, r, h, p) -> (b, l, h, p) with mimo_o, else (b, l, r, h, p)."""
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * xr
    if z is not None:
        zr = z.to(y.dtype)[:, :, None]
        if mimo_z is not None:
            zr = zr * mimo_z.to(y.dtype).transpose(0, 1)
        y = y * F.silu(zr)
    if mimo_o is not None:
        y = (y * mimo_o.to(y.dtype).transpose(0, 1)).sum(dim=2)
    return y


def zero_state(b: int, h: int, p: int, r: int, n: int, a: int, dtype: torch.dtype,
               device: torch.device) -> Mamba3ScanState:
    """The all-zero state (what a document starts from)."""
    return Mamba3ScanState(
        angle=torch.zeros(b, h, a, dtype=dtype, device=device),
        ssm=torch.zeros(b, h, p, n, dtype=dtype, device=device),
        last_B=torch.zeros(b, r, h, n, dtype=dtype, device=device),
        last_x=torch.zeros(b, h, p, dtype=dtype, device=device),
    )


def mamba3_reference(inputs: Mamba3Inputs) -> tuple[torch.Tensor, Mamba3ScanState]:
    """Token-by-token Mamba-3 recurrence of checked :class:`~ssmkit.ops.mamba3.inputs.Mamba3Inputs`.

    ``chunk_size`` is ignored (no chunks here; the rule of :mod:`ssmkit.ops.chunking`). Returns
    ``(out, final_state)``:
    out (b, l, h, p) with ``mimo_o``, else (b, l, r, h, p), in x's dtype; the state in float32 (float64
    when an input is float64).
    """
    x, B, angles, D, z, seq_idx = inputs.x, inputs.B, inputs.angles, inputs.D, inputs.z, inputs.seq_idx
    mimo_x, mimo_z, mimo_o, initial_state = inputs.mimo_x, inputs.mimo_z, inputs.mimo_o, inputs.initial_state
    rotary_interleaved = inputs.rotary_interleaved
    b, l, h, p = x.shape
    r, n, a = B.shape[2], B.shape[4], angles.shape[3]
    dtype = inputs.compute_dtype()
    prep = prepare(inputs, dtype)
    mx = None if mimo_x is None else mimo_x.to(dtype).transpose(0, 1)  # (r, h, p)
    xs = x.to(dtype)
    zero = zero_state(b, h, p, r, n, a, dtype, x.device)
    state = zero if initial_state is None else Mamba3ScanState(*(t.to(dtype) for t in initial_state))
    theta, H, B_prev, x_prev = state
    starts = doc_starts(seq_idx) if seq_idx is not None else None
    ys = []
    for t in range(l):
        if starts is not None:
            # torch.where (not a multiply by 0) so that NaN of one document stays in it.
            s = starts[:, t]
            theta, H, B_prev, x_prev = (
                torch.where(s.view(-1, *[1] * (v.dim() - 1)), z0, v)
                for v, z0 in zip((theta, H, B_prev, x_prev), zero)
            )
        theta = torch.remainder(theta + prep.dtheta[:, t], TWO_PI)
        Bt = rotate(prep.Bh[:, t], theta[:, None], rotary_interleaved)  # (b, r, h, n)
        Ct = rotate(prep.Ch[:, t], theta[:, None], rotary_interleaved)
        xr_prev = x_prev[:, None] * mx if mx is not None else x_prev[:, None].expand(-1, r, -1, -1)
        alpha = torch.exp(prep.log_a[:, t])[..., None, None]  # (b, h, 1, 1)
        beta = alpha * prep.delta[:, t, :, None, None]
        H = alpha * H + beta * mix_input(xr_prev, B_prev) + prep.gamma[:, t, :, None, None] * mix_input(
            prep.xr[:, t], Bt)
        ys.append(torch.einsum("bhpn,brhn->brhp", H, Ct))
        B_prev, x_prev = Bt, xs[:, t]
    y = finish(torch.stack(ys, dim=1), prep.xr, D, z, mimo_z, mimo_o)
    return y.to(x.dtype), Mamba3ScanState(theta, H, B_prev, x_prev)
