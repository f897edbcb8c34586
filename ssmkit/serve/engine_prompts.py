"""How the engine reads its requests' prompts: admission, the prefill of a turn, the first tokens.

Part of :class:`ssmkit.serve.batching.Engine` (a mixin: it uses the engine's model, limits and
callbacks), kept apart so each file stays readable. A turn reads at most ``prefill_budget`` prompt
tokens (:func:`ssmkit.serve.prefill.schedule_prefill`): fresh prompts that fit in a chunk together in
one left-padded batch, the others a chunk each (ending at prefix-cache snapshot points); the prompts
finished in the turn draw their first tokens in one batch, each as ``generate`` draws it, read from the
device at once.

**Prompt-end snapshots off the critical path.** A request that goes on decoding hands its prompt-end state
to the prefix cache as it is (no copy), but storing it still costs the host a little per request (a
copy of its last logits, the eviction of an old snapshot, the cache's lock): done between sending one
request's first token and the next one's, it delayed the k-th first token of a turn by k stores, and
the turn's joining rows by all of them. So these snapshots are queued (:meth:`_store_snapshots`) and
stored in the next turns, each turn once its decode step is launched: while the device computes it,
within :data:`SNAPSHOT_TURN_S` of host time a turn (at least one snapshot a turn, and every snapshot
beyond ``max_batch`` queued, so the states waiting stay bounded), so a burst of new requests never holds
up the next step's launch. Without a step in flight (a CPU, a session in the batch) they are all stored
at once. A request's plan is released after its snapshot is stored, so a prompt waiting for it as its
leader then finds it. A state that goes on changing (a session's) or that a finished request hands back
is still copied at once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

import torch

from ssmkit.generation.sampling import (
    RowGenerators,
    RowSampling,
    make_generators,
    sample_rows,
)
from ssmkit.models.cache import ModelCache
from ssmkit.serve.prefill import Reading, schedule_prefill
from ssmkit.serve.slots import host_to_device

if TYPE_CHECKING:
    from ssmkit.models.language_model import LanguageModel
    from ssmkit.serve.prefix_plan import PrefixPlan
    from ssmkit.serve.request import GenerationRequest

log = logging.getLogger("ssmkit.serve")

# Host time a turn spends storing queued prompt-end snapshots while its decode step runs on the device
# (a decode step of a small model at batch 64 takes a few milliseconds on a GPU).
SNAPSHOT_TURN_S = 0.0005


@dataclasses.dataclass(eq=False)
class Running:
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
    queued: int = 0  # decode steps launched for this row whose tokens were not read yet
    ended: bool = False


class PromptReading:
    """The prompt-reading half of :class:`ssmkit.serve.batching.Engine`."""

    model: LanguageModel
    device: torch.device
    batched: bool
    max_batch: int
    prefill_budget: int
    prefill_chunk_size: int
    prefills: int
    prefill_rows: int
    _snapshots: deque[tuple[PrefixPlan, int, ModelCache, torch.Tensor]]

    def _admit(self, req: GenerationRequest) -> Running | None:
        try:
            ids = host_to_device(torch.tensor(list(req.ids), dtype=torch.long), self.device)
            plan = req.prefix
            # None: the zero state, allocated when read in chunks (a prompt read with others gets a row of theirs).
            cache = req.cache if req.cache is not None else plan.cache if plan is not None else None
            read = 0 if req.cache is not None or plan is None or plan.cache is None else plan.start
            # The stream's seed, checked here; it goes to the device with the first token's draw.
            generator = None if req.params.greedy else make_generators(req.seed, 1, torch.device("cpu"))
            seen = None
            if req.params.repetition_penalty != 1.0:
                seen = torch.zeros(1, self.model.config.padded_vocab_size, dtype=torch.bool, device=self.device)
                seen[0, ids] = True
            # ``start_offset``: positions the cache held before ``ids`` (a session's), none for a snapshot.
            offset = 0 if cache is None else cache.seqlen_offset - read
            return Running(req, ids, cache, generator, seen, start_offset=offset, read=read)
        except Exception as e:  # a bad request must not stop the engine
            log.exception("could not start a request")
            self._finish_request(req, f"error: {e}", None)
            return None

    def _prefill_turn(self, reading: list[Running], waiting: deque[Running]) -> list[Running]:
        """Read this turn's share of the prompts (:func:`schedule_prefill`); those done sample their first
        token (one device read for all of them) and wait for a row.

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
        # The whole prompt was read before: its logits were kept.
        done: list[tuple[Running, torch.Tensor]] = [(run, run.request.prefix.logits) for run in turn.ready]
        if turn.together:
            done += self._prefill_together(turn.together)
        for run, end in turn.chunks:
            try:
                plan = run.request.prefix
                if run.cache is None:
                    run.cache = self.model.allocate_cache(1)
                out = self.model(run.ids[None, run.read:end], cache=run.cache, logits_to_keep=1)
                self.prefills += 1
                self.prefill_rows += 1
                run.read = end
                if plan is not None and end < len(run.ids):
                    plan.snapshot(end, run.cache)
                if run.read == len(run.ids):
                    done.append((run, out.logits[:, -1]))
            except Exception as e:
                log.exception("prefill failed")
                self._finish(run, f"error: {e}", None)
        self._after_prompts(done, waiting)
        return [r for r in live if not r.ended and r.read < len(r.ids)]

    def _reading(self, run: Running) -> Reading[Running]:
        plan = run.request.prefix
        # Chunks end at snapshot points, hit or not, so both read alike.
        stop = len(run.ids) if plan is None else min(len(run.ids), plan.next_stop(run.read))
        fresh = run.read == 0 and run.request.cache is None and (plan is None or not plan.points)
        return Reading(run, run.read, len(run.ids), stop, fresh)

    def _prefill_together(self, runs: list[Running]) -> list[tuple[Running, torch.Tensor]]:
        """Read the whole prompts of ``runs`` (fresh states) in one left-padded batch; their last logits."""
        try:
            # Made on the host and copied at once; prompts of one length need no seq_idx (as in generate).
            length = max(len(r.ids) for r in runs)
            ids = torch.zeros(len(runs), length, dtype=torch.long)
            seq_idx = None if all(len(r.ids) == length for r in runs) else torch.zeros(len(runs), length,
                                                                                        dtype=torch.int32)
            for i, r in enumerate(runs):
                ids[i, length - len(r.ids):] = torch.as_tensor(list(r.request.ids))
                if seq_idx is not None:
                    seq_idx[i, length - len(r.ids):] = 1
            ids = host_to_device(ids, self.device)
            seq_idx = None if seq_idx is None else host_to_device(seq_idx, self.device)
            cache = self.model.allocate_cache(len(runs))
            logits = self.model(ids, seq_idx=seq_idx, cache=cache, logits_to_keep=1).logits[:, -1]
            self.prefills += 1
            self.prefill_rows += len(runs)
        except Exception as e:
            log.exception("prefill failed")
            for run in runs:
                self._finish(run, f"error: {e}", None)
            return []
        for i, run in enumerate(runs):
            run.read = len(run.ids)
            run.cache = ModelCache([type(s)(**{n: t[i:i + 1].clone() for n, t in s.tensors().items()})
                                    for s in cache.states], len(run.ids))
        return [(run, logits[i:i + 1]) for i, run in enumerate(runs)]

    def _after_prompts(self, done: list[tuple[Running, torch.Tensor]], waiting: deque[Running]) -> None:
        """The prompts of ``done`` are read (with their last logits, (1, V)): each finishes (nothing to
        generate, or the first token ends it) or waits for a row.

        The first tokens are drawn each as ``generate`` draws it, then read in one device read, and all are
        sent before any prompt-end snapshot is taken: a snapshot never delays one. A batched request that
        goes on decoding has its cache only copied into its row from here on, so the prefix cache takes it
        as it is (no copy), in the next turn (:meth:`_store_snapshots`); other caches go on changing (or go
        to a session) and are copied now.
        """
        sampled = [(run, logits) for run, logits in done if run.request.max_new_tokens > 0]
        try:
            tokens = iter(self._draw_first(sampled))
        except Exception as e:
            log.exception("sampling failed")
            for run, _ in sampled:
                self._finish(run, f"error: {e}", None)
            done = [(run, logits) for run, logits in done if not run.ended]
        reasons = []
        for run, _ in done:
            try:
                reasons.append("length" if run.request.max_new_tokens == 0 else self._record(run, next(tokens)))
            except Exception as e:  # e.g. a failing on_token callback: only this request ends
                log.exception("sampling failed")
                reasons.append(f"error: {e}")
        for (run, logits), reason in zip(done, reasons):
            plan = run.request.prefix
            if plan is not None:
                if self.batched and reason is None:
                    assert run.cache is not None
                    self._snapshots.append((plan, len(run.ids), run.cache, logits))
                else:
                    plan.snapshot(len(run.ids), run.cache, logits)
                    plan.release()
            if reason is not None:
                self._finish(run, reason, run.cache)
            else:
                waiting.append(run)

    def _store_snapshots(self, budget_s: float | None = None) -> None:
        """Store queued prompt-end snapshots (each state kept as it is: its request's row holds a copy) and
        release their plans: oldest first, all of them, or with ``budget_s`` those that fit in that host
        time (at least one, and all beyond ``max_batch`` queued); see the module docstring."""
        start = time.perf_counter()
        queued = self._snapshots
        while queued:
            self._store_snapshot(*queued.popleft())
            if budget_s is not None and len(queued) <= self.max_batch and time.perf_counter() - start >= budget_s:
                return

    def _store_queued_snapshot_of(self, plan: PrefixPlan) -> None:
        """Store ``plan``'s prompt-end snapshot now if it is still queued (its request is ending, and a plan is
        released only once its snapshot exists: prompts waiting on it as their leader would read it again)."""
        for i, entry in enumerate(self._snapshots):
            if entry[0] is plan:  # by identity: entries hold tensors, which == cannot compare
                del self._snapshots[i]
                self._store_snapshot(*entry)
                return

    @staticmethod
    def _store_snapshot(plan: PrefixPlan, position: int, cache: ModelCache, logits: torch.Tensor) -> None:
        try:
            plan.snapshot(position, cache, logits, owned=True)
        except Exception:  # a cache is an optimisation: its failure must not end requests
            log.exception("prefix cache: storing a snapshot failed")
        finally:
            plan.release()

    def _draw_first(self, sampled: list[tuple[Running, torch.Tensor]]) -> list[int]:
        """The first token of each request from its last prompt logits (1, V): drawn as ``generate`` draws
        it, every row with its own settings and stream (row-wise: as it would alone), all in one batch and
        one device read; each stream is then a view of the batch's (counters advanced)."""
        if not sampled:
            return []
        runs = [run for run, _ in sampled]
        logits = torch.cat([logits for _, logits in sampled])
        logits[:, self.model.config.vocab_size:] = -torch.inf
        rows = RowSampling.of([run.request.params for run in runs], self.device)
        seeds = torch.cat([torch.zeros(1, dtype=torch.long) if run.generator is None else run.generator.seeds
                           for run in runs])
        generators = RowGenerators(host_to_device(seeds, self.device)) if rows.kinds.sample else None
        seen = None
        if rows.kinds.penalty:
            none = torch.zeros(1, logits.shape[1], dtype=torch.bool, device=self.device)
            seen = torch.cat([none if run.seen is None else run.seen for run in runs])
        tokens = sample_rows(logits, rows, seen=seen, generators=generators).tolist()
        for i, run in enumerate(runs):
            if run.generator is not None:
                assert generators is not None
                run.generator = RowGenerators(generators.seeds[i:i + 1], generators.draws[i:i + 1])
        return tokens
