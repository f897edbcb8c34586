"""Continuous batching: one engine thread owns the model and decodes every running request together.

Each turn of the engine loop

1. admits newly submitted requests,
2. reads at most ``prefill_budget`` prompt tokens of the requests still reading their prompts, oldest
   first, in chunks of at most ``prefill_chunk_size`` (:mod:`ssmkit.serve.prefill`), so a long prompt is
   read between the decode steps of the running streams instead of stalling them,
3. runs **one** decode step for all decoding requests at once (:class:`BatchedDecoder`): a forward of one
   token per row on a batched cache whose rows are the requests (:class:`SlotCache`), then one token per
   row, each sampled with its request's own :class:`SamplingParams` and seeded stream, in the same step.
   On a GPU the step is replayed from a CUDA graph captured per batch-size bucket.

A request that finishes leaves the batch at once (its row is refilled by the last row) and a new one
joins at the next turn, so the batch follows the load: throughput grows with concurrency.

Why a request decodes the same tokens in a batch as :func:`ssmkit.generation.generate` alone: sampling
is done per row with the request's own random stream, seeded as ``generate`` seeds row 0, by the same
code (a step other rows need is an exact no-op for a row); a prompt is read in the same chunks (or
left-padded as ``generate`` pads a batch); and an SSM row's state never mixes with other rows. Only the
float rounding of batched matrix products can differ, orders of magnitude below what moves a draw in
practice.

Models whose cache grows with the context (full attention) cannot share a fixed-shape batched cache:
they decode each request with its own cache, still interleaved turn by turn.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from ssmkit.generation.sampling import (
    RowGenerators,
    SamplingParams,
    make_generators,
    sample_next,
)
from ssmkit.models.cache import ModelCache
from ssmkit.serve.decode_step import BatchedDecoder, use_cuda_graph
from ssmkit.serve.prefill import Reading, schedule_prefill
from ssmkit.serve.prefix_cache import PrefixPlan

if TYPE_CHECKING:
    from ssmkit.models.language_model import LanguageModel

log = logging.getLogger("ssmkit.serve")


class EngineBusy(RuntimeError):
    """The engine already holds its maximum number of requests."""


class EngineStopped(RuntimeError):
    """The engine is not running (stopped, or its thread died)."""


@dataclasses.dataclass(eq=False)
class GenerationRequest:
    """One request for the engine: read ``ids`` into a cache, then sample up to ``max_new_tokens``.

    ``on_token(token)`` is called from the engine thread with every new token and returns True to end the
    request there (e.g. a stop string was completed). ``on_done(finish_reason, cache)`` is called once at
    the end: ``finish_reason`` is ``"stop"`` (an eos id, or ``on_token`` said so), ``"length"``,
    ``"cancelled"`` or ``"error: <message>"``; ``cache`` is the (batch 1) state after the prompt and every
    sampled token except the last (which a caller may feed later), or None unless ``keep_state``.
    With ``max_new_tokens == 0`` the request only reads ``ids`` (the cache then holds all of them).
    ``prefix`` (only with ``cache=None``): resume from a prefix-cache snapshot of the first ``prefix.start``
    tokens of ``ids`` and snapshot the state where the plan says (:mod:`ssmkit.serve.prefix_cache`).
    """

    ids: Sequence[int]
    max_new_tokens: int
    params: SamplingParams
    seed: int
    on_token: Callable[[int], bool]
    on_done: Callable[[str, ModelCache | None], None]
    eos_ids: tuple[int, ...] = ()
    cache: ModelCache | None = None
    keep_state: bool = False
    prefix: PrefixPlan | None = None
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next turn (thread-safe)."""
        self.cancelled.set()


@dataclasses.dataclass(eq=False)
class _Running:
    """The engine's bookkeeping for one request."""

    request: GenerationRequest
    ids: torch.Tensor
    cache: ModelCache | None
    generator: RowGenerators | None
    seen: torch.Tensor | None
    start_offset: int = 0
    read: int = 0
    produced: int = 0
    token: int = -1
    row: int = -1
    ended: bool = False


class Engine:
    """The thread that runs the model for every request (see the module docstring).

    Example::

        engine = Engine(model, max_batch=64)
        engine.start()
        engine.submit(GenerationRequest(ids=[257, 104, 105], max_new_tokens=8, params=SamplingParams(),
                                        seed=0, on_token=lambda t: False, on_done=print))
    """

    def __init__(self, model: LanguageModel, *, max_batch: int = 64, max_requests: int = 256,
                 prefill_chunk_size: int = 2048, prefill_budget: int | None = None,
                 cuda_graph: bool | None = None) -> None:
        """``prefill_budget``: prompt tokens read per turn (default twice ``prefill_chunk_size``: the oldest
        prompt's chunk and as much for the others); ``cuda_graph``: replay the decode step from CUDA graphs
        (None: on when the model is on CUDA and its step can be captured; True: required)."""
        prefill_budget = 2 * prefill_chunk_size if prefill_budget is None else prefill_budget
        if max_batch < 1 or max_requests < 1 or prefill_chunk_size < 1 or prefill_budget < 1:
            raise ValueError("max_batch, max_requests, prefill_chunk_size and prefill_budget must be positive")
        self.model = model
        self.max_batch = max_batch
        self.max_requests = max_requests
        self.prefill_chunk_size = prefill_chunk_size
        self.prefill_budget = prefill_budget
        self.device = model.embedding.weight.device
        # A fixed-size cache (SSM and sliding-window layers) can be batched row by row.
        self.batched = model.cache_nbytes(1) == model.cache_nbytes(1 << 20)
        self.cuda_graph = self.batched and use_cuda_graph(model, cuda_graph)
        self.decoder = self._new_decoder()
        self._cond = threading.Condition()
        self._inbox: deque[GenerationRequest] = deque()
        self._count = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.tokens = 0

    def _new_decoder(self) -> BatchedDecoder:
        return BatchedDecoder(self.model, self.max_batch, cuda_graph=self.cuda_graph)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        return self._count

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ssmkit-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> None:
        """Queue ``request``; raises :class:`EngineBusy` when full, :class:`EngineStopped` when not running."""
        if not request.ids:
            raise ValueError("a generation request needs at least one token to read")
        with self._cond:
            if self._stopping or not self.alive:
                raise EngineStopped("the generation engine is not running")
            if self._count >= self.max_requests:
                raise EngineBusy(f"the server is at its limit of {self.max_requests} requests in flight")
            self._count += 1
            self._inbox.append(request)
            self._cond.notify()

    def _run(self) -> None:
        reading: list[_Running] = []
        waiting: deque[_Running] = deque()
        decoding: list[_Running] = []
        while True:
            with self._cond:
                while not (self._inbox or reading or waiting or decoding or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    for run in [*reading, *waiting, *decoding]:
                        self._finish(run, "cancelled", None)
                    while self._inbox:
                        self._finish_request(self._inbox.popleft(), "cancelled", None)
                    return
                new = list(self._inbox)
                self._inbox.clear()
            try:
                with torch.no_grad():
                    reading.extend(r for r in (self._admit(req) for req in new) if r is not None)
                    reading = self._prefill_turn(reading, waiting)
                    while waiting and len(decoding) < self.max_batch:
                        run = waiting.popleft()
                        if self.batched:
                            run.row = self.decoder.slots.add(run.cache, run.token, run.request.params,
                                                             run.generator, run.seen)
                            run.cache = run.generator = run.seen = None
                        decoding.append(run)
                    decoding = self._decode_turn(decoding)
            except Exception as e:  # a bug here must not leave requests hanging or stop the engine
                log.exception("engine turn failed")
                for run in [*reading, *waiting, *decoding]:
                    self._finish(run, f"error: {e}", None)
                reading, waiting, decoding = [], deque(), []
                self.decoder = self._new_decoder()

    def _admit(self, req: GenerationRequest) -> _Running | None:
        try:
            ids = torch.tensor(list(req.ids), dtype=torch.long, device=self.device)
            plan = req.prefix
            cache = req.cache if req.cache is not None else plan.cache if plan is not None else None
            cache = self.model.allocate_cache(1) if cache is None else cache
            read = 0 if req.cache is not None or plan is None or plan.cache is None else plan.start
            generator = None if req.params.greedy else make_generators(req.seed, 1, self.device)
            seen = None
            if req.params.repetition_penalty != 1.0:
                seen = torch.zeros(1, self.model.config.padded_vocab_size, dtype=torch.bool, device=self.device)
                seen[0, ids] = True
            # ``start_offset``: positions the cache held before ``ids`` (a session's), none for a snapshot.
            return _Running(req, ids, cache, generator, seen, start_offset=cache.seqlen_offset - read, read=read)
        except Exception as e:  # a bad request must not stop the engine
            log.exception("could not start a request")
            self._finish_request(req, f"error: {e}", None)
            return None

    def _prefill_turn(self, reading: list[_Running], waiting: deque[_Running]) -> list[_Running]:
        """Read this turn's share of the prompts (:func:`schedule_prefill`); those done sample their first
        token and wait for a row.

        Fresh prompts read together are left-padded as ``generate`` pads a batch (the padding is its own
        document, so each row computes what it computes alone); the others are read one chunk each.
        """
        live = []
        for run in reading:
            if run.request.cancelled.is_set():
                self._finish(run, "cancelled", None)
            else:
                live.append(run)
        turn = schedule_prefill([self._reading(run) for run in live], self.prefill_budget, self.prefill_chunk_size,
                                self.max_batch if self.batched else 1)
        for run in turn.ready:  # the whole prompt was read before: its logits were kept
            try:
                self._after_prompt(run, run.request.prefix.logits, waiting)
            except Exception as e:
                log.exception("sampling failed")
                self._finish(run, f"error: {e}", None)
        if turn.together:
            self._prefill_together(turn.together, waiting)
        for run, end in turn.chunks:
            try:
                plan = run.request.prefix
                out = self.model(run.ids[None, run.read:end], cache=run.cache, logits_to_keep=1)
                run.read = end
                if plan is not None and end < len(run.ids):
                    plan.snapshot(end, run.cache)
                if run.read == len(run.ids):
                    self._after_prompt(run, out.logits[:, -1], waiting)
            except Exception as e:
                log.exception("prefill failed")
                self._finish(run, f"error: {e}", None)
        return [r for r in live if not r.ended and r.read < len(r.ids)]

    def _reading(self, run: _Running) -> Reading[_Running]:
        plan = run.request.prefix
        # Chunks end at snapshot points, hit or not, so both read alike.
        stop = len(run.ids) if plan is None else min(len(run.ids), plan.next_stop(run.read))
        fresh = run.read == 0 and run.request.cache is None and (plan is None or not plan.points)
        return Reading(run, run.read, len(run.ids), stop, fresh)

    def _prefill_together(self, runs: list[_Running], waiting: deque[_Running]) -> None:
        """Read the whole prompts of ``runs`` (fresh states) in one left-padded batch."""
        try:
            length = max(len(r.ids) for r in runs)
            ids = runs[0].ids.new_zeros(len(runs), length)
            seq_idx = torch.zeros(len(runs), length, dtype=torch.int32, device=self.device)
            for i, r in enumerate(runs):
                ids[i, length - len(r.ids):] = r.ids
                seq_idx[i, length - len(r.ids):] = 1
            cache = self.model.allocate_cache(len(runs))
            logits = self.model(ids, seq_idx=seq_idx, cache=cache, logits_to_keep=1).logits[:, -1]
        except Exception as e:
            log.exception("prefill failed")
            for run in runs:
                self._finish(run, f"error: {e}", None)
            return
        for i, run in enumerate(runs):
            run.read = len(run.ids)
            run.cache = ModelCache([type(s)(**{n: t[i:i + 1].clone() for n, t in s.tensors().items()})
                                    for s in cache.states], len(run.ids))
            try:
                self._after_prompt(run, logits[i:i + 1], waiting)
            except Exception as e:
                log.exception("sampling failed")
                self._finish(run, f"error: {e}", None)

    def _after_prompt(self, run: _Running, logits: torch.Tensor, waiting: deque[_Running]) -> None:
        """The prompt is read: finish (nothing to generate, or the first token ends it) or wait for a row.

        The first token is sampled (and sent) before the prompt-end snapshot is taken: a snapshot never delays
        it. A batched request's cache is only copied into its row from here on, so the prefix cache takes it
        as it is (no copy); other caches go on changing (or go to a session) and are copied.
        """
        plan = run.request.prefix
        reason = "length" if run.request.max_new_tokens == 0 else self._sample(run, logits)
        if plan is not None:
            plan.snapshot(len(run.ids), run.cache, logits, owned=self.batched and reason is None)
            plan.release()
        if reason is not None:
            self._finish(run, reason, run.cache)
        else:
            waiting.append(run)

    def _decode_turn(self, decoding: list[_Running]) -> list[_Running]:
        """One decode step for every decoding request: one new token each."""
        live = []
        for run in decoding:
            if run.request.cancelled.is_set():
                self._leave(run, decoding, "cancelled")
            else:
                live.append(run)
        if not live:
            return []
        try:
            if self.batched:
                # Rows in use are 0..size-1, one per live request: the step's tokens come in row order.
                live.sort(key=lambda r: r.row)
                drawn = self.decoder.step().tolist()  # one device read per step
            else:
                tokens = torch.tensor([[run.token] for run in live], dtype=torch.long, device=self.device)
                drawn = torch.cat([self._draw(run, self.model(tokens[i:i + 1], cache=run.cache,
                                                              logits_to_keep=1).logits[:, -1])
                                   for i, run in enumerate(live)]).tolist()
        except Exception as e:
            log.exception("decode step failed")
            for run in live:
                self._leave(run, live, f"error: {e}")
            return []
        self.steps += 1
        still = []
        for run, token in zip(live, drawn):
            try:
                reason = self._record(run, token)
            except Exception as e:  # e.g. a failing on_token callback: only this request ends
                log.exception("sampling failed")
                reason = f"error: {e}"
            if reason is None:
                still.append(run)
            else:
                self._leave(run, live, reason)
        return still

    def _sample(self, run: _Running, logits: torch.Tensor) -> str | None:
        """Sample, report and record one token; the finish reason, or None to go on."""
        return self._record(run, int(self._draw(run, logits)[0]))

    def _draw(self, run: _Running, logits: torch.Tensor) -> torch.Tensor:
        """(1,) next token from (1, V) logits, picked as ``generate`` picks it (padded vocabulary excluded)."""
        logits = logits.clone()
        logits[:, self.model.config.vocab_size:] = -torch.inf
        return sample_next(logits, run.request.params, seen=run.seen, generators=run.generator)

    def _record(self, run: _Running, token: int) -> str | None:
        """Report and record a drawn token; the finish reason, or None to go on."""
        run.token = token
        run.produced += 1
        self.tokens += 1
        stop = run.request.on_token(token)
        if stop or token in run.request.eos_ids:
            return "stop"
        if run.produced >= run.request.max_new_tokens:
            return "length"
        if run.seen is not None:
            run.seen[0, token] = True
        return None

    def _leave(self, run: _Running, group: list[_Running], reason: str) -> None:
        """Finish a decoding request and free its row (renumbering the row that moves into it)."""
        if run.row < 0:
            self._finish(run, reason, run.cache)
            return
        slots = self.decoder.slots
        keep = run.request.keep_state and reason in ("stop", "length")
        last = slots.size - 1
        cache = slots.remove(run.row, keep)
        if cache is not None:
            # The slots keep no position count: the row has read its prompt and every token but the last.
            cache.seqlen_offset = run.start_offset + len(run.ids) + run.produced - 1
        if run.row != last:
            moved = next((r for r in group if r.row == last), None)
            if moved is not None:
                moved.row = run.row
        run.row = -1
        self._finish(run, reason, cache)

    def _finish(self, run: _Running, reason: str, cache: ModelCache | None) -> None:
        run.ended = True
        ok = run.request.keep_state and reason in ("stop", "length")
        self._finish_request(run.request, reason, cache if ok else None)

    def _finish_request(self, req: GenerationRequest, reason: str, cache: ModelCache | None) -> None:
        with self._cond:
            self._count -= 1
        if req.prefix is not None:
            req.prefix.release()
        try:
            req.on_done(reason, cache)
        except Exception:
            log.exception("on_done callback failed")
