"""Mamba-2 SSD in its chunked matrix form (Dao & Gu 2024, "Transformers are SSMs", Listing 1).

Within a chunk of T positions the SSM is a masked linear attention; between chunks only the (p, n)
state per head is passed on. With cum the cumulative sum of Δ·A inside each chunk:
    L[t, s]  = exp(cum_t - cum_s) for s <= t (same document), else 0
    Y_diag   = ((C Bᵀ) ⊙ L) (Δ x)                           intra-chunk, matmuls
    S_c      = Σ_s exp(cum_last - cum_s) Δ_s x_s ⊗ B_s       state each chunk adds
    S'_c     = exp(cum_last) S'_{c-1} + S_c                  inter-chunk recurrence (loop over chunks)
    Y_off,t  = exp(cum_t) C_t S'_{c-1}                      contribution of earlier chunks
The per-chunk parts are two autograd Functions that walk over blocks of chunks, forward and backward,
so the (T, T) matrices and the per-chunk temporaries are built block by block in cache and never
stored; the short recurrence between them is plain autograd. Groups are never repeated per head:
heads of a group are folded into the matmul rows (h = g · r, the r heads of a group share its B, C).
Everything runs in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ssmkit.ops._precision import compute_dtype
from ssmkit.ops._step_sizes import discretize_dt
from ssmkit.ops.chunking import chunk_length
from ssmkit.ops.ssd.inputs import SSDInputs
from ssmkit.ops.ssd.native import native_scores
from ssmkit.ops.ssd.reference import doc_starts, gate_and_skip

# Elements of per-chunk work (h T max(T, p)) per block of chunks (8 MB in float32): blocks that
# stay in cache beat whole-sequence tensors, which also page-fault on every allocation.
_BLOCK_ELEMENTS = 1 << 21


def _pad_len(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad dim 1 (the length) at the end."""
    if pad == 0:
        return t
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))


def ssd_chunked(inputs: SSDInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Chunked SSD; same arguments and results as ``ssd_reference`` (validated by the caller).

    x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n). Returns ``(out (b, l, h, p),
    final_states (b, h, p, n), varlen_states (s, h, p, n) or None)``.
    """
    (x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_softplus, dt_limit,
     input_scale) = inputs.unpack()
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    T = chunk_length(chunk_size, l)
    nc = -(-l // T)
    k = b * nc
    pad = nc * T - l
    dtype = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_states, input_scale)

    # Tensors keep the input's (b, l, ...) order, viewed as (b * c, T, ...): no transposed copies.
    # Padded steps have Δ = 0 and x = 0: no decay, no input, so the last state is unchanged.
    delta = _pad_len(discretize_dt(dt, dt_bias, dt_softplus, dt_limit, dtype), pad).reshape(k, T, h)
    cum = torch.cumsum(delta * A.to(dtype), dim=1)  # (k, T, h)
    # The weight of x_t in the update: Δ_t, or input_scale_t when given (padded steps: 0).
    weight = delta if input_scale is None else _pad_len(input_scale.to(dtype), pad).reshape(k, T, h)
    xs = x.to(dtype)
    xc = _pad_len(xs, pad).reshape(k, T, h, p)
    Bc = _pad_len(B.to(dtype), pad).reshape(k, T, g, n)
    Cc = _pad_len(C.to(dtype), pad).reshape(k, T, g, n)

    doc = in_last = in_first = carry = None
    if seq_idx is not None:
        # Document number of each position (0, 1, ...): changes of seq_idx, whatever its values.
        doc = torch.cumsum(doc_starts(seq_idx), dim=1)
        doc = torch.cat([doc, doc[:, -1:].expand(b, pad)], dim=1).view(b, nc, T)  # padding joins the last doc
        doc_end = doc[:, :, -1]  # (b, c)
        doc_before = torch.cat([torch.zeros_like(doc_end[:, :1]), doc_end[:, :-1]], dim=1)  # (b, c)
        in_last = (doc == doc_end[..., None]).view(k, T)  # in the document the chunk's state is for
        in_first = (doc == doc_before[..., None]).view(k, T)  # in the document the entering state is for
        carry = (doc_end == doc_before).view(b, nc, 1, 1, 1, 1).unbind(1)
        doc = doc.view(k, T)

    y_diag, chunk_states = _ChunkLocal.apply(cum, weight, xc, Bc, Cc, doc, in_last)

    # Inter-chunk recurrence: a short loop over chunks on (b, h, p, n) states. unbind (not indexing
    # in the loop): its backward stacks the gradients instead of zero-filling one per chunk.
    chunk_decay = torch.exp(cum[:, -1]).view(b, nc, g, r, 1, 1).unbind(1)
    chunk_states = chunk_states.view(b, nc, g, r, p, n).unbind(1)
    if initial_states is not None:
        state = initial_states.to(dtype).view(b, g, r, p, n)
    else:
        state = xs.new_zeros(b, g, r, p, n)
    entering = []
    for c in range(nc):
        entering.append(state)
        passed = chunk_decay[c] * state
        if carry is not None:
            # where, not a product with 0: NaN of a finished document must not leak into the next.
            passed = torch.where(carry[c], passed, 0.0)
        state = passed + chunk_states[c]
    prev = torch.stack(entering, dim=1).view(k, g, r * p, n)

    y = _ChunkOff.apply(y_diag, cum, Cc, prev, in_first).view(b, nc * T, h, p)[:, :l]
    out = gate_and_skip(y, xs, D, z).to(x.dtype)

    varlen_states = None
    if cu_seqlens is not None:
        varlen_states = _varlen_states(cu_seqlens, cum, weight, xc, Bc, prev)
    return out, state.view(b, h, p, n), varlen_states


def _blocks(n_chunks: int, per_chunk: int) -> list[slice]:
    """Slices of chunks holding about ``_BLOCK_ELEMENTS`` elements of work each."""
    step = max(1, _BLOCK_ELEMENTS // per_chunk)
    return [slice(i, min(i + step, n_chunks)) for i in range(0, n_chunks, step)]


def _log_floor(dtype: torch.dtype) -> float:
    """log of the smallest decay factor kept, about sqrt(tiny) (1e-19 in float32, 1e-154 in float64)."""
    return float(math.ceil(math.log(torch.finfo(dtype).tiny) / 2))


def _exp_or_zero_(t: torch.Tensor, upper: torch.Tensor | None = None) -> torch.Tensor:
    """exp(t) in place (``t`` clamped above at ``upper`` first), exactly 0 where t is below
    :func:`_log_floor`.

    On CPUs an exp whose result would be denormal or 0 costs ~50x more, and so does every product that
    comes out denormal in the matmuls after (microcode assists; one strongly decaying head puts them on
    most of a chunk's entries, 8x the SSD's time at chunk 256 with Mamba-2's A and dt initialisation).
    So arguments are clamped at the floor, which exp turns into a normal float, and those results are
    then set to 0, which matmuls multiply at full speed. The factors dropped are below sqrt(tiny), far
    below the float's eps relative to the 1 of each position's own term.
    """
    floor = _log_floor(t.dtype)
    if upper is None:
        t = t.clamp_(min=floor)
    else:
        t = t.clamp_(min=torch.tensor(floor, dtype=t.dtype, device=t.device), max=upper)
    return F.threshold_(t.exp_(), 2 * math.exp(floor), 0.0)


def _masks(T: int, doc: torch.Tensor | None, dtype: torch.dtype, device: torch.device):
    """``drop`` (T, T) or (k, 1, T, T): True where L is 0 (s > t, or another document); and the
    upper clamp bound for the segment sums: :func:`_log_floor` where dropped (then 0), +inf elsewhere."""
    drop = torch.ones(T, T, dtype=torch.bool, device=device).triu(1)
    if doc is not None:
        drop = drop | (doc[:, None, :, None] != doc[:, None, None, :])
    upper = torch.full(drop.shape, float("inf"), dtype=dtype, device=device).masked_fill_(drop, _log_floor(dtype))
    return drop, upper


def _decay(cum: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """exp(cum_t - cum_s), 0 below the floor and where dropped (``upper``): (k, h, T, T) from cum (k, T, h).

    See :func:`_exp_or_zero_` for the floor; dropped entries are pinned at it (never overflow) and so
    are 0 too.
    """
    # Contiguous (k, h, T) first: the (T, T) result then has unit inner stride, as bmm wants.
    ct = cum.transpose(1, 2).contiguous()
    return _exp_or_zero_(ct[..., :, None] - ct[..., None, :], upper)


def _masked_cb(B: torch.Tensor, C: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """C Bᵀ per group with dropped entries set to 0: (k, g, T, T) from B, C (k, T, g, n)."""
    return (C.transpose(1, 2) @ B.permute(0, 2, 3, 1)).masked_fill_(drop, 0.0)


def _decay_to(cum: torch.Tensor, keep: torch.Tensor | None, to_end: bool) -> torch.Tensor:
    """(k, T, h): exp(cum_last - cum_t) (``to_end``) or exp(cum_t), 0 where ``keep`` (k, T) is False."""
    w = _exp_or_zero_(cum[:, -1:] - cum if to_end else cum.clone())
    return w if keep is None else w.masked_fill_(~keep[..., None], 0.0)


class _ChunkLocal(torch.autograd.Function):
    """What each chunk computes from its own positions: Y_diag = ((C Bᵀ) ⊙ L)(Δx), and the state it
    adds at its end, S = Σ_s exp(cum_last - cum_s) Δ_s x_s ⊗ B_s.

    Shapes (k = batch × chunks): cum, delta (k, T, h); x (k, T, h, p); B, C (k, T, g, n); doc,
    in_last (k, T) or None. Returns Y_diag (k, T, h, p) and S (k, g, r p, n).
    """

    @staticmethod
    def forward(ctx, cum, delta, x, B, C, doc, in_last):
        ctx.save_for_backward(cum, delta, x, B, C, doc, in_last)
        k, T, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        y, states = torch.empty_like(x), x.new_empty(k, g, h // g * p, n)
        for blk in _blocks(k, h * T * max(T, p)):
            drop, upper = _masks(T, None if doc is None else doc[blk], cum.dtype, cum.device)
            xdt = x[blk] * delta[blk, :, :, None]
            cb = _masked_cb(B[blk], C[blk], drop)  # (kb, g, T, T)
            # One pass on CPU where the native kernels are built (one document per chunk: no other masks).
            scores = None if doc is not None else native_scores(cum[blk].transpose(1, 2), cb, _log_floor(cum.dtype))
            if scores is None:
                scores = _decay(cum[blk], upper)  # (kb, h, T, T)
                scores.view(-1, g, h // g, T, T).mul_(cb[:, :, None])
            y[blk] = (scores @ xdt.transpose(1, 2)).transpose(1, 2)
            xw = xdt.mul_(_decay_to(cum[blk], None if in_last is None else in_last[blk], True)[..., None])
            # Heads of a group stacked as rows: (r p, T) @ (T, n).
            states[blk] = xw.view(-1, T, g, h // g * p).permute(0, 2, 3, 1) @ B[blk].transpose(1, 2)
        return y, states

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dstates):
        cum, delta, x, B, C, doc, in_last = ctx.saved_tensors
        k, T, h, p = x.shape
        g = B.shape[2]
        r = h // g
        dcum, ddelta, dx, dB, dC = (torch.empty_like(t) for t in (cum, delta, x, B, C))
        for blk in _blocks(k, h * T * max(T, p)):
            drop, upper = _masks(T, None if doc is None else doc[blk], cum.dtype, cum.device)
            kb = x[blk].shape[0]
            xdt = x[blk] * delta[blk, :, :, None]  # (kb, T, h, p)
            decay = _decay(cum[blk], upper).view(kb, g, r, T, T)
            cb = _masked_cb(B[blk], C[blk], drop)[:, :, None]  # (kb, g, 1, T, T)
            Cg, Bg = C[blk].transpose(1, 2), B[blk].transpose(1, 2)  # (kb, g, T, n)
            dyh = dy[blk].transpose(1, 2)  # (kb, h, T, p)
            dxdt = ((decay * cb).view(kb, h, T, T).transpose(-1, -2) @ dyh).transpose(1, 2)
            # dM = dY (Δx)ᵀ; dM ⊙ L feeds C Bᵀ, and dM ⊙ L ⊙ CB is the gradient of the segment sums.
            dm = (dyh @ xdt.permute(0, 2, 3, 1)).view(kb, g, r, T, T).mul_(decay)
            dcb = dm.sum(2).masked_fill_(drop, 0.0)  # (kb, g, T, T); dropped entries of L are not 0
            dseg = dm.mul_(cb).view(kb, h, T, T)
            dcum_b = (dseg.sum(-1) - dseg.sum(-2)).transpose(1, 2)  # (kb, T, h)
            dCg, dBg = dcb @ Bg, dcb.transpose(-1, -2) @ Cg
            # Chunk state S = (Δx ⊙ w)ᵀ B per group, w = exp(cum_last - cum).
            w = _decay_to(cum[blk], None if in_last is None else in_last[blk], True)  # (kb, T, h)
            ds = dstates[blk]  # (kb, g, r p, n)
            dBg += (xdt * w[..., None]).view(kb, T, g, r * p).transpose(1, 2) @ ds
            dxw = (Bg @ ds.transpose(-1, -2)).transpose(1, 2).reshape(kb, T, h, p)
            dxdt += dxw * w[..., None]
            dwe = (dxw * xdt).sum(-1).mul_(w)
            dcum_b -= dwe
            dcum_b[:, -1] += dwe.sum(1)
            dcum[blk], dC[blk], dB[blk] = dcum_b, dCg.transpose(1, 2), dBg.transpose(1, 2)
            dx[blk] = dxdt * delta[blk, :, :, None]
            ddelta[blk] = (dxdt * x[blk]).sum(-1)
        return dcum, ddelta, dx, dB, dC, None, None


class _ChunkOff(torch.autograd.Function):
    """Y = Y_diag + exp(cum_t) C_t S'_{c-1}: adds what earlier chunks pass on through the state.

    Shapes (k = batch × chunks): y_diag (k, T, h, p); cum (k, T, h); C (k, T, g, n); prev, the state
    entering each chunk, (k, g, r p, n); in_first (k, T) or None (False: a later document).
    """

    @staticmethod
    def forward(ctx, y_diag, cum, C, prev, in_first):
        ctx.save_for_backward(cum, C, prev, in_first)
        k, T, h, p = y_diag.shape
        y = torch.empty_like(y_diag)
        for blk in _blocks(k, h * T * max(T, p)):
            e = _decay_to(cum[blk], None if in_first is None else in_first[blk], False)  # (kb, T, h)
            off = (C[blk].transpose(1, 2) @ prev[blk].transpose(-1, -2)).transpose(1, 2)  # (kb, T, g, r p)
            off = off.reshape(e.shape + (p,)).mul_(e[..., None])
            if in_first is not None:
                # where, not the product with 0 alone: a NaN state must not reach the next document.
                off.masked_fill_(~in_first[blk, :, None, None], 0.0)
            y[blk] = y_diag[blk] + off
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        cum, C, prev, in_first = ctx.saved_tensors
        k, T, h, p = dy.shape
        g = C.shape[2]
        dcum, dC, dprev = (torch.empty_like(t) for t in (cum, C, prev))
        for blk in _blocks(k, h * T * max(T, p)):
            e = _decay_to(cum[blk], None if in_first is None else in_first[blk], False)
            Cg, P = C[blk].transpose(1, 2), prev[blk]  # (kb, g, T, n), (kb, g, r p, n)
            kb = P.shape[0]
            grad = (dy[blk] * e[..., None]).view(kb, T, g, -1).transpose(1, 2)  # (kb, g, T, r p)
            dC[blk] = (grad @ P).transpose(1, 2)
            dprev[blk] = grad.transpose(-1, -2) @ Cg
            off = (Cg @ P.transpose(-1, -2)).transpose(1, 2).reshape(kb, T, h, p)
            dcum[blk] = (dy[blk] * off).sum(-1).mul_(e)
        return dy, dcum, dC, dprev, None


def _varlen_states(
    cu_seqlens: torch.Tensor,
    cum: torch.Tensor,
    delta: torch.Tensor,
    x: torch.Tensor,
    B: torch.Tensor,
    prev: torch.Tensor,
) -> torch.Tensor:
    """State at the last position of each packed sequence (batch 1), shape (s, h, p, n).

    It is the state entering that position's chunk, decayed (when the sequence began before the
    chunk, or is the first one, which starts from the initial state), plus the sequence's own
    positions inside the chunk. Those tails are disjoint, so the loop costs one pass over the input.
    cum, delta: (c, T, h); x: (c, T, h, p); B: (c, T, g, n); prev: (c, g, r p, n).
    """
    T, h, p = x.shape[1:]
    g, n = B.shape[2], B.shape[3]
    bounds = cu_seqlens.tolist()
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        c, t = divmod(end - 1, T)
        s0 = max(start, c * T) - c * T
        weight = torch.exp(cum[c, t] - cum[c, s0 : t + 1]) * delta[c, s0 : t + 1]  # (len, h)
        tail_x = (x[c, s0 : t + 1] * weight[..., None]).view(-1, g, h // g * p)
        tail = torch.einsum("sgq,sgn->gqn", tail_x, B[c, s0 : t + 1])
        if start < c * T or start == 0:
            tail = tail + torch.exp(cum[c, t]).view(g, h // g, 1, 1).mul(prev[c].view(g, h // g, p, n)).view(g, -1, n)
        out.append(tail.reshape(h, p, n))
    return torch.stack(out)
