"""Context parallelism: one long sequence split across the ranks of a ``torch.distributed`` group.

Rank r of the group holds the r-th consecutive part of every row (the group's rank order is the
sequence order; parts may differ in length). The SSM is a linear recurrence, so a rank only needs the
state that enters its part, and that state is a short combination of what the earlier ranks computed:

    every rank scans its part from a zero state:   out⁰, S_r = mamba_chunk_scan_combined(...)
    its total decay:                               Γ_r = exp(Σ_t Δ_t A)    (0 if a document starts inside)
    the state entering rank r (all-gather):        h_r = carry_r · (S_{r-1} + Γ_{r-1} h_{r-1}),  h_0 = 0
    its outputs, corrected:                        out_t = out⁰_t + exp(cum_t) (C_t · h_r) silu(z_t)

where cum_t = Σ_{s<=t} Δ_s A, for the positions t of the part's first document only (carry_r is 0 when a
new document starts exactly at the boundary). The correction is exact because the state is linear in the
entering state: H_t = H⁰_t + exp(cum_t) h_r until the first document ends.

Why correct rather than rerun the scan with ``initial_states=h_r``: a rerun doubles the scan's work,
forward and backward, on every rank, so two ranks would be no faster than one; the correction is one
(l, n) x (n, h p) matmul and a cumulative sum over (b, l, h), small next to the scan, and the scan
itself is the public op, unchanged, with whatever backend it picks.

Gradients cross ranks through :class:`_Exchange`, an autograd Function whose forward all-gathers the
ranks' small tensors (states, decays) and evaluates the combination for every rank, and whose backward
all-gathers every rank's gradient of its result and backpropagates the same combination.
``torch.distributed.nn.functional.all_gather`` is not used: rank 0's entering state does not depend on
the gathered tensors, so rank 0 would never run that gather's backward and the other ranks would wait
for it forever; :class:`_Exchange` is on every rank's graph, whatever its result depends on.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ssmkit.ops._step_sizes import discretize_dt
from ssmkit.ops.ssd import check_ssd_inputs, ssd_scan
from ssmkit.ops.ssd.reference import doc_starts

__all__ = ["ContextParallel", "context_parallel_chunk_scan", "previous_rank_tail", "split_sequence"]

# The keywords of mamba_chunk_scan_combined a split sequence takes (its varlen states would need the
# sequences gathered; input_scale is not wired through the correction below).
_OPTIONS = frozenset({"D", "z", "dt_bias", "seq_idx", "dt_softplus", "dt_limit"})


def context_parallel_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    *,
    group: dist.ProcessGroup,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    backend: str = "auto",
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`ssmkit.ops.mamba_chunk_scan_combined` over a sequence split across the ranks of ``group``.

    Every rank of ``group`` calls this with its consecutive part of the sequence (rank 0 the first);
    the outputs equal the matching part of the single-process call on the whole sequence, and the
    backward pass sends the gradients of the states back to the earlier ranks.

    Args:
        x: (b, l, h, p); dt: (b, l, h); B, C: (b, l, g, n); z: (b, l, h, p); seq_idx: (b, l): this
            rank's part (``l`` may differ between ranks; b, h, p, g, n may not).
        A, chunk_size, backend, and the keywords D, dt_bias, dt_softplus, dt_limit (``options``): as in
            mamba_chunk_scan_combined (checked by its checker, ``ssmkit.ops.ssd.check_ssd_inputs``).
        initial_states: (b, h, p, n) the state before the whole sequence: only rank 0 may pass it.
        seq_idx: document ids; a document may span rank boundaries (same id on both sides of a
            boundary continues it, a different id starts a new one there).
        return_final_states: also return the (b, h, p, n) state at the end of this rank's part (on the
            last rank: the state at the end of the whole sequence).
        group: the ranks the sequence is split over.

    Returns:
        ``out`` (b, l, h, p) in x's dtype, or ``(out, final_states)``.

    Each call does three small all-gathers (shapes, document edges, states) and one in backward; the
    shape check reads the gathered shapes on the host (a device sync on GPU).
    """
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"context_parallel_chunk_scan got unexpected keyword arguments {sorted(unknown)}; "
                        f"it takes {sorted(_OPTIONS)}")
    rank, _ = _group_rank(group)
    if initial_states is not None and rank != 0:
        raise ValueError(f"initial_states is the state before the whole sequence: only rank 0 of the group may "
                         f"pass it (this is rank {rank})")
    # The op's checker validates every argument before anything else touches them; the part is scanned from
    # a zero state (initial_states joins through the exchange below).
    inputs = check_ssd_inputs(dict(options, x=x, dt=dt, A=A, B=B, C=C, chunk_size=chunk_size,
                                   initial_states=initial_states))
    if not isinstance(return_final_states, bool):
        raise TypeError(f"return_final_states must be a bool, got {type(return_final_states).__name__}")
    out, zero_ends, _ = ssd_scan(dataclasses.replace(inputs, initial_states=None), backend=backend)
    z, dt_bias, seq_idx = inputs.z, inputs.dt_bias, inputs.seq_idx
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    _check_same_shapes(group, x.device, b=b, h=h, p=p, g=g, n=n, seq_idx=int(seq_idx is not None))
    dtype = zero_ends.dtype

    delta = discretize_dt(dt, dt_bias, inputs.dt_softplus, inputs.dt_limit, dtype)
    cum = torch.cumsum(delta * A.to(dtype), dim=1)  # (b, l, h)
    decay = torch.exp(cum[:, -1])  # (b, h)
    first_doc, carry, through = _document_edges(seq_idx, b, group, x.device)
    passes = through[rank, :, None, None, None]  # the state entering this part reaches its end

    # Rank 0 folds the initial state into the end state it shares, and enters its own part with it.
    ends = zero_ends
    if initial_states is not None:
        ends = ends + torch.where(passes, decay[..., None, None] * initial_states.to(dtype), 0.0)
    combine = functools.partial(_entering_states, carry, through)
    entering = _Exchange.apply(group, combine, ends, decay)  # (b, h, p, n); zeros on rank 0
    if initial_states is not None:
        entering = entering + initial_states.to(dtype)

    # C_t · h_r per head: heads of a group share C, so they are stacked as rows of one matmul.
    corr = torch.einsum("blgn,bgqn->blgq", C.to(dtype), entering.view(b, g, h // g * p, n)).reshape(b, l, h, p)
    corr = corr * torch.exp(cum)[..., None]
    if z is not None:
        corr = corr * F.silu(z.to(dtype))
    if first_doc is not None:
        # where, not a product with 0: a NaN entering state must not reach the part's later documents.
        corr = torch.where(first_doc[:, :, None, None], corr, 0.0)
    out = corr.add_(out).to(x.dtype)
    if not return_final_states:
        return out
    return out, zero_ends + torch.where(passes, decay[..., None, None] * entering, 0.0)


def previous_rank_tail(x: torch.Tensor, width: int, seq_idx: torch.Tensor | None,
                       group: dist.ProcessGroup) -> torch.Tensor:
    """The previous rank's last ``width`` positions of ``x``: what a causal convolution of width
    ``width + 1`` reads before this rank's first position.

    x: (b, d, l) this rank's part (``l >= width``); seq_idx: (b, l) or None. Returns (b, d, width), zeros
    on rank 0 and where the positions belong to a document other than the one this part starts with.
    Differentiable: the gradient goes back to the previous rank's ``x``.
    """
    rank, _ = _group_rank(group)
    if x.dim() != 3 or x.shape[-1] < width:
        raise ValueError(f"previous_rank_tail: x must be (b, d, l) with l >= {width} per rank, got {tuple(x.shape)}; "
                         f"use fewer context-parallel ranks or longer sequences")
    if width == 0:
        return x[..., :0]
    _check_same_shapes(group, x.device, b=x.shape[0], d=x.shape[1], seq_idx=int(seq_idx is not None))
    tail = x[..., x.shape[-1] - width:]
    _, carry, _ = _document_edges(seq_idx, x.shape[0], group, x.device)
    if seq_idx is not None:
        # Only the positions of this part's last document can continue into the next part.
        doc = torch.cumsum(doc_starts(seq_idx), dim=1)
        in_last = (doc == doc[:, -1:])[:, seq_idx.shape[1] - width:]
        tail = torch.where(in_last[:, None, :], tail, 0.0)
    received = _Exchange.apply(group, _shift_to_next_rank, tail)
    return torch.where(carry[rank, :, None, None], received, 0.0)


def split_sequence(t: torch.Tensor, group: dist.ProcessGroup, dim: int = 1) -> torch.Tensor:
    """This rank's equal consecutive part of ``t`` along ``dim`` (a view). The length must divide evenly."""
    rank, world = _group_rank(group)
    length = t.shape[dim]
    if length % world:
        raise ValueError(f"split_sequence: length {length} (dim {dim}) is not divisible by the {world} "
                         f"context-parallel ranks")
    return t.narrow(dim, rank * (length // world), length // world)


class ContextParallel:
    """One sequence split across the ranks of ``group``, as the layers that support it take it
    (``LanguageModel(config, context_parallel=ContextParallel(group))``; Mamba-2 mixers only).

    Each rank then calls the model on its part of the sequence (see :func:`split_sequence`); the logits
    are that part's logits. Decoding with a cache is not split.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        _group_rank(group)
        self.group = group

    def previous_rank_tail(self, x: torch.Tensor, width: int, seq_idx: torch.Tensor | None) -> torch.Tensor:
        """:func:`previous_rank_tail` in this group."""
        return previous_rank_tail(x, width, seq_idx, self.group)

    def chunk_scan(self, *args: object, **kwargs: object) -> object:
        """:func:`context_parallel_chunk_scan` in this group."""
        return context_parallel_chunk_scan(*args, group=self.group, **kwargs)


def _group_rank(group: object) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallelism needs an initialised torch.distributed process group")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    return dist.get_rank(group), dist.get_world_size(group)


def _gather(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> list[torch.Tensor]:
    """Every rank's copy of each tensor, stacked: (R, *t.shape) each. One collective for all of them."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, flat, group=group)
    stacked = torch.stack(parts)
    sizes = [t.numel() for t in tensors]
    return [s.view(-1, *t.shape) for s, t in zip(stacked.split(sizes, dim=1), tensors)]


def _check_same_shapes(group: dist.ProcessGroup, device: torch.device, **sizes: int) -> None:
    """ValueError unless every rank passes the same sizes (a mismatch would break the collectives)."""
    (table,) = _gather([torch.tensor(list(sizes.values()), dtype=torch.int64, device=device)], group)
    table = table.tolist()
    if any(row != table[0] for row in table):
        names = ", ".join(sizes)
        raise ValueError(f"context parallelism: ranks disagree on ({names}): {table} (rank order); every rank "
                         "must pass the same batch, head and state sizes, and seq_idx on all ranks or none")


def _document_edges(
    seq_idx: torch.Tensor | None, b: int, group: dist.ProcessGroup, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Where documents meet the rank boundaries.

    Returns ``first_doc`` (b, l) bool (positions of this part's first document; None without seq_idx),
    ``carry`` (R, b) bool (rank r's first position continues rank r-1's last document; False for rank 0)
    and ``through`` (R, b) bool (no document starts inside rank r's part, so the state entering it
    reaches its end).
    """
    world = dist.get_world_size(group)
    if seq_idx is None:
        carry = torch.ones(world, b, dtype=torch.bool, device=device)
        carry[0] = False
        return None, carry, torch.ones(world, b, dtype=torch.bool, device=device)
    starts = doc_starts(seq_idx)
    first_doc = torch.cumsum(starts, dim=1) == 0
    edges = torch.stack([seq_idx[:, 0].long(), seq_idx[:, -1].long(), (~starts.any(dim=1)).long()])  # (3, b)
    (edges,) = _gather([edges], group)  # (R, 3, b)
    carry = torch.zeros(world, b, dtype=torch.bool, device=device)
    carry[1:] = edges[1:, 0] == edges[:-1, 1]
    return first_doc, carry, edges[:, 2].bool()


def _entering_states(carry: torch.Tensor, through: torch.Tensor, ends: torch.Tensor,
                     decay: torch.Tensor) -> torch.Tensor:
    """The state entering each rank's part: (R, b, h, p, n) from every rank's end state when entered
    at zero ``ends`` (R, b, h, p, n), total decay ``decay`` (R, b, h) and the flags of _document_edges."""
    state = torch.zeros_like(ends[0])
    entering = []
    for r in range(ends.shape[0]):
        # where, not products with 0: NaN of a finished document must not reach the next one.
        into = torch.where(carry[r, :, None, None, None], state, 0.0)
        entering.append(into)
        state = ends[r] + torch.where(through[r, :, None, None, None], decay[r][..., None, None] * into, 0.0)
    return torch.stack(entering)


def _shift_to_next_rank(tails: torch.Tensor) -> torch.Tensor:
    """(R, ...) -> (R, ...): rank r receives rank r-1's tensor, rank 0 zeros."""
    return torch.cat([torch.zeros_like(tails[:1]), tails[:-1]])


class _Exchange(torch.autograd.Function):
    """``combine(*gathered)[rank]``: all-gather the ranks' ``local`` tensors, evaluate a small pure
    function of the gathered (R, ...) stacks giving (R, ...) results, keep this rank's.

    Backward all-gathers every rank's gradient of its result and backpropagates ``combine`` (recomputed:
    it is tiny) to return this rank's share of the gradient. Every rank must call it in the same order.
    """

    @staticmethod
    def forward(ctx, group, combine, *local):
        gathered = _gather(list(local), group)
        ctx.group, ctx.combine = group, combine
        ctx.save_for_backward(*gathered)
        return combine(*gathered)[dist.get_rank(group)]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (grads,) = _gather([grad], ctx.group)
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
            results = ctx.combine(*inputs)
            d_inputs = torch.autograd.grad(results, inputs, grads, allow_unused=True, materialize_grads=True)
        rank = dist.get_rank(ctx.group)
        return (None, None, *(d[rank] for d in d_inputs))
