"""One decode step (forward one token through the cache, then pick the next token), run eagerly or
replayed from a CUDA graph.

The step is made of device tensor ops only: no host synchronisation, every buffer it writes (cache
states, the draw counters of the random streams, the finished-row mask, the seen-token mask) updated
in place. So the same function runs eagerly and can be captured once and replayed per token, and both
give the same tokens.

Dimensions: ``b`` batch, ``V`` padded vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ssmkit.generation.lean import LeanDecoder, lean_decoder
from ssmkit.generation.sampling import (
    RowGenerators,
    RowSampling,
    SamplingParams,
    sample_next,
    sample_rows,
)
from ssmkit.ops import decode_launch, decode_step, norm_linear
from ssmkit.ops.norm_linear import rms_norm_linear_argmax


class Cache(Protocol):
    """What generation needs of a model cache (:class:`ssmkit.models.ModelCache` is one): one state per
    layer, the positions read, and a copy."""

    states: list[Any]
    seqlen_offset: int

    @property
    def batch_size(self) -> int: ...

    def clone(self) -> Cache: ...


class DecodingModel(Protocol):
    """What generation needs of a model (:class:`ssmkit.models.DecodingModel` is one): its forward with a
    cache, a cache allocator, and for the fused decode step its embedding, residual blocks (each with a
    ``mixer`` and an optional ``ff`` that follow the layers' state protocol, :mod:`ssmkit.layers.state`),
    final norm and head."""

    embedding: nn.Module
    layers: Sequence[nn.Module]
    norm_f: nn.Module
    head_weight: torch.Tensor
    config: Any

    def __call__(self, input_ids: torch.Tensor, **kwargs: Any) -> Any: ...

    def allocate_cache(self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None,
                       *, max_length: int | None = None) -> Cache: ...

    def parameters(self) -> Any: ...


@dataclasses.dataclass
class DecodeState:
    """Everything a decode step reads and updates besides the model.

    cache: the model cache (updated in place); params: how to pick tokens (the same for every row, or
    per row as :class:`RowSampling`, e.g. a serving engine's requests); vocab_size: tokens beyond it
    (padding of the vocabulary) are never picked; generators: one random stream per row (None when
    greedy); eos_ids: (e,) long end-of-sequence ids, empty for none; done: (b,) bool rows that have
    produced an eos id; seen: (b, V) bool tokens seen per row, for the repetition penalty (or None).
    """

    cache: Cache
    params: SamplingParams | RowSampling
    vocab_size: int
    generators: RowGenerators | None
    eos_ids: torch.Tensor
    done: torch.Tensor
    seen: torch.Tensor | None

    def clone(self) -> DecodeState:
        """An independent copy (for the warm-up run of a graph capture)."""
        generators = None
        if self.generators is not None:
            generators = RowGenerators(self.generators.seeds.clone())
            generators.draws.copy_(self.generators.draws)
        return DecodeState(self.cache.clone(), self.params, self.vocab_size, generators, self.eos_ids.clone(),
                           self.done.clone(), None if self.seen is None else self.seen.clone())


def pick(logits: torch.Tensor, state: DecodeState) -> torch.Tensor:
    """Next token (b,) long from logits (b, V); finished rows repeat their first eos id; updates the masks."""
    logits[:, state.vocab_size:] = -torch.inf
    if isinstance(state.params, RowSampling):
        token = sample_rows(logits, state.params, seen=state.seen, generators=state.generators)
    else:
        token = sample_next(logits, state.params, seen=state.seen, generators=state.generators)
    return _settle(token, state)


def _settle(token: torch.Tensor, state: DecodeState) -> torch.Tensor:
    """The picked token (b,) after the eos rule (finished rows repeat their first eos id); updates the masks."""
    if state.eos_ids.numel():
        token = torch.where(state.done, state.eos_ids[0], token)
        state.done |= (token[:, None] == state.eos_ids).any(-1)
    if state.seen is not None:
        state.seen.scatter_(1, token[:, None], True)
    return token


def forward_one(model: DecodingModel, token: torch.Tensor, cache: Cache) -> torch.Tensor:
    """Logits (b, V) of one token (b,) long that continues ``cache`` (updated in place, bar seqlen_offset).

    ``LanguageModel.forward`` with ``logits_to_keep=1`` minus its input checks, which read the token
    values on the host (a synchronisation per token, and not capturable in a CUDA graph); the tokens
    here come from :func:`pick`, so they are valid ids. Through :func:`lean_decoder` where it applies
    (CPU, no autograd, Mamba / Mamba-2 blocks), else :func:`forward_one_layers`.
    """
    lean = lean_decoder(model, cache)
    return lean(token, cache) if lean is not None else forward_one_layers(model, token, cache)


def forward_one_layers(model: DecodingModel, token: torch.Tensor, cache: Cache) -> torch.Tensor:
    """:func:`forward_one` through the blocks' own decode step (every device, every layer kind)."""
    return model.head_logits(model.norm_f(_last_residual(model, token, cache)))


def _last_residual(model: DecodingModel, token: torch.Tensor, cache: Cache) -> torch.Tensor:
    """The residual stream (b, H) after the last block, for one token (b,) through the blocks' decode step."""
    residual = inputs = model.embedding(token[:, None])
    for block, layer_state in zip(model.layers, cache.states):
        residual = block(residual, cache=layer_state, inputs=inputs)
    return residual[:, -1]


def _greedy_head(model: DecodingModel, state: DecodeState) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """The model's ``rms_head()`` parts when :func:`step` may pick this step's tokens with the fused greedy head
    (:func:`ssmkit.ops.rms_norm_linear_argmax`; ``decode_launch.current().greedy_head`` switches it): every
    row greedy without a repetition penalty, at most ``norm_linear.MAX_ROWS`` rows, and a model whose logits
    are ``F.linear(rms_norm(h), head_weight)`` (it says so through ``rms_head()``). Else None. Off a GPU the
    op runs the same unfused ops as :func:`pick` (the same tokens, bit for bit)."""
    params = state.params
    kinds = params.kinds if isinstance(params, RowSampling) else None
    greedy = (not kinds.sample and not (kinds.penalty and state.seen is not None)) if kinds is not None else (
        params.greedy and (params.repetition_penalty == 1.0 or state.seen is None))
    rms_head = getattr(model, "rms_head", None)
    if not (greedy and decode_launch.current().greedy_head and rms_head is not None
            and state.done.shape[0] <= norm_linear.MAX_ROWS):
        return None
    return rms_head()


def greedy_head_applies(model: DecodingModel, state: DecodeState) -> bool:
    """Whether :func:`step` picks this step's tokens with the fused greedy head (see :func:`_greedy_head`)."""
    return _greedy_head(model, state) is not None


def step(model: DecodingModel, token: torch.Tensor, state: DecodeState,
         lean: LeanDecoder | None = None) -> torch.Tensor:
    """Read ``token`` (b,) and pick the next one (b,); the cache's ``seqlen_offset`` is left to the caller.

    ``lean``: a :class:`LeanDecoder` of ``model`` already checked against ``state.cache`` (the loop gets
    it once, :func:`lean_decoder`), or None for the blocks' own step. A greedy step may pick
    through the fused head (:func:`greedy_head_applies`): the same token as the logits' argmax."""
    head = _greedy_head(model, state) if lean is None else None
    if head is not None:
        norm_weight, head_weight, eps = head
        hidden = _last_residual(model, token, state.cache)
        picked = rms_norm_linear_argmax(hidden, norm_weight, head_weight, eps=eps,
                                        vocab_size=min(state.vocab_size, head_weight.shape[0]))
        return _settle(picked, state)
    logits = lean(token, state.cache) if lean is not None else forward_one_layers(model, token, state.cache)
    return pick(logits, state)


def graph_blocker(model: DecodingModel) -> str | None:
    """Why ``model``'s decode step cannot be captured in a CUDA graph, or None when it can.

    Each layer says so itself (the state protocol, :mod:`ssmkit.layers.state`): ``decode_graph_blocker`` is
    None when its one-token step with a cache makes no host synchronisation and allocates nothing, else
    the reason. A layer without the attribute is not known to be capturable.
    """
    for i, block in enumerate(model.layers):
        mixer, ff = block.mixer, block.ff
        reason = getattr(mixer, "decode_graph_blocker",
                         f"a {type(mixer).__name__} mixer (its decode step is not known to be capturable)")
        if reason is not None:
            return f"layer {i} is {reason}"
        if ff is not None:
            reason = getattr(ff, "decode_graph_blocker",
                             f"a {type(ff).__name__} feed-forward (not known to be capturable)")
            if reason is not None:
                return f"layer {i} has {reason}"
    return None


def _adopt_scratch(src: Any, dst: Any) -> None:
    """What the kernels allocated lazily on the warm-up copy's state tensors, allocated for the real state now
    (outside the capture, which would otherwise replay the allocation's zero fill every step)."""
    for mine, theirs in zip(getattr(src, "states", ()), getattr(dst, "states", ())):
        for a, b in zip(_state_tensors(mine), _state_tensors(theirs)):
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                decode_step.adopt_step_scratch(a, b)


def _state_tensors(state: Any) -> list[Any]:
    """A cache state's tensors in field order: a :class:`~ssmkit.layers.LayerState`'s ``tensors()`` dict, or the
    sequence another cache's state returns (the :class:`Cache` protocol leaves states open); none without it."""
    tensors = state.tensors() if callable(getattr(state, "tensors", None)) else ()
    return list(tensors.values() if isinstance(tensors, Mapping) else tensors)


class GraphedStep:
    """:func:`step` captured once in a CUDA graph for fixed buffers, then replayed per token.

    ``token`` is the static (b,) buffer: write the current token into it (the constructor copies
    ``first``, or uses it as the buffer with ``in_place``), call :meth:`replay`, read the next token from
    it. The step runs twice on a copy of the decode state (on a side stream) before the capture, so that
    lazy initialisations and kernel compilations happen outside the graph and the real state is untouched.
    ``pool``: a memory pool (``torch.cuda.graph_pool_handle()``) shared with other graphs that are never
    replayed at the same time (a serving engine's graphs, one per batch size). ``capture_error_mode``:
    ``torch.cuda.graph``'s; "thread_local" where other threads may use the GPU during the capture (a server's
    request threads copying states), which "global" would turn into capture errors.
    """

    def __init__(self, model: DecodingModel, first: torch.Tensor, state: DecodeState, warmup: int = 2, *,
                 in_place: bool = False, pool: Any = None, capture_error_mode: str = "global") -> None:
        self.token = first if in_place else first.clone()
        scratch, scratch_token = state.clone(), first.clone()
        side = torch.cuda.Stream(device=first.device)
        side.wait_stream(torch.cuda.current_stream(first.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                scratch_token = step(model, scratch_token, scratch)
        torch.cuda.current_stream(first.device).wait_stream(side)
        _adopt_scratch(scratch.cache, state.cache)
        del scratch, scratch_token
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode=capture_error_mode):
            self.token.copy_(step(model, self.token, state))

    def replay(self) -> None:
        self.graph.replay()
