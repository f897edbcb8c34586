"""Chunked selective scan: the fast PyTorch path (CPU first, any device).

Dimensions as in ``reference.py``; ``T`` is the chunk length, ``dg = d / g`` the channels of a group.

The work is elementwise over ``b·d·l·n``, so speed is the number of passes over that expansion and how
well each pass vectorises. Sequences are taken time-major per row, (b, l, d): free when the inputs are
transposed views of (b, l, ·) tensors, as a Mamba layer makes them (the output then keeps that layout),
else one blocked 2-D transpose each. Each step's state is one contiguous (b, g, n, dg) block with
channels innermost. Per chunk of ``T`` steps:

1. ``a = exp(Δ A)`` for the whole chunk (one broadcast multiply, one ``exp2``),
2. ``x = (Δ u) B`` written straight into the state buffer,
3. ``h_t = a_t ⊙ h_{t-1} + x_t`` by one in-place ``addcmul_`` per step (the only sequential part),
4. ``y_t = C_t · h_t + D u_t`` as one batched (1, n) @ (n, dg) matmul over (row, step, group).

Every factor is the ``exp(Δ_t A)`` of one step, as in the recurrence, and nothing divides by a cumulative
decay, so any Δ and A (Δ of 10 and more, A of -100 and below) give the reference's numbers without
overflow, in float32 as in float64: no threshold, no chunk splitting. The cumulative-log-decay form
(``h_t = E_t (h_0 + Σ_s x_s / E_s)`` with ``E = exp(A cumsum Δ)``) needs more passes and a slow
``cumsum``, and overflows once ``|A Σ Δ|`` over a chunk passes ~80 in float32; on 1 CPU thread at the
Mamba-130M shape (b=1, d=1536, n=16, l=2048, float32) it took ~340 ms against ~70 ms for this form.

The whole op (bias, softplus, D and the z gate included) is one ``autograd.Function``, so that no
(b, d, l)-sized temporary is made that in-place or per-chunk work can avoid (on a VM each fresh large
allocation costs page faults). The forward pass keeps only the state at each chunk boundary,
(l / T + 1, b, d, n); the backward pass recomputes each chunk's states from it, runs the adjoint
recurrence ``g_t = C_t dy_t + a_{t+1} ⊙ g_{t+1}`` backwards over the chunk and reads every gradient off
``h`` and ``g``::

    dC_t = Σ_{d in group} dy_t h_t         dB_t = Σ_{d in group} Δ_t u_t g_t
    du_t = Δ_t (B_t · g_t) + D dy_t        dΔ_t = u_t (B_t · g_t) + A · q_t,   q_t = g_t ⊙ a_t ⊙ h_{t-1}
    dA = Σ_{b,t} Δ_t q_t                   dh_{-1} = a_0 ⊙ g_0

with q zero where a document starts, dy = dout · silu(z), and softplus' derivative sigmoid(x) = 1 - e^-Δ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ssmkit.ops._precision import compute_dtype
from ssmkit.ops.selective_scan.inputs import ScanInputs

# Tuned on one thread of a shared 2-core CPU at the Mamba-130M shape (b=1, d=1536, n=16, l=2048):
# chunks of 12..32 steps (buffers of ~0.5M values, 2 MiB in float32) were fastest; 64 and more fall out
# of cache, fewer than 8 spend the time in per-chunk Python overhead.
_TARGET_CHUNK_ELEMENTS = 1 << 19
_MIN_CHUNK, _MAX_CHUNK = 8, 64
_LOG2E = 1.4426950408889634
# softplus(x) = x above this, as in torch.nn.functional.softplus and mamba_ssm.
_SOFTPLUS_THRESHOLD = 20.0
# Channels per block when gating, so that silu(z)'s temporary stays small.
_GATE_BLOCK = 64


def default_chunk_size(b: int, d: int, n: int, l: int) -> int:
    """Steps per chunk so that a (b, T, d, n) buffer holds about ``_TARGET_CHUNK_ELEMENTS`` values."""
    return max(1, min(l, _MAX_CHUNK, max(_MIN_CHUNK, _TARGET_CHUNK_ELEMENTS // (b * d * n))))


def _keep_masks(resets: torch.Tensor | None) -> dict[int, torch.Tensor]:
    """Step index -> (b, 1, 1, 1) mask of the rows whose state carries over (False where a document starts)."""
    if resets is None:
        return {}
    steps = torch.nonzero(resets.any(dim=0)).flatten().tolist()
    return {t: ~resets[:, t, None, None, None] for t in steps}


def _decay_and_inputs(
    delta: torch.Tensor, du: torch.Tensor, A2: torch.Tensor, B: torch.Tensor, dA: torch.Tensor, H: torch.Tensor
) -> None:
    """Fill ``dA`` with exp(Δ A) and ``H[:, 1:]`` with (Δ u) B for one chunk, in the state layout.

    delta, du: (b, T, d); A2: (g, n, dg) holding A·log2(e); B: (b, T, g, n);
    dA: (b, T, g, n, dg); H: (b, T + 1, g, n, dg).
    """
    b, T, _ = delta.shape
    g, n, dg = A2.shape
    torch.mul(delta.view(b, T, g, 1, dg), A2, out=dA)
    # exp2 of a pre-scaled A: same rounding as exp(Δ A), about 3x cheaper than torch.exp on CPU.
    dA.exp2_()
    torch.mul(du.view(b, T, g, 1, dg), B.view(b, T, g, n, 1), out=H[:, 1:])


def _scan_forward(H: torch.Tensor, dA: torch.Tensor, t0: int, keep: dict[int, torch.Tensor]) -> None:
    """In place: ``H[:, t+1] += dA[:, t] ⊙ H[:, t]`` for t = 0..T-1; rows in a new document skip the decay."""
    hs, decays = H.unbind(1), dA.unbind(1)
    for t, a in enumerate(decays):
        mask = keep.get(t0 + t)
        if mask is None:
            hs[t + 1].addcmul_(a, hs[t])
        else:
            # where(), not a multiply by zero: inf/NaN of the previous document must not leak in.
            hs[t + 1].copy_(torch.where(mask, torch.addcmul(hs[t + 1], a, hs[t]), hs[t + 1]))


def _scan_backward(G: torch.Tensor, dA: torch.Tensor, t0: int, keep: dict[int, torch.Tensor]) -> None:
    """In place: ``G[:, t] += dA[:, t+1] ⊙ G[:, t+1]`` for t = T-2..0 (the adjoint recurrence, backwards)."""
    gs, decays = G.unbind(1), dA.unbind(1)
    for t in range(len(gs) - 2, -1, -1):
        mask = keep.get(t0 + t + 1)
        if mask is None:
            gs[t].addcmul_(decays[t + 1], gs[t + 1])
        else:
            gs[t].copy_(torch.where(mask, torch.addcmul(gs[t], decays[t + 1], gs[t + 1]), gs[t]))


def _to_state_layout(x: torch.Tensor, g: int) -> torch.Tensor:
    """(..., d, n) -> (..., g, n, d // g): channels innermost, so that C·h is a row-vector matmul."""
    *lead, d, n = x.shape
    return x.reshape(*lead, g, d // g, n).transpose(-1, -2).contiguous()


def _from_state_layout(x: torch.Tensor) -> torch.Tensor:
    """(..., g, n, dg) -> (..., g·dg, n)."""
    *lead, g, n, dg = x.shape
    return x.transpose(-1, -2).reshape(*lead, g * dg, n)


def _is_time_major(x: torch.Tensor) -> bool:
    """True when a (b, k, l) tensor is a transposed view of a contiguous (b, l, k) one."""
    return not x.is_contiguous() and x.transpose(1, 2).is_contiguous()


def _swap_last(x: torch.Tensor) -> torch.Tensor:
    """(b, m, k) -> contiguous (b, k, m); free when the memory is already in that order."""
    xt = x.transpose(1, 2)
    if xt.is_contiguous():
        return xt
    out = x.new_empty(xt.shape)
    # One 2-D copy per batch row: PyTorch has a blocked kernel for contiguous <- transposed 2-D copies
    # that is several times faster than a general strided copy.
    for i in range(x.shape[0]):
        out[i].copy_(x[i].t())
    return out


def _from_time_major(x: torch.Tensor, keep_time_major: bool) -> torch.Tensor:
    """Contiguous (b, l, k) -> (b, k, l): a free transposed view, or contiguous when not asked to keep."""
    return x.transpose(1, 2) if keep_time_major else _swap_last(x)


def _step_sizes(delta: torch.Tensor, bias: torch.Tensor | None, softplus: bool) -> torch.Tensor:
    """Δ = softplus(delta + bias) as a contiguous (b, l, d) tensor, with at most one allocation."""
    dT = _swap_last(delta)
    if bias is None and not softplus:
        return dT
    if delta.transpose(1, 2).is_contiguous():
        # dT is a view of the caller's tensor: the first step must not write into it.
        dT = dT + bias if bias is not None else dT.clone()
    elif bias is not None:
        dT.add_(bias)
    if softplus:
        torch.ops.aten.softplus.out(dT, 1.0, _SOFTPLUS_THRESHOLD, out=dT)
    return dT


def _gate(y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """y · silu(z) for (b, d, l) tensors, in blocks of channels so that temporaries stay small."""
    out = torch.empty_like(y)
    for i in range(0, y.shape[1], _GATE_BLOCK):
        s = slice(i, i + _GATE_BLOCK)
        torch.mul(y[:, s], F.silu(z[:, s]), out=out[:, s])
    return out


def _gate_backward(
    dout: torch.Tensor, y: torch.Tensor, z: torch.Tensor, need_z: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of out = y · silu(z) for y and z, in the callers' layout (no transposes), by blocks."""
    dy = torch.empty_like(y)
    dz = torch.empty_like(z) if need_z else None
    for i in range(0, y.shape[1], _GATE_BLOCK):
        s = slice(i, i + _GATE_BLOCK)
        sig = torch.sigmoid(z[:, s])
        torch.mul(dout[:, s], z[:, s], out=dy[:, s]).mul_(sig)
        if need_z:
            # silu'(z) = σ(z) (1 + z (1 - σ(z)))
            dsilu = (1 - sig).mul_(z[:, s]).add_(1).mul_(sig)
            torch.mul(dout[:, s], y[:, s], out=dz[:, s]).mul_(dsilu)
    return dy, dz


class _Buffer:
    """Storage reused by every chunk; ``get(T)`` is a contiguous (b, T, *inner) view of it."""

    def __init__(self, like: torch.Tensor, b: int, steps: int, inner: tuple[int, ...]) -> None:
        self.data, self.b, self.inner = like.new_empty(b * steps * math.prod(inner)), b, inner

    def get(self, T: int) -> torch.Tensor:
        return self.data[: self.b * T * math.prod(self.inner)].view(self.b, T, *self.inner)


def _readout(C: torch.Tensor, H: torch.Tensor, out: torch.Tensor) -> None:
    """out (b, T, d) = C_t · h_t for C (b, T, g, n) and H (b, T, g, n, dg): a row vector times an
    (n, dg) matrix per (row, step, group), the form PyTorch's CPU bmm is fast at."""
    b, T, g, n, dg = H.shape
    rows = b * T * g
    if out.is_contiguous():
        torch.bmm(C.reshape(rows, 1, n), H.reshape(rows, n, dg), out=out.view(rows, 1, dg))
    else:
        out.copy_(torch.bmm(C.reshape(rows, 1, n), H.reshape(rows, n, dg)).view(b, T, g * dg))


class _SelectiveScan(torch.autograd.Function):
    """The whole op on inputs already in the compute dtype, B and C as (b, g, n, l).

    Returns out (b, d, l), in u's memory layout (contiguous, or time-major when u is), and the last
    state (b, d, n). Internally sequences are time-major per row, (b, l, d), and a state is
    (b, g, n, dg). Gradients come back in the layout of their input.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, resets, softplus, chunk):
        b, d, l = u.shape
        g, n = B.shape[1], B.shape[2]
        dg = d // g
        keep = _keep_masks(resets)
        B, C = B.reshape(b, g * n, l), C.reshape(b, g * n, l)
        ctx.time_major = [_is_time_major(t) for t in (u, delta, B, C)]
        uT, BT, CT = _swap_last(u), _swap_last(B), _swap_last(C)
        dT = _step_sizes(delta, delta_bias, softplus)
        num_chunks = -(-l // chunk)
        A2 = _to_state_layout(A * _LOG2E, g)
        y = u.new_empty(b, l, d)
        states = u.new_empty(num_chunks + 1, b, g, n, dg)
        states[0] = _to_state_layout(h0, g)
        dA_buf, H_buf = _Buffer(u, b, chunk, (g, n, dg)), _Buffer(u, b, chunk + 1, (g, n, dg))
        du_buf = _Buffer(u, b, chunk, (d,))
        for c in range(num_chunks):
            t0, t1 = c * chunk, min((c + 1) * chunk, l)
            T = t1 - t0
            dA, H = dA_buf.get(T), H_buf.get(T + 1)
            du = torch.mul(dT[:, t0:t1], uT[:, t0:t1], out=du_buf.get(T))
            _decay_and_inputs(dT[:, t0:t1], du, A2, BT[:, t0:t1], dA, H)
            H[:, 0] = states[c]
            _scan_forward(H, dA, t0, keep)
            states[c + 1] = H[:, T]
            _readout(CT[:, t0:t1].view(b, T, g, n), H[:, 1:], y[:, t0:t1])
            if D is not None:
                y[:, t0:t1].addcmul_(uT[:, t0:t1], D)
        # The gate works in the callers' layout, so its backward needs no transposes.
        y = _from_time_major(y, ctx.time_major[0])
        out = y if z is None else _gate(y, z)
        ctx.save_for_backward(uT, dT, A, BT, CT, states, D, z, y if z is not None else None)
        ctx.keep, ctx.chunk, ctx.softplus = keep, chunk, softplus
        # clone(): the returned state must not alias the saved boundary states.
        return out, _from_state_layout(states[num_chunks]).clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dh_last):
        uT, dT, A, BT, CT, states, D, z, y = ctx.saved_tensors
        keep, chunk = ctx.keep, ctx.chunk
        tm_u, tm_delta, tm_B, tm_C = ctx.time_major
        need_u, need_delta, need_A, need_B, need_C, need_D, need_z, need_bias, need_h0 = ctx.needs_input_grad[:9]
        need_dt = need_delta or need_bias
        b, l, d = uT.shape
        n = A.shape[1]
        g = BT.shape[2] // n
        dg = d // g
        A_s = _to_state_layout(A, g)
        A2 = A_s * _LOG2E
        grad_z = None
        if z is not None:
            dout, grad_z = _gate_backward(dout, y, z, need_z)
        doutT = _swap_last(dout)
        grad_u = torch.empty_like(uT) if need_u else None
        grad_dt = torch.empty_like(dT) if need_dt else None
        grad_A = torch.zeros_like(A_s) if need_A else None
        grad_B = torch.empty_like(BT) if need_B else None
        grad_C = torch.empty_like(CT) if need_C else None
        grad_D = torch.zeros_like(D) if need_D else None
        grad_bias = dT.new_zeros(d) if need_bias else None
        dA_buf, H_buf = _Buffer(uT, b, chunk, (g, n, dg)), _Buffer(uT, b, chunk + 1, (g, n, dg))
        G_buf = _Buffer(uT, b, chunk, (g, n, dg))
        du_buf = _Buffer(uT, b, chunk, (d,))
        carry = _to_state_layout(dh_last, g)
        for c in range(states.shape[0] - 2, -1, -1):
            t0, t1 = c * chunk, min((c + 1) * chunk, l)
            T = t1 - t0
            rows = b * T * g
            u_c, dt_c, B_c = uT[:, t0:t1], dT[:, t0:t1], BT[:, t0:t1]
            dA, H, G = dA_buf.get(T), H_buf.get(T + 1), G_buf.get(T)
            du = torch.mul(dt_c, u_c, out=du_buf.get(T))
            _decay_and_inputs(dt_c, du, A2, B_c, dA, H)
            H[:, 0] = states[c]
            _scan_forward(H, dA, t0, keep)

            dy = doutT[:, t0:t1]
            if need_D:
                grad_D += (dy * u_c).sum(dim=(0, 1))

            torch.mul(dy.view(b, T, g, 1, dg), CT[:, t0:t1].view(b, T, g, n, 1), out=G)
            G[:, T - 1] += carry
            _scan_backward(G, dA, t0, keep)
            torch.mul(dA[:, 0], G[:, 0], out=carry)
            if t0 in keep:
                carry.masked_fill_(~keep[t0], 0.0)

            # Row vectors times (dg, n) matrices: PyTorch's CPU bmm is ~15x slower for the equivalent
            # (n, dg) @ (dg, 1) matrix-vector form.
            Gr = G.view(rows, n, dg)
            if need_C:
                hT = H[:, 1:].reshape(rows, n, dg).transpose(1, 2)
                grad_C[:, t0:t1] = torch.bmm(dy.reshape(rows, 1, dg), hT).view(b, T, g * n)
            if need_B:
                grad_B[:, t0:t1] = torch.bmm(du.view(rows, 1, dg), Gr.transpose(1, 2)).view(b, T, g * n)
            v = torch.bmm(B_c.reshape(rows, 1, n), Gr).view(b, T, d)
            if need_u:
                torch.mul(dt_c, v, out=grad_u[:, t0:t1])
                if D is not None:
                    grad_u[:, t0:t1].addcmul_(dy, D)
            if not (need_dt or need_A):
                continue
            # q_t = g_t ⊙ a_t ⊙ h_{t-1}: the gradient through the decay, zero where a document starts.
            q = dA.mul_(G).mul_(H[:, :-1])
            for t in range(T):
                if t0 + t in keep:
                    q[:, t].masked_fill_(~keep[t0 + t], 0.0)
            if need_A:
                grad_A += torch.mul(q, dt_c.view(b, T, g, 1, dg), out=G).sum(dim=(0, 1))
            if need_dt:
                gd = grad_dt[:, t0:t1]
                torch.mul(u_c, v, out=gd).add_(torch.mul(q, A_s, out=G).sum(dim=3).view(b, T, d))
                if ctx.softplus:
                    # softplus'(x) = σ(x) = 1 - e^-Δ, and 1 above the threshold where softplus(x) = x.
                    gd.mul_(torch.expm1(-dt_c).neg_().masked_fill_(dt_c > _SOFTPLUS_THRESHOLD, 1.0))
                if need_bias:
                    grad_bias += gd.sum(dim=(0, 1))
        return (
            _from_time_major(grad_u, tm_u) if need_u else None,
            _from_time_major(grad_dt, tm_delta) if need_delta else None,
            _from_state_layout(grad_A) if need_A else None,
            _from_time_major(grad_B, tm_B).view(b, g, n, l) if need_B else None,
            _from_time_major(grad_C, tm_C).view(b, g, n, l) if need_C else None,
            grad_D,
            grad_z,
            grad_bias,
            _from_state_layout(carry) if need_h0 else None,
            None,
            None,
            None,
        )


def selective_scan_chunked(
    inputs: ScanInputs, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``selective_scan_reference`` (validated arguments, B and C as (b, g, n, l)).

    ``chunk_size`` defaults to ``default_chunk_size``; results do not depend on it beyond rounding.
    """
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx = inputs.unpack()
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    b, d, l = u.shape
    n = A.shape[1]
    h0 = u.new_zeros(b, d, n, dtype=ct) if initial_state is None else initial_state.to(ct)
    resets = None
    if seq_idx is not None:
        resets = torch.zeros(b, l, dtype=torch.bool, device=u.device)
        resets[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    u_, delta_, A_, B_, C_, D_, z_, bias_ = (
        None if t is None else t.to(ct) for t in (u, delta, A, B, C, D, z, delta_bias)
    )
    out, last = _SelectiveScan.apply(
        u_, delta_, A_, B_, C_, D_, z_, bias_, h0, resets, delta_softplus,
        chunk_size or default_chunk_size(b, d, n, l),
    )
    return out.to(u.dtype), last
