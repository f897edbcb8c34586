"""Autoregressive generation with a constant-size cache: chunked prefill, then one token per step.

Prompts of different lengths are left-padded into one batch. The padding is given its own document id
(``seq_idx``), so the ops restart every state at the first real token: each row then computes exactly
what it computes alone (up to float rounding), for SSM layers, whose state has no notion of position.

On CUDA the one-token steps are captured once in a CUDA graph and replayed (see ``decode.py``), and the
captured step is kept for the next call of the same shape (``graph_cache.py``); the end-of-sequence check
reads the device every ``EOS_CHECK_EVERY`` tokens rather than every token. On CPU, models of Mamba /
Mamba-2 blocks step through the lean decoder (``lean.py``: a few torch calls per block, native kernels for
int8 / bfloat16 matmuls and Mamba-2's state where a C compiler exists).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ssmkit.generation.decode import (
    Cache,
    DecodeState,
    DecodingModel,
    GraphedStep,
    graph_blocker,
    lean_decoder,
    pick,
    step,
)
from ssmkit.generation.graph_cache import cached_step
from ssmkit.generation.lean import LeanDecoder
from ssmkit.generation.sampling import RowSampling, SamplingParams, make_generators

Prompts = torch.Tensor | Sequence[Sequence[int] | torch.Tensor]

# On CUDA, with eos ids, whether every row has finished is read from the device once per this many
# tokens (the tokens wait that long to be yielded; steps made after the end are discarded). Not when
# the caller passes a cache: it must stop exactly after the last token.
EOS_CHECK_EVERY = 16
# cuda_graph=None captures a graph only for at least this many new tokens (capture costs a few steps).
AUTO_GRAPH_MIN_TOKENS = 8


def _prepare(prompts: Prompts, device: torch.device) -> tuple[list[torch.Tensor], bool]:
    """Prompts as a list of 1-D long tensors, and whether they came as a 2-D tensor."""
    if isinstance(prompts, torch.Tensor):
        if prompts.is_floating_point() or prompts.is_complex() or prompts.dtype == torch.bool:
            raise TypeError(f"prompts must hold integer token ids, got a {prompts.dtype} tensor")
        if prompts.dim() != 2:
            raise ValueError(f"a prompt tensor must have shape (batch, length), got {tuple(prompts.shape)}; "
                             "pass prompts of different lengths as a list of lists")
        if prompts.numel() == 0:
            raise ValueError(f"prompts are empty: shape {tuple(prompts.shape)}")
        return list(prompts.to(device=device, dtype=torch.long)), True
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a (batch, length) tensor or a non-empty list of prompts, got {prompts!r}")
    if all(isinstance(p, int) for p in prompts):
        raise TypeError("prompts is a flat list of ints: pass a list of prompts, e.g. [[1, 2, 3]]")
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool or p.dim() != 1:
                raise TypeError(f"prompt {i} must be a 1-D integer tensor, got {p.dtype} of shape {tuple(p.shape)}")
            row = p.to(device=device, dtype=torch.long)
        elif isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            row = torch.tensor(p, dtype=torch.long, device=device)
        else:
            raise TypeError(f"prompt {i} must be a list of int token ids or a 1-D integer tensor, got {p!r}")
        if row.numel() == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        rows.append(row)
    return rows, False


def _left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(b, L) ids left-padded with token 0, and seq_idx (0 on padding, 1 on the prompt) or None."""
    length = max(len(r) for r in rows)
    ids = rows[0].new_zeros(len(rows), length)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
    if all(len(r) == length for r in rows):
        return ids, None
    pad = torch.tensor([length - len(r) for r in rows], device=ids.device)
    seq_idx = (torch.arange(length, device=ids.device)[None] >= pad[:, None]).to(torch.int32)
    return ids, seq_idx


def stream(
    model: DecodingModel,
    prompts: Prompts,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | Sequence[int] | None = None,
    prefill_chunk_size: int = 2048,
    cache: Cache | None = None,
    cuda_graph: bool | None = None,
) -> Iterator[torch.Tensor]:
    """Generate token by token, yielding each step's (b,) long tensor of new tokens as it comes.

    Args:
        prompts: a (b, l) integer tensor, or a list of prompts of any lengths (lists of ints or 1-D tensors).
        max_new_tokens: at most this many steps.
        temperature, top_k, top_p, min_p, repetition_penalty: see :class:`SamplingParams`;
            ``temperature=0`` is greedy.
        eos_token_id: token id(s) that end a row. A finished row yields its first eos id from then on;
            the stream stops when every row has finished.
        seed: an int (row i uses ``seed + i``), one int per row, or None (drawn from torch's global RNG).
        prefill_chunk_size: prompts are read this many positions at a time (bounds prefill memory).
        cache: continue from this cache (e.g. a document read earlier); updated in place, so clone it
            to keep it. Its rows must match the prompts, which then must all have the same length. With a
            CUDA graph the steps run on a kept graph's own buffers: the cache is brought up to date when the
            stream ends or is closed, not after each token.
        cuda_graph: capture one decode step in a CUDA graph and replay it per token (same tokens as
            the eager loop, much less launch overhead). None: on when the model is on CUDA, its layers
            allow it (Mamba, Mamba-2, Mamba-3, sliding-window attention, MLP; not full attention or MoE)
            and ``max_new_tokens >= 8``; True: required (a clear error otherwise); False: eager.
    """
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(prefill_chunk_size, bool) or not isinstance(prefill_chunk_size, int) or prefill_chunk_size < 1:
        raise ValueError(f"prefill_chunk_size must be a positive int, got {prefill_chunk_size!r}")
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    vocab = model.config.vocab_size
    if any(isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < vocab for e in eos):
        raise ValueError(f"eos_token_id must be token id(s) in [0, {vocab}), got {eos_token_id!r}")
    device = model.embedding.weight.device
    rows, _ = _prepare(prompts, device)
    batch = len(rows)
    ids, seq_idx = _left_pad(rows)
    # A caller's cache must end exactly after the last token read: no steps past the end.
    check_every = _eos_check_every(device) if cache is None else 1
    if cache is None:
        cache = model.allocate_cache(batch)
    elif seq_idx is not None:
        raise ValueError("with a cache, all prompts must have the same length (padding would not see the cache)")
    elif cache.batch_size != batch:
        raise ValueError(f"cache has {cache.batch_size} rows for {batch} prompts")
    generators = None if params.greedy else make_generators(seed, batch, device)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(batch, model.config.padded_vocab_size, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            seen[i, r] = True
    use_graph = _use_graph(model, device, cuda_graph, max_new_tokens)
    # The settings as (batch,) tensors made once: a captured step reads them from fixed buffers.
    state = DecodeState(cache, RowSampling.uniform(params, batch, device), vocab, generators,
                        torch.tensor(eos, dtype=torch.long, device=device),
                        torch.zeros(batch, dtype=torch.bool, device=device), seen)
    return _decode(model, ids, seq_idx, state, max_new_tokens, prefill_chunk_size, use_graph, check_every)


def _use_graph(model: DecodingModel, device: torch.device, cuda_graph: bool | None, max_new_tokens: int) -> bool:
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be True, False or None (auto), got {cuda_graph!r}")
    if cuda_graph is False:
        return False
    blocker = "the model is not on a CUDA device" if device.type != "cuda" else graph_blocker(model)
    if cuda_graph and blocker:
        raise ValueError(f"cuda_graph=True: {blocker}; pass cuda_graph=None or False to decode eagerly")
    return blocker is None and (cuda_graph or max_new_tokens >= AUTO_GRAPH_MIN_TOKENS)


@torch.no_grad()
def _decode(model: DecodingModel, ids: torch.Tensor, seq_idx: torch.Tensor | None, state: DecodeState,
            max_new_tokens: int, prefill_chunk_size: int, use_graph: bool, check_every: int) -> Iterator[torch.Tensor]:
    """The generation loop behind :func:`stream` (arguments already checked)."""
    if max_new_tokens == 0:
        return
    token = pick(_prefill(model, ids, seq_idx, state.cache, prefill_chunk_size), state)
    if not use_graph or max_new_tokens == 1:
        lean = lean_decoder(model, state.cache)
        yield from _steps(model, token, state, None, lean, max_new_tokens, check_every)
        return
    with cached_step(model, token, state) as (graphed, graph_state):
        yield from _steps(model, token, graph_state, graphed, None, max_new_tokens, check_every)


def _steps(model: DecodingModel, token: torch.Tensor, state: DecodeState, graphed: GraphedStep | None,
           lean: LeanDecoder | None, max_new_tokens: int, check_every: int) -> Iterator[torch.Tensor]:
    """Yield ``token`` and the tokens after it, replaying ``graphed`` (which runs on ``state``) or eagerly
    (through the ``lean`` decoder where there is one)."""
    pending: list[torch.Tensor] = []
    finished: list[torch.Tensor] = []
    for n in range(1, max_new_tokens + 1):
        if not state.eos_ids.numel():
            yield token
        else:
            pending.append(token)
            finished.append(state.done.all())
            if len(pending) == check_every or n == max_new_tokens:
                # One device read for the whole batch of steps.
                for tok, all_done in zip(pending, torch.stack(finished).tolist()):
                    yield tok
                    if all_done:
                        return
                pending.clear()
                finished.clear()
        if n == max_new_tokens:
            return
        if graphed is not None:
            graphed.replay()
            token = graphed.token.clone()
        else:
            token = step(model, token, state, lean)
        state.cache.seqlen_offset += 1


def _eos_check_every(device: torch.device) -> int:
    """Tokens between two reads of the finished rows: a read is free on CPU, a synchronisation on CUDA."""
    return EOS_CHECK_EVERY if device.type == "cuda" else 1


def _prefill(model: DecodingModel, ids: torch.Tensor, seq_idx: torch.Tensor | None, cache: Cache,
             chunk: int) -> torch.Tensor:
    """Read the (left-padded) prompts into ``cache`` ``chunk`` positions at a time; last logits (b, V)."""
    length = ids.shape[1]
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        part_idx = None if seq_idx is None else seq_idx[:, start:end]
        if part_idx is not None and start > 0:
            # The cache carries the previous chunk's document; a row whose prompt starts exactly here
            # must start from the zero state instead.
            restart = seq_idx[:, start] != seq_idx[:, start - 1]
            if bool(restart.any()):
                cache.reset_(restart)
        logits = model(ids[:, start:end], seq_idx=part_idx, cache=cache, logits_to_keep=1).logits[:, -1]
    return logits


def generate(
    model: DecodingModel,
    prompts: Prompts,
    max_new_tokens: int,
    **kwargs: object,
) -> torch.Tensor | list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens per prompt (arguments as :func:`stream`).

    Returns, for a (b, l) tensor of prompts, a (b, l + steps) tensor of prompt and new tokens (rows
    that ended early are filled with their eos id); for a list of prompts, a list of the new tokens of
    each prompt, ending with its eos token if one was produced.

    Example::

        out = generate(model, [[1, 2, 3], [4, 5]], 20, temperature=0.7, top_p=0.9, seed=0, eos_token_id=2)
    """
    steps = list(stream(model, prompts, max_new_tokens, **kwargs))
    device = model.embedding.weight.device
    if isinstance(prompts, torch.Tensor):
        new = torch.stack(steps, dim=1) if steps else torch.zeros(prompts.shape[0], 0, dtype=torch.long, device=device)
        return torch.cat([prompts.to(device=device, dtype=torch.long), new], dim=1)
    eos = kwargs.get("eos_token_id")
    eos_set = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    table = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prompts]
    out = []
    for row in table:
        cut = next((k + 1 for k, t in enumerate(row) if t in eos_set), len(row))
        out.append(row[:cut])
    return out
