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

**Overlap** (on a GPU). A turn *launches* its decode step first and only then reads the tokens of the
previous turn's step (calls back, lets finished requests leave), admits and prefills: the host's work of
a turn runs while the device computes the step, and the host waits on the device once per step (for a
step already done). A request that ends at step k has had step k+1 computed for its row too; that token
is dropped, and the row is freed or refilled behind it in the stream. A batch with a request that keeps
its state (a session) is stepped without overlap: its state must end right after its last token was
read. Each turn reads the first tokens of the prompts it finished in one device read as well.

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

import logging
import threading
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ssmkit.generation.sampling import (
    SamplingKinds,
    SamplingParams,
    sample_next,
)
from ssmkit.models.cache import ModelCache
from ssmkit.serve.decode_step import BatchedDecoder, LaunchedStep, use_cuda_graph
from ssmkit.serve.engine_prompts import SNAPSHOT_TURN_S, PromptReading, Running
from ssmkit.serve.request import GenerationRequest

if TYPE_CHECKING:
    from ssmkit.models.language_model import LanguageModel

log = logging.getLogger("ssmkit.serve")

_GREEDY, _SAMPLED = SamplingParams(temperature=0), SamplingParams(temperature=1.0)
# Graphs captured when the engine starts: batches of greedy rows, of sampled rows with no filter, and of both.
CAPTURE_AT_START = (SamplingKinds.of([_GREEDY]), SamplingKinds.of([_SAMPLED]), SamplingKinds.of([_GREEDY, _SAMPLED]))


class EngineBusy(RuntimeError):
    """The engine already holds its maximum number of requests."""


class EngineStopped(RuntimeError):
    """The engine is not running (stopped, or its thread died)."""


class Engine(PromptReading):
    """The thread that runs the model for every request (see the module docstring).

    Example::

        engine = Engine(model, max_batch=64)
        engine.start()
        engine.submit(GenerationRequest(ids=[257, 104, 105], max_new_tokens=8, params=SamplingParams(),
                                        seed=0, on_token=lambda t: False, on_done=print))
    """

    def __init__(self, model: LanguageModel, *, max_batch: int = 64, max_requests: int = 256,
                 prefill_chunk_size: int = 2048, prefill_budget: int | None = None,
                 cuda_graph: bool | None = None, overlap: bool | None = None) -> None:
        """``prefill_budget``: prompt tokens read per turn (default twice ``prefill_chunk_size``: the oldest
        prompt's chunk and as much for the others); ``cuda_graph``: replay the decode step from CUDA graphs
        (None: on when the model is on CUDA and its step can be captured; True: required); ``overlap``:
        launch each decode step before reading the previous one's tokens (see the module docstring; None:
        on a GPU, where the host works meanwhile; on a CPU the step is computed at launch, so it would only
        add a step per request)."""
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
        self.overlap = self.batched and (self.device.type == "cuda" if overlap is None else overlap)
        self.decoder = self._new_decoder()
        self._inflight: tuple[list[Running], LaunchedStep] | None = None
        self._cond = threading.Condition()
        self._inbox: deque[GenerationRequest] = deque()
        self._count = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.tokens = 0
        self.prefills = 0  # prefill forwards (a left-padded batch or one request's chunk)
        self.prefill_rows = 0  # requests read by them, summed
        self._snapshots = deque()  # prompt-end snapshots to store after the next steps' launches (engine_prompts)

    def _new_decoder(self) -> BatchedDecoder:
        return BatchedDecoder(self.model, self.max_batch, cuda_graph=self.cuda_graph)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        return self._count

    def start(self, capture: Sequence[SamplingKinds] = CAPTURE_AT_START) -> None:
        """Start the engine thread; with CUDA graphs, first capture every bucket's graph for each of the
        sampling ``capture`` kinds (other combinations are captured at first use)."""
        if self.alive:
            raise RuntimeError("the engine is already running")
        if self.cuda_graph and capture:
            with torch.no_grad():
                self.decoder.slots.add(self.model.allocate_cache(1))  # a template row for the captures
                try:
                    self.decoder.capture(capture)
                finally:
                    self.decoder.slots.remove(0, keep=False)
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
        reading: list[Running] = []
        waiting: deque[Running] = deque()
        decoding: list[Running] = []
        while True:
            with self._cond:
                while not (self._inbox or reading or waiting or decoding or self._snapshots or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    self._inflight = None
                    self._store_snapshots()
                    for run in [*reading, *waiting, *decoding]:
                        self._finish(run, "cancelled", None)
                    while self._inbox:
                        self._finish_request(self._inbox.popleft(), "cancelled", None)
                    return
                new = list(self._inbox)
                self._inbox.clear()
            try:
                with torch.no_grad():
                    # The step first: on a GPU it runs while the rest of the turn is done on the host.
                    decoding = self._decode_turn(decoding)
                    reading.extend(r for r in (self._admit(req) for req in new) if r is not None)
                    reading = self._prefill_turn(reading, waiting)
                    joining = [waiting.popleft() for _ in range(min(len(waiting), self.max_batch - len(decoding)))]
                    if self.batched:
                        rows = self.decoder.slots.add_many([(run.cache, run.token, run.request.params, run.generator,
                                                             run.seen) for run in joining])
                        for run, row in zip(joining, rows):
                            run.row = row
                            run.cache = run.generator = run.seen = None
                    decoding.extend(joining)
            except Exception as e:  # a bug here must not leave requests hanging or stop the engine
                log.exception("engine turn failed")
                for run in [*reading, *waiting, *decoding]:
                    if not run.ended:
                        self._finish(run, f"error: {e}", None)
                reading, waiting, decoding = [], deque(), []
                self.decoder = self._new_decoder()
                self._inflight = None
                for plan, *_ in self._snapshots:
                    plan.release()
                self._snapshots.clear()

    def _decode_turn(self, decoding: list[Running]) -> list[Running]:
        """One decode step for every decoding request: launch this turn's step, then read the previous
        one's tokens (see "Overlap" in the module docstring); returns the requests still decoding."""
        live = []
        for run in decoding:
            if run.request.cancelled.is_set():
                self._leave(run, decoding, "cancelled")
            else:
                live.append(run)
        pending, self._inflight = self._inflight, None
        if not self.batched:
            return self._decode_each(live)
        try:
            if pending is not None and not (self.overlap and not any(r.request.keep_state for r in live)):
                live, pending = self._read_step(pending, live), None
            # Rows that end when the pending step is read need no further step.
            if any(r.produced + r.queued < r.request.max_new_tokens for r in live):
                # Rows in use are 0..size-1, one per live request: the step's tokens come in row order.
                live.sort(key=lambda r: r.row)
                self._inflight = (list(live), self.decoder.launch())
                self.steps += 1
                for run in live:
                    run.queued += 1
                if not self.overlap or any(r.request.keep_state for r in live):
                    pending, self._inflight = self._inflight, None
            # Queued prompt-end snapshots: while the device computes the step just launched (within a budget
            # when it is read next turn), and before a request could end (releasing its plan).
            self._store_snapshots(SNAPSHOT_TURN_S if self._inflight is not None else None)
            if pending is not None:
                live = self._read_step(pending, live)
        except Exception as e:  # the rows' state is unknown: every decoding request ends, the slots start anew
            log.exception("decode step failed")
            self._inflight = None
            for run in decoding:
                if not run.ended:
                    run.row = -1
                    self._finish(run, f"error: {e}", None)
            self.decoder = self._new_decoder()
            return []
        return live

    def _read_step(self, launched: tuple[list[Running], LaunchedStep], group: list[Running]) -> list[Running]:
        """Read a launched step's tokens (the one device read of a step) and record them; requests that end
        leave the batch. ``group``: every request with a row; returns those still decoding."""
        runs, step = launched
        ending: list[tuple[Running, str]] = []
        for run, token in zip(runs, step.tokens()):
            run.queued -= 1
            if run.ended:  # ended at the step before (or cancelled): this token is dropped
                continue
            try:
                reason = self._record(run, token)
            except Exception as e:  # e.g. a failing on_token callback: only this request ends
                log.exception("sampling failed")
                reason = f"error: {e}"
            if reason is not None:
                ending.append((run, reason))
        if ending:
            self._leave_many(ending, group)
        return [r for r in group if not r.ended]

    def _decode_each(self, live: list[Running]) -> list[Running]:
        """A decode step for models whose caches cannot be batched: one forward per request."""
        if not live:
            return []
        try:
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

    def _draw(self, run: Running, logits: torch.Tensor) -> torch.Tensor:
        """(1,) next token from (1, V) logits, picked as ``generate`` picks it (padded vocabulary excluded)."""
        logits = logits.clone()
        logits[:, self.model.config.vocab_size:] = -torch.inf
        return sample_next(logits, run.request.params, seen=run.seen, generators=run.generator)

    def _record(self, run: Running, token: int) -> str | None:
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

    def _leave(self, run: Running, group: list[Running], reason: str) -> None:
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

    def _leave_many(self, ending: list[tuple[Running, str]], group: list[Running]) -> None:
        """:meth:`_leave` for several requests of one step at once (their rows freed together)."""
        keep = [run.request.keep_state and reason in ("stop", "length") for run, reason in ending]
        caches, moved = self.decoder.slots.remove_many([run.row for run, _ in ending], keep)
        by_row = {r.row: r for r in group if r.row in moved and not r.ended}
        for old, new in moved.items():
            by_row[old].row = new
        for (run, reason), cache in zip(ending, caches):
            if cache is not None:
                cache.seqlen_offset = run.start_offset + len(run.ids) + run.produced - 1
            run.row = -1
            self._finish(run, reason, cache)

    def _finish(self, run: Running, reason: str, cache: ModelCache | None) -> None:
        run.ended = True
        ok = run.request.keep_state and reason in ("stop", "length")
        self._finish_request(run.request, reason, cache if ok else None)

    def _finish_request(self, req: GenerationRequest, reason: str, cache: ModelCache | None) -> None:
        with self._cond:
            self._count -= 1
        if req.prefix is not None:
            self._store_queued_snapshot_of(req.prefix)
            req.prefix.release()
        try:
            req.on_done(reason, cache)
        except Exception:
            log.exception("on_done callback failed")
