"""Continuous batching: one engine thread owns the model and decodes every running request together.

Each turn of the engine loop

1. admits newly submitted requests,
2. reads one prefill chunk (``prefill_chunk_size`` tokens) of every request still reading its prompt,
3. runs **one** forward step for all decoding requests at once, on a batched cache whose rows are the
   requests (:class:`SlotCache`), and
4. samples one token per request, each with its own :class:`SamplingParams` and seeded random stream.

A request that finishes leaves the batch at once (its row is refilled by the last row) and a new one
joins at the next turn, so the batch follows the load: throughput grows with concurrency.

Why a request decodes the same tokens in a batch as :func:`ssmkit.generation.generate` alone: sampling
is done per row with the request's own random stream, seeded as ``generate`` seeds row 0; a prompt is
read in the same chunks (or left-padded as ``generate`` pads a batch); and an SSM row's state never mixes
with other rows. Only the float rounding of batched matrix products can differ, orders of magnitude
below what moves a draw in practice.

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

from ssmkit.generation.sampling import SamplingParams, make_generators, sample_next
from ssmkit.models.cache import ModelCache
from ssmkit.serve.prefix_cache import PrefixPlan
from ssmkit.serve.slots import SlotCache

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
    generator: list[torch.Generator] | None
    seen: torch.Tensor | None
    start_offset: int = 0
    read: int = 0
    produced: int = 0
    token: int = -1
    row: int = -1


class Engine:
    """The thread that runs the model for every request (see the module docstring).

    Example::

        engine = Engine(model, max_batch=64)
        engine.start()
        engine.submit(GenerationRequest(ids=[257, 104, 105], max_new_tokens=8, params=SamplingParams(),
                                        seed=0, on_token=lambda t: False, on_done=print))
    """

    def __init__(self, model: LanguageModel, *, max_batch: int = 64, max_requests: int = 256,
                 prefill_chunk_size: int = 2048) -> None:
        if max_batch < 1 or max_requests < 1 or prefill_chunk_size < 1:
            raise ValueError("max_batch, max_requests and prefill_chunk_size must be positive")
        self.model = model
        self.max_batch = max_batch
        self.max_requests = max_requests
        self.prefill_chunk_size = prefill_chunk_size
        self.device = model.embedding.weight.device
        # A fixed-size cache (SSM and sliding-window layers) can be batched row by row.
        self.batched = model.cache_nbytes(1) == model.cache_nbytes(1 << 20)
        self._cond = threading.Condition()
        self._inbox: deque[GenerationRequest] = deque()
        self._count = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.tokens = 0

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
        slots = SlotCache()
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
                            run.row = slots.add(run.cache)
                            run.cache = None
                        decoding.append(run)
                    decoding = self._decode_turn(decoding, slots)
            except Exception as e:  # a bug here must not leave requests hanging or stop the engine
                log.exception("engine turn failed")
                for run in [*reading, *waiting, *decoding]:
                    self._finish(run, f"error: {e}", None)
                reading, waiting, decoding, slots = [], deque(), [], SlotCache()

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
        """Read one chunk of every reading request; those done sample their first token and wait for a row.

        New requests whose whole prompt fits in one chunk and that start from the zero state are read
        together, left-padded as ``generate`` pads a batch (the padding is its own document, so each row
        computes what it computes alone); the others are read one by one.
        """
        live = []
        for run in reading:
            if run.request.cancelled.is_set():
                self._finish(run, "cancelled", None)
            else:
                live.append(run)
        short = [r for r in live if r.read == 0 and r.request.cache is None and len(r.ids) <= self.prefill_chunk_size
                 and (r.request.prefix is None or not r.request.prefix.points)]
        if self.batched and len(short) > 1:
            for i in range(0, len(short), self.max_batch):
                self._prefill_together(short[i:i + self.max_batch], waiting)
            live = [r for r in live if r not in short]
        still = []
        for run in live:
            try:
                plan = run.request.prefix
                if plan is not None and plan.logits is not None and run.read == len(run.ids):
                    self._after_prompt(run, plan.logits, waiting)  # the whole prompt was read before
                    continue
                end = min(run.read + self.prefill_chunk_size, len(run.ids))
                if plan is not None:  # chunks end at snapshot points, hit or not, so both read alike
                    end = min(end, plan.next_stop(run.read))
                out = self.model(run.ids[None, run.read:end], cache=run.cache, logits_to_keep=1)
                run.read = end
                if plan is not None and end < len(run.ids):
                    plan.snapshot(end, run.cache)
                if run.read < len(run.ids):
                    still.append(run)
                else:
                    self._after_prompt(run, out.logits[:, -1], waiting)
            except Exception as e:
                log.exception("prefill failed")
                self._finish(run, f"error: {e}", None)
        return still

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

    def _decode_turn(self, decoding: list[_Running], slots: SlotCache) -> list[_Running]:
        """One forward step for every decoding request, then one sampled token each."""
        live = []
        for run in decoding:
            if run.request.cancelled.is_set():
                self._leave(run, decoding, slots, "cancelled")
            else:
                live.append(run)
        if not live:
            return []
        if self.batched:
            # Rows in use are 0..size-1, one per live request: feed the tokens in row order.
            live.sort(key=lambda r: r.row)
        tokens = torch.tensor([[run.token] for run in live], dtype=torch.long, device=self.device)
        try:
            if self.batched:
                view = slots.view()
                logits = self.model(tokens, cache=view, logits_to_keep=1).logits[:, -1]
                slots.write_back(view)
                row_logits = list(logits.split(1))
            else:
                row_logits = [self.model(tokens[i:i + 1], cache=run.cache, logits_to_keep=1).logits[:, -1]
                              for i, run in enumerate(live)]
        except Exception as e:
            log.exception("decode step failed")
            for run in live:
                self._leave(run, live, slots, f"error: {e}")
            return []
        self.steps += 1
        # Draw every row on the device, then read all the tokens back at once (one sync per step on a GPU).
        drawn = torch.cat([self._draw(run, lg) for run, lg in zip(live, row_logits)]).tolist()
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
                self._leave(run, live, slots, reason)
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

    def _leave(self, run: _Running, group: list[_Running], slots: SlotCache, reason: str) -> None:
        """Finish a decoding request and free its row (renumbering the row that moves into it)."""
        if run.row < 0:
            self._finish(run, reason, run.cache)
            return
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
