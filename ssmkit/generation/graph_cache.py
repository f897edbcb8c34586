"""Captured decode steps kept between ``generate`` calls, as mamba_ssm keeps its decoding graphs.

Capturing a step costs two eager warm-up steps and the capture itself — at batch 1 on a GPU as much as
dozens of replayed tokens — so a ``generate`` call that captured afresh each time spent more on that than on
decoding short answers. A captured step reads and writes fixed buffers (the cache states, the sampling
settings, the random streams' counters, the masks); an entry here owns such a set of buffers and its graph.
A call whose decode state has the same structure (batch, cache shapes and dtypes, sampling kinds, number of
eos ids, penalty, random streams), made under the same autocast and inference-mode settings, and whose model
still has the same parameter storage (an entry goes when that storage is freed), not updated in place since,
copies its state into the entry's buffers, replays, and copies the cache back out: the same tokens as a fresh capture.

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
from torch.multiprocessing.reductions import StorageWeakRef

from ssmkit.generation.decode import DecodeState, DecodingModel, GraphedStep
from ssmkit.generation.sampling import RowSampling

MAX_PER_MODEL = 4


class _Entry:
    def __init__(self, graphed: GraphedStep, state: DecodeState, tensors: tuple[torch.Tensor, ...]) -> None:
        self.graphed = graphed
        self.state = state
        self.lock = threading.Lock()
        # The key holds the parameters' addresses; once their storage is freed an address may come back for
        # another tensor, while the graph also read tensors cached from the old ones (the layers' decode A,
        # freed when recomputed): the entry is dead then, whatever the key says.
        self.storages = [StorageWeakRef(t.untyped_storage()) for t in tensors]

    def dead(self) -> bool:
        return any(s.expired() for s in self.storages)


_ENTRIES: weakref.WeakKeyDictionary[object, OrderedDict[Hashable, _Entry]] = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


def _key(model: DecodingModel, state: DecodeState, tensors: tuple[torch.Tensor, ...]) -> Hashable:
    """What a captured step depends on besides the values in its buffers (``tensors``: the model's parameters
    and buffers)."""
    params = state.params
    if not isinstance(params, RowSampling):
        raise TypeError("a cached decode graph needs RowSampling settings (device tensors it can copy into)")
    layout = tuple(tuple((name, t.shape, t.dtype, t.device) for name, t in s.tensors().items())
                   for s in state.cache.states)
    # The versions: an in-place update keeps the storage, but not what the capture computed from the
    # parameters outside the graph (e.g. the layers' decode A, cached from A_log while its version holds).
    storage = (tuple(t.data_ptr() for t in tensors), tuple(t._version for t in tensors))
    # Under inference_mode the entry's buffers are inference tensors, which a call outside it cannot copy into;
    # the autocast dtype picks the captured kernels' dtypes.
    autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    return (layout, storage, params.kinds, state.vocab_size, state.generators is None, state.eos_ids.numel(),
            state.seen is None, autocast, torch.is_inference_mode_enabled())


def _live_entries(model: DecodingModel) -> OrderedDict[Hashable, _Entry]:
    """``model``'s entries, the idle dead ones dropped (call under ``_GUARD``)."""
    entries = _ENTRIES.setdefault(model, OrderedDict())
    for key in [k for k, e in entries.items() if not e.lock.locked() and e.dead()]:
        del entries[key]
    return entries


def _outdated(old: Hashable, new: Hashable) -> bool:
    """Whether ``old`` was captured on the very parameter storage of ``new`` before an in-place update: its
    versions are behind for good, so it can never be used again (e.g. the trainer's samples between steps)."""
    (old_ptrs, old_versions), (new_ptrs, new_versions) = old[1], new[1]
    return old_ptrs == new_ptrs and old_versions != new_versions


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
    tensors = (*model.parameters(), *model.buffers())
    key = _key(model, state, tensors)
    with _GUARD:
        entries = _live_entries(model)
        entry = entries.get(key)
        if entry is not None and entry.lock.acquire(blocking=False):
            entries.move_to_end(key)
        else:
            entry = None
    if entry is None:
        own = state.clone()
        fresh = _Entry((capture or GraphedStep)(model, first, own), own, tensors)
        fresh.lock.acquire()
        with _GUARD:
            entries = _ENTRIES.setdefault(model, OrderedDict())
            if key not in entries:  # else another call holds that key's entry: this one stays uncached
                entries[key] = fresh
                idle = [k for k, e in entries.items() if not e.lock.locked()]  # least recently used first
                for old_key in [k for k in idle if _outdated(k, key)]:
                    del entries[old_key]
                idle = [k for k in idle if k in entries]
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
        return len(_live_entries(model)) if model in _ENTRIES else 0
