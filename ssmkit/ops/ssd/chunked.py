"""Mamba-2 SSD in its chunked matrix form (Dao & Gu 2024, "Transformers are SSMs", Listing 1).

Within a chunk of T positions the SSM is a masked linear attention; between chunks only the (p, n)
state per head is passed on. With cum the cumulative sum of Δ·A inside each chunk:
    L[t, s]  = exp(cum_t - cum_s) for s <= t (same document), else 0
    Y_diag   = ((C Bᵀ) ⊙ L) (Δ x)                           intra-chunk, matmuls
    S_c      = Σ_s exp(cum_last - cum_s) Δ_s x_s ⊗ B_s       state each chunk adds
    S'_c     = exp(cum_last) S'_{c-1} + S_c                  inter-chunk recurrence (loop over chunks)
    Y_off,t  = exp(cum_t) C_t S'_{c-1}                      contribution of earlier chunks
Groups are never repeated per head: heads of a group are folded into the matmul rows
(h = g · r, so x viewed as (b, g, r, ...) shares B and C of its group).
Everything runs in float32 (float64 for float64 inputs) and autograd differentiates it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ssmkit.ops.ssd.reference import NO_LIMIT, compute_dtype, discretize_dt, doc_starts, gate_and_skip

# Elements of (T, T) work per block of chunks in the intra-chunk step (8 MB in float32): blocks
# that stay in cache beat whole-sequence tensors, which page-fault on every allocation.
_BLOCK_ELEMENTS = 1 << 21


def _pad_len(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad dim 1 (the length) at the end."""
    if pad == 0:
        return t
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))


def ssd_chunked(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Chunked SSD; same arguments and results as ``ssd_reference`` (validated by the caller).

    x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n). Returns ``(out (b, l, h, p),
    final_states (b, h, p, n), varlen_states (s, h, p, n) or None)``.
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    T = chunk_size
    nc = -(-l // T)
    pad = nc * T - l
    dtype = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_states)

    # Tensors keep the input's (b, l, ...) order, viewed as (b, c, T, ...): no transposed copies.
    # Padded steps have Δ = 0 and x = 0: no decay, no input, so the last state is unchanged.
    delta = _pad_len(discretize_dt(dt, dt_bias, dt_softplus, dt_limit, dtype), pad).view(b, nc, T, h)
    cum = torch.cumsum(delta * A.to(dtype), dim=2)  # (b, c, T, h)
    xs = x.to(dtype)
    xdt = _pad_len(xs, pad).view(b, nc, T, h, p) * delta[..., None]  # (b, c, T, h, p)
    Bc = _pad_len(B.to(dtype), pad).view(b, nc, T, g, n)
    Cc = _pad_len(C.to(dtype), pad).view(b, nc, T, g, n)

    doc = None
    if seq_idx is not None:
        # Document number of each position (0, 1, ...): changes of seq_idx, whatever its values.
        doc = torch.cumsum(doc_starts(seq_idx), dim=1)
        doc = torch.cat([doc, doc[:, -1:].expand(b, pad)], dim=1).view(b, nc, T)  # padding joins the last doc
        doc_end = doc[:, :, -1]  # (b, c)
        doc_before = torch.cat([torch.zeros_like(doc_end[:, :1]), doc_end[:, :-1]], dim=1)  # (b, c)

    y_diag = _IntraChunk.apply(
        cum.view(b * nc, T, h), xdt.view(b * nc, T, h, p), Bc.view(b * nc, T, g, n), Cc.view(b * nc, T, g, n),
        None if doc is None else doc.view(b * nc, T),
    ).view(b, nc, T, h, p)

    # State each chunk adds at its end; heads of a group are stacked as rows: (r p, T) @ (T, n).
    to_end = torch.exp(cum[:, :, -1:] - cum)  # (b, c, T, h)
    if doc is not None:
        to_end = torch.where((doc == doc_end[..., None])[..., None], to_end, 0.0)
    xw = (xdt * to_end[..., None]).view(b, nc, T, g, r * p)
    chunk_states = (xw.permute(0, 1, 3, 4, 2) @ Bc.transpose(2, 3)).view(b, nc, g, r, p, n)

    # Inter-chunk recurrence: a short loop over chunks on (b, h, p, n) states.
    # unbind (not indexing in the loop): its backward stacks the gradients instead of building a
    # zero-filled full-size gradient for every chunk.
    chunk_decay = torch.exp(cum[:, :, -1]).view(b, nc, g, r, 1, 1).unbind(1)
    chunk_states = chunk_states.unbind(1)
    if initial_states is not None:
        state = initial_states.to(dtype).view(b, g, r, p, n)
    else:
        state = xs.new_zeros(b, g, r, p, n)
    entering = []
    for k in range(nc):
        entering.append(state)
        passed = chunk_decay[k] * state
        if doc is not None:
            # where, not a product with 0: NaN of a finished document must not leak into the next.
            passed = torch.where((doc_end[:, k] == doc_before[:, k]).view(b, 1, 1, 1, 1), passed, 0.0)
        state = passed + chunk_states[k]
    prev = torch.stack(entering, dim=1)  # (b, c, g, r, p, n)

    # Contribution of earlier chunks (off-diagonal blocks): (T, n) @ (n, r p) per group.
    y_off = Cc.transpose(2, 3) @ prev.view(b, nc, g, r * p, n).transpose(-1, -2)  # (b, c, g, T, r p)
    y_off = y_off.transpose(2, 3).reshape(b, nc, T, h, p) * torch.exp(cum)[..., None]
    if doc is not None:
        y_off = torch.where((doc == doc_before[..., None])[..., None, None], y_off, 0.0)
    y = (y_diag + y_off).view(b, nc * T, h, p)[:, :l]
    out = gate_and_skip(y, xs, D, z).to(x.dtype)

    varlen_states = None
    if cu_seqlens is not None:
        varlen_states = _varlen_states(cu_seqlens, cum, xdt, Bc, prev)
    return out, state.view(b, h, p, n), varlen_states


def _blocks(n_chunks: int, per_chunk: int) -> list[slice]:
    """Slices of chunks holding about ``_BLOCK_ELEMENTS`` elements of (T, T) work each."""
    step = max(1, _BLOCK_ELEMENTS // per_chunk)
    return [slice(i, min(i + step, n_chunks)) for i in range(0, n_chunks, step)]


def _masks(T: int, doc: torch.Tensor | None, dtype: torch.dtype, device: torch.device):
    """``drop`` (T, T) or (k, 1, T, T): True where L is 0 (s > t, or another document); and the
    upper clamp bound for the segment sums: ``log(tiny)`` where dropped, +inf elsewhere."""
    drop = torch.ones(T, T, dtype=torch.bool, device=device).triu(1)
    if doc is not None:
        drop = drop | (doc[:, None, :, None] != doc[:, None, None, :])
    upper = torch.full(drop.shape, float("inf"), dtype=dtype, device=device).masked_fill_(drop, _log_tiny(dtype))
    return drop, upper


def _log_tiny(dtype: torch.dtype) -> float:
    return float(math.ceil(math.log(torch.finfo(dtype).tiny)))


def _decay(cum: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """exp(cum_t - cum_s) clamped below at the smallest normal float: (k, h, T, T) from cum (k, T, h).

    Results that would be denormal or 0 cost ~50x more in exp on CPUs (and strong decays produce
    many), so segment sums are clamped at log(tiny); dropped entries (``upper``) are pinned there
    too, never overflow, and are zeroed by the caller through the masked C Bᵀ.
    """
    # Contiguous (k, h, T) first: the (T, T) result then has unit inner stride, as bmm wants.
    ct = cum.transpose(1, 2).contiguous()
    seg = ct[..., :, None] - ct[..., None, :]
    lower = torch.tensor(_log_tiny(cum.dtype), dtype=cum.dtype, device=cum.device)
    return seg.clamp_(min=lower, max=upper).exp_()


def _masked_cb(B: torch.Tensor, C: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """C Bᵀ per group with dropped entries set to 0: (k, g, T, T) from B, C (k, T, g, n)."""
    return (C.transpose(1, 2) @ B.permute(0, 2, 3, 1)).masked_fill_(drop, 0.0)


class _IntraChunk(torch.autograd.Function):
    """Y_diag = ((C Bᵀ) ⊙ L)(Δx) per chunk, a block of chunks at a time.

    The (T, T) tensors are rebuilt block by block in backward instead of being stored: they are the
    largest objects of the algorithm (h T² per chunk), and small blocks stay in cache.
    Shapes (k = batch × chunks): cum (k, T, h); xdt (k, T, h, p); B, C (k, T, g, n); doc (k, T).
    """

    @staticmethod
    def forward(ctx, cum, xdt, B, C, doc):
        ctx.save_for_backward(cum, xdt, B, C, doc)
        k, T, h, p = xdt.shape
        g = B.shape[2]
        y = torch.empty_like(xdt)
        for blk in _blocks(k, h * T * T):
            drop, upper = _masks(T, None if doc is None else doc[blk], cum.dtype, cum.device)
            scores = _decay(cum[blk], upper)  # (kb, h, T, T)
            scores.view(-1, g, h // g, T, T).mul_(_masked_cb(B[blk], C[blk], drop)[:, :, None])
            y[blk] = (scores @ xdt[blk].transpose(1, 2)).transpose(1, 2)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        cum, xdt, B, C, doc = ctx.saved_tensors
        k, T, h, p = xdt.shape
        g = B.shape[2]
        dcum, dxdt, dB, dC = (torch.empty_like(t) for t in (cum, xdt, B, C))
        for blk in _blocks(k, h * T * T):
            drop, upper = _masks(T, None if doc is None else doc[blk], cum.dtype, cum.device)
            decay = _decay(cum[blk], upper).view(-1, g, h // g, T, T)
            cb = _masked_cb(B[blk], C[blk], drop)[:, :, None]  # (kb, g, 1, T, T)
            Cb, Bb = C[blk].transpose(1, 2), B[blk].transpose(1, 2)  # (kb, g, T, n)
            dyb = dy[blk].transpose(1, 2)  # (kb, h, T, p)
            xb = xdt[blk].transpose(1, 2)
            dxdt[blk] = ((decay * cb).view(-1, h, T, T).transpose(-1, -2) @ dyb).transpose(1, 2)
            # dM = dY (Δx)ᵀ; then dM ⊙ L feeds C Bᵀ, and dM ⊙ L ⊙ CB is the gradient of the segsum.
            dm = (dyb @ xb.transpose(-1, -2)).view(-1, g, h // g, T, T).mul_(decay)
            dcb = dm.sum(2).masked_fill_(drop, 0.0)  # (kb, g, T, T); dropped entries of L are not 0
            dseg = dm.mul_(cb).view(-1, h, T, T)
            dcum[blk] = (dseg.sum(-1) - dseg.sum(-2)).transpose(1, 2)
            dC[blk] = (dcb @ Bb).transpose(1, 2)
            dB[blk] = (dcb.transpose(-1, -2) @ Cb).transpose(1, 2)
        return dcum, dxdt, dB, dC, None


def _varlen_states(
    cu_seqlens: torch.Tensor, cum: torch.Tensor, xdt: torch.Tensor, Bc: torch.Tensor, prev: torch.Tensor
) -> torch.Tensor:
    """State at the last position of each packed sequence (batch 1), shape (s, h, p, n).

    It is the state entering that position's chunk, decayed (when the sequence began before the
    chunk, or is the first one, which starts from the initial state), plus the sequence's own
    positions inside the chunk. Those tails are disjoint, so the loop costs one pass over the input.
    cum: (1, c, T, h); xdt: (1, c, T, h, p); Bc: (1, c, T, g, n); prev: (1, c, g, r, p, n).
    """
    T = cum.shape[2]
    _, _, g, r, p, n = prev.shape
    bounds = cu_seqlens.tolist()
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        k, t = divmod(end - 1, T)
        s0 = max(start, k * T) - k * T
        weight = torch.exp(cum[0, k, t] - cum[0, k, s0 : t + 1])  # (len, h)
        tail_x = (xdt[0, k, s0 : t + 1] * weight[..., None]).view(-1, g, r, p)
        tail = torch.einsum("sgrp,sgn->grpn", tail_x, Bc[0, k, s0 : t + 1])
        if start < k * T or start == 0:
            tail = tail + torch.exp(cum[0, k, t]).view(g, r, 1, 1) * prev[0, k]
        out.append(tail.reshape(g * r, p, n))
    return torch.stack(out)
