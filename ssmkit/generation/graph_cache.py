"""Captured decode steps kept between ``generate`` calls, as mamba_ssm keeps its decoding graphs.

Capturing a step costs two eager warm-up steps and the capture itself — at batch 1 on a GPU as much as
dozens of replayed tokens — so a ``generate`` call that captured afresh each time spent more on that than on
decoding short answers. A captured step reads and writes fixed buffers (the cache states, the sampling
settings, the random streams' counters, the masks); an entry here owns such a set of buffers and its graph.
A call whose decode state has the same structure (batch, cache shapes and dtypes, sampling kinds, number of
eos ids, penalty, random streams) and whose model still has the same parameter storage copies its state into
the entry's buffers, replays, and copies the cache back out: the same tokens as a fresh capture.

Kept per model (weakly: a model that goes away takes its graphs with it), at most ``MAX_PER_MODEL`` entries,
least recently used first out. An entry is used by one call at a time; a concurrent call with the same key
captures its own graph, uncached. Module-level kernel switches are read at capture time: call
:func:`clear_graph_cache` after changing one (benchmarks do, between variants).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

import torch

from ssmkit.generation.decode import DecodeState, DecodingModel, GraphedStep
from ssmkit.generation.sampling import RowSampling

MAX_PER_MODEL = 4


class _Entry:
    def __init__(self, graphed: GraphedStep, state: DecodeState) -> None:
        self.graphed = graphed
        self.state = state
        self.lock = threading.Lock()


_ENTRIES: weakref.WeakKeyDictionary[object, OrderedDict[Hashable, _Entry]] = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


def _key(model: DecodingModel, state: DecodeState) -> Hashable:
    """What a captured step depends on besides the values in its buffers."""
    params = state.params
    if not isinstance(params, RowSampling):
        raise TypeError("a cached decode graph needs RowSampling settings (device tensors it can copy into)")
    layout = tuple(tuple((name, t.shape, t.dtype, t.device) for name, t in s.tensors().items())
                   for s in state.cache.states)
    storage = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
    return (layout, storage, params.kinds, state.vocab_size, state.generators is None, state.eos_ids.numel(),
            state.seen is None, torch.is_autocast_enabled("cuda"))


def _copy_into(dst: DecodeState, src: DecodeState) -> None:
    """Every buffer of ``src`` into ``dst``'s (same structure: see :func:`_key`)."""
    dst.cache.copy_(src.cache)
    for d, s in zip(dst.params.tensors(), src.params.tensors()):
        d.copy_(s)
    if src.generators is not None:
        dst.generators.seeds.copy_(src.generators.seeds)
        dst.generators.draws.copy_(src.generators.draws)
    dst.eos_ids.copy_(src.eos_ids)
    dst.done.copy_(src.done)
    if src.seen is not None:
        dst.seen.copy_(src.seen)


@contextmanager
def cached_step(model: DecodingModel, first: torch.Tensor, state: DecodeState,
                capture: Callable[[DecodingModel, torch.Tensor, DecodeState], GraphedStep] | None = None,
                ) -> Iterator[tuple[GraphedStep, DecodeState]]:
    """A captured step for ``state`` and the decode state it runs on, with ``first`` (b,) in its token buffer.

    Inside the block, decode with the yielded state (its cache is the entry's); on leaving, the cache (with
    its ``seqlen_offset``) and the other buffers are copied back into ``state``, so the caller sees what a
    fresh capture on its own buffers would have left. ``capture`` makes a step (tests pass an eager stand-in).
    """
    key = _key(model, state)
    with _GUARD:
        entries = _ENTRIES.setdefault(model, OrderedDict())
        entry = entries.get(key)
        if entry is not None and entry.lock.acquire(blocking=False):
            entries.move_to_end(key)
        else:
            entry = None
    if entry is None:
        own = state.clone()
        fresh = _Entry((capture or GraphedStep)(model, first, own), own)
        fresh.lock.acquire()
        with _GUARD:
            entries = _ENTRIES.setdefault(model, OrderedDict())
            if key not in entries:  # else another call holds that key's entry: this one stays uncached
                entries[key] = fresh
                idle = [k for k, e in entries.items() if not e.lock.locked()]  # least recently used first
                for old_key in idle[: max(len(entries) - MAX_PER_MODEL, 0)]:
                    del entries[old_key]
        entry = fresh
    try:
        _copy_into(entry.state, state)
        entry.graphed.token.copy_(first)
        yield entry.graphed, entry.state
    finally:
        try:  # also when the consumer stops early: its cache holds every token read, as on the eager path
            _copy_into(state, entry.state)
        finally:
            entry.lock.release()


def clear_graph_cache(model: DecodingModel | None = None) -> None:
    """Drop the kept decode graphs of ``model`` (None: of every model), e.g. after switching a kernel."""
    with _GUARD:
        if model is None:
            _ENTRIES.clear()
        else:
            _ENTRIES.pop(model, None)


def cached_graphs(model: DecodingModel) -> int:
    """How many captured decode steps are kept for ``model``."""
    with _GUARD:
        return len(_ENTRIES.get(model, ()))
