"""The engine's batched decode step: every running request's next token in one step, eager or from a CUDA graph.

On a GPU a decode step of a small model is launch-bound (hundreds of small kernels for a few
microseconds of work each), so the step (forward of one token per row, then the sampling, each row with
its own settings and seeded stream) is captured in a CUDA graph (:class:`ssmkit.generation.decode.GraphedStep`,
the one ``generate`` replays) and replayed. A graph has fixed shapes, so one is captured per **bucket** of
rows (1, 2, 4, ..., 256, and ``max_batch``) and per combination of sampling steps the rows need
(:class:`SamplingKinds`: a greedy batch computes no noise and sorts nothing), lazily at first use, all in
one memory pool. ``n`` running requests replay the graph of the smallest bucket of at least ``n`` rows:
the rows beyond ``n`` are **padding**, free rows of the storage (:class:`SlotCache`) whose results are
never read and whose every tensor is overwritten when a request takes the row; every op of the step is
row-wise, so padding never changes a running row's numbers.

Eagerly (on a CPU, or a model whose step cannot be captured) the step runs on exactly the rows in use (on a
CPU through the lean decoder where it applies, :mod:`ssmkit.generation.lean`);
``pad=True`` runs the eager step on the padded bucket instead, which is what the graph replays (so the
padding is tested without a GPU).

:meth:`BatchedDecoder.launch` only *enqueues* a step and the copy of its tokens to the host (a pinned
buffer, an event): the engine launches step k+1 before it reads step k's tokens, so on a GPU its Python
work (callbacks, joins, leaves, prefill launches) runs while the GPU computes, and the host waits on the
device once per step, for tokens already computed. :meth:`BatchedDecoder.capture` captures every bucket's
graph ahead (a server's start), so a burst of clients never waits for captures.

A graph also reads tensors the layers computed from the parameters and cached outside it (Mamba's decode
``A``): every step first asks a :class:`~ssmkit.generation.param_watch.ParameterWatch` whether a parameter or
buffer changed (``load_state_dict``, an in-place edit, a replaced tensor) and then drops every graph; each
bucket is captured again at its next use, on the new values. An edit made while the engine runs applies
from the next step launched after it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from ssmkit.generation.decode import (
    DecodeState,
    GraphedStep,
    graph_blocker,
    lean_decoder,
    step,
)
from ssmkit.generation.lean import LeanDecoder
from ssmkit.generation.param_watch import ParameterWatch
from ssmkit.generation.sampling import SamplingKinds
from ssmkit.serve.slots import SlotCache

if TYPE_CHECKING:
    from ssmkit.models.language_model import LanguageModel

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes graphs are captured for: the :data:`BUCKETS` below ``max_batch``, then ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    return (*(b for b in BUCKETS if b < max_batch), max_batch)


def bucket_for(rows: int, sizes: tuple[int, ...]) -> int:
    """The smallest bucket of at least ``rows`` rows."""
    for size in sizes:
        if size >= rows:
            return size
    raise ValueError(f"{rows} rows exceed the largest bucket ({sizes[-1]})")


def use_cuda_graph(model: LanguageModel, cuda_graph: bool | None) -> bool:
    """Whether the engine replays CUDA graphs: None = when the model is on CUDA and its step can be captured;
    True = required (a clear error otherwise)."""
    device = model.embedding.weight.device
    blocker = "the model is not on a CUDA device" if device.type != "cuda" else graph_blocker(model)
    if cuda_graph and blocker:
        raise ValueError(f"cuda_graph=True: {blocker}")
    return cuda_graph is not False and blocker is None


@dataclasses.dataclass(eq=False)
class LaunchedStep:
    """A decode step enqueued by :meth:`BatchedDecoder.launch`: ``rows`` rows, whose tokens are copied into
    ``host`` once ``event`` (None on a CPU: already there) has passed."""

    rows: int
    host: torch.Tensor
    event: Any = None

    def tokens(self) -> list[int]:
        """The step's tokens, in row order at launch (waits for the device: the engine's one sync a step)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host[: self.rows].tolist()


class BatchedDecoder:
    """The slots of the running requests and the step that decodes them all (see the module docstring).

    Counters: ``steps``, ``rows`` (rows in use summed over steps), ``padded_rows`` (padding rows computed),
    ``captures`` (graphs captured), ``recaptures`` (times every graph was dropped after a parameter changed).
    """

    def __init__(self, model: LanguageModel, max_batch: int, *, cuda_graph: bool = False,
                 pad: bool | None = None) -> None:
        self.model = model
        self.sizes = bucket_sizes(max_batch)
        self.cuda_graph = cuda_graph
        self.pad = cuda_graph if pad is None else pad
        if cuda_graph and not self.pad:
            raise ValueError("a CUDA graph replays a bucket: pad must be on")
        self.slots = SlotCache(model.config.padded_vocab_size, capacity=max_batch if self.pad else None)
        self._graphs: dict[tuple[int, SamplingKinds], tuple[GraphedStep, DecodeState]] = {}
        self._pool: Any = None
        self._watch = ParameterWatch(model)
        # (rows, grad enabled) -> the eager step's lean decoder (None: the blocks' own step), see _lean.
        self._leans: dict[tuple[int, bool], LeanDecoder | None] = {}
        # Two host buffers in turn: step k+1 is launched before step k's tokens are read.
        self._host: list[tuple[torch.Tensor, Any]] = []
        self._next_host = 0
        self.steps = self.rows = self.padded_rows = self.captures = self.recaptures = 0

    def step(self) -> torch.Tensor:
        """One step for every row in use: returns their next tokens (n,) (a view of the slots' tokens, which
        the next step reads); caches, draw counters and seen masks are updated in place."""
        return self.slots.tokens[: self._step()]

    def launch(self) -> LaunchedStep:
        """:meth:`step` enqueued, with the copy of its tokens to the host; read them with
        :meth:`LaunchedStep.tokens` (on a GPU, after launching the next step if you like: it reads the
        tokens this one leaves in the slots, and the copy is ordered before it)."""
        n = self._step()
        tokens = self.slots.tokens[:n]
        if tokens.device.type != "cuda":
            return LaunchedStep(n, tokens.clone())
        if not self._host or self._host[0][0].shape[0] < self.slots.capacity:
            self._host = [(torch.empty(self.slots.capacity, dtype=torch.long, pin_memory=True), torch.cuda.Event())
                          for _ in range(2)]
        host, event = self._host[self._next_host]
        self._next_host ^= 1
        host[:n].copy_(tokens, non_blocking=True)
        event.record()
        return LaunchedStep(n, host, event)

    def capture(self, kinds: Iterable[SamplingKinds]) -> int:
        """Capture ahead the graphs of every bucket for each of ``kinds``; needs at least one row in use (its
        state is a template, untouched). Returns the graphs captured."""
        if not self.cuda_graph:
            return 0
        if self.slots.size == 0:
            raise RuntimeError("capture needs a row in use")
        self._drop_stale_graphs()
        before = self.captures
        for kind in dict.fromkeys(kinds):
            for rows in self.sizes:
                self._graph(rows, kind)
        return self.captures - before

    def _step(self) -> int:
        n = self.slots.size
        if n == 0:
            raise RuntimeError("no rows to decode")
        kinds = self.slots.kinds()
        rows = bucket_for(n, self.sizes) if self.pad else n
        if self.cuda_graph:
            self._drop_stale_graphs()
            self._graph(rows, kinds).replay()
        else:
            state = self.slots.decode_state(rows, kinds, self.model.config.vocab_size)
            tokens = self.slots.tokens[:rows]
            # On a CPU, Mamba / Mamba-2 models step through the lean decoder, as generate() does.
            tokens.copy_(step(self.model, tokens, state, self._lean(state.cache)))
            self.slots.write_back(state.cache)
        self.steps += 1
        self.rows += n
        self.padded_rows += rows - n
        return n

    def _lean(self, cache: Any) -> LeanDecoder | None:
        """:func:`lean_decoder` for ``cache``, asked once per batch size while the parameters are unchanged:
        it walks the model's parameters to see whether they changed (about 0.2 ms for byte-small on a CPU,
        several percent of a step), which the watch tells for a tenth of that."""
        if self._watch.changed():
            self._leans.clear()
        key = (cache.batch_size, torch.is_grad_enabled())
        if key not in self._leans:
            self._leans[key] = lean_decoder(self.model, cache)
        return self._leans[key]

    def _drop_stale_graphs(self) -> None:
        """Drop every graph if a parameter or buffer changed since the last step (see the module docstring)."""
        if self._watch.changed() and self._graphs:
            # A step launched before may still be replaying a graph: let it end before its pool is released.
            torch.cuda.synchronize(self.model.embedding.weight.device)
            self._graphs.clear()
            self.recaptures += 1

    def _graph(self, rows: int, kinds: SamplingKinds) -> GraphedStep:
        key = (rows, kinds)
        if key not in self._graphs:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            # The state is kept with its graph: the graph reads and writes its buffers (views of the slots).
            state = self.slots.decode_state(rows, kinds, self.model.config.vocab_size)
            # Request threads may copy states on the GPU meanwhile (sessions, prefix snapshots).
            graphed = GraphedStep(self.model, self.slots.tokens[:rows], state, in_place=True, pool=self._pool,
                                  capture_error_mode="thread_local")
            self._graphs[key] = (graphed, state)
            self.captures += 1
        return self._graphs[key][0]
