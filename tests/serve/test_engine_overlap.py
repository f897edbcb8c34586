"""What the engine's turn costs: one device read per decode step, one per prefill turn, and no extra state
copy or device read for the prefix cache on prompts that share nothing (where it cannot help)."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch

from ssmkit.generation import generate
from ssmkit.generation.sampling import SamplingParams
from ssmkit.models import LanguageModel
from ssmkit.models.cache import ModelCache
from ssmkit.serve.batching import Engine, GenerationRequest
from ssmkit.serve.decode_step import LaunchedStep
from ssmkit.serve.prefix_cache import PrefixCache

from .conftest import tiny_model

READS = ("tolist", "item", "__int__", "__bool__", "__float__")  # every way a tensor's value reaches the host


@pytest.fixture(scope="module")
def model():
    return tiny_model()


class EngineThreadCounts:
    """Counts, on the engine thread only, device reads, tensor copies (and their bytes), state clones and
    reads of launched steps."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: Counter[str] = Counter()
        for name in READS:
            self._wrap(monkeypatch, torch.Tensor, name, "reads")
        self._wrap(monkeypatch, torch.Tensor, "clone", "copies", nbytes=True)
        self._wrap(monkeypatch, torch.Tensor, "copy_", "copies", nbytes=True)
        self._wrap(monkeypatch, ModelCache, "clone", "state_clones")
        self._wrap(monkeypatch, LaunchedStep, "tokens", "step_reads")
        self._wrap(monkeypatch, LanguageModel, "forward", "forwards")

    def _wrap(self, monkeypatch, owner, name: str, key: str, nbytes: bool = False) -> None:
        original = getattr(owner, name)
        counts = self.counts

        def wrapper(self, *args, **kwargs):
            if threading.current_thread().name == "ssmkit-engine":
                counts[key] += 1
                if nbytes:
                    counts[key + "_bytes"] += self.nbytes
            return original(self, *args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)


def run_batch(engine: Engine, prompts: list[list[int]], n_new: int, prefix: PrefixCache | None) -> list[list[int]]:
    """Submit every prompt in one engine turn (the engine waits on its lock meanwhile): same turns each run."""
    results: list[list[int]] = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]
    with engine._cond:  # re-entrant: submit takes it too
        for i, p in enumerate(prompts):
            engine.submit(GenerationRequest(
                ids=p, max_new_tokens=n_new, params=SamplingParams(temperature=1.0), seed=i,
                on_token=lambda t, i=i: results[i].append(t) is not None,
                on_done=lambda reason, cache, i=i: done[i].set(),
                prefix=None if prefix is None else prefix.plan(p)))
    assert all(d.wait(60) for d in done)
    return results


def test_one_device_read_per_step_and_per_prefill_turn(model, monkeypatch):
    # All read in one turn; overlapped as on a GPU (on a CPU the step is computed at launch).
    engine = Engine(model, max_batch=8, prefill_chunk_size=64, prefill_budget=1024, overlap=True)
    engine.start()
    try:
        counts = EngineThreadCounts(monkeypatch).counts
        prompts = [[257, 10 + i, *range(20, 20 + 5 * i)] for i in range(6)]
        results = run_batch(engine, prompts, 9, None)
    finally:
        engine.stop()
    for i, p in enumerate(prompts):
        assert results[i] == generate(model, [p], 9, temperature=1.0, seed=i)[0]
    # Lock step: the first tokens come from the prefill, 8 steps follow, and no step is launched past them.
    assert engine.steps == engine.decoder.steps == 8
    assert counts["step_reads"] == 8
    # One read for the first tokens of the six prompts (read in one turn, together), one per step, and the
    # model's own input checks of that one prefill forward.
    assert counts["reads"] == counts["step_reads"] + 1 + _forward_reads(model, monkeypatch)


def _forward_reads(model, monkeypatch) -> int:
    """Host reads made by one prefill forward of a batch (its input checks), counted on this thread."""
    seen = Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, **kwargs):
            seen["reads"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    with torch.no_grad():
        ids = torch.ones(2, 5, dtype=torch.long)
        model(ids, seq_idx=torch.ones(2, 5, dtype=torch.int32), cache=model.allocate_cache(2), logits_to_keep=1)
    return seen["reads"]


@pytest.mark.parametrize("length", [72, 700])
def test_the_prefix_cache_adds_no_forward_state_copy_or_device_read_without_shared_prefixes(model, monkeypatch,
                                                                                             length):
    """Prompts that share no block, shorter than a prefill chunk (700: past the interval that was the
    default, 512): with the cache on (default interval), the engine runs the same forwards, makes the same
    device reads and copies the same states as with it off; only each prompt's last logits (1, V) are
    copied for its snapshot."""
    prompts = [[257, 30 + i, *[(40 + i + k) % 250 for k in range(length - 2)]] for i in range(5)]
    engine = Engine(model, max_batch=8, prefill_budget=8192, overlap=True)  # the default prefill chunk
    engine.start()
    try:
        # Once untimed: first use builds what every later step reuses (the CPU step's lean decoder), and
        # the counts below compare steady states, whatever ran before this test.
        run_batch(engine, prompts, 6, None)
        counted = {}
        for mode in ("off", "on"):
            counts = EngineThreadCounts(monkeypatch).counts
            prefix = PrefixCache(model, memory_budget=1 << 30) if mode == "on" else None
            prefills, rows = engine.prefills, engine.prefill_rows
            results = run_batch(engine, prompts, 6, prefix)
            counts.update(prefills=engine.prefills - prefills, prefill_rows=engine.prefill_rows - rows)
            counted[mode] = (dict(counts), results, prefix)
            monkeypatch.undo()
    finally:
        engine.stop()
    (off, off_tokens, _), (on, on_tokens, prefix) = counted["off"], counted["on"]
    assert on_tokens == off_tokens
    assert prefix.stats()["snapshots"] == len(prompts) and prefix.stats()["hits"] == 0
    assert on["forwards"] == off["forwards"] == 1  # all five prompts read together
    assert on["reads"] == off["reads"] and on["step_reads"] == off["step_reads"]
    assert on.get("state_clones", 0) == off.get("state_clones", 0) == 0
    logits_bytes = model.config.padded_vocab_size * 4
    assert on["copies"] - off["copies"] == len(prompts)
    assert on["copies_bytes"] - off["copies_bytes"] == len(prompts) * logits_bytes
    assert (on["prefills"], on["prefill_rows"]) == (off["prefills"], off["prefill_rows"]) == (1, len(prompts))


def test_prompt_end_snapshots_are_stored_after_every_first_token_and_the_next_step_launch(model, monkeypatch):
    """A snapshot stored between two requests' first tokens delayed the later one (and the rows joining);
    the prompt-end snapshots of a turn are stored once all its first tokens are sent and the decode step of
    its rows is launched, then their plans are released (a prompt waiting for one finds its snapshot)."""
    events: list[str] = []
    for owner, name in ((PrefixCache, "store"), (LaunchedStep, "tokens")):
        original = getattr(owner, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            events.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)
    engine = Engine(model, max_batch=8, prefill_budget=8192, overlap=True)
    launch = engine.decoder.launch
    engine.decoder.launch = lambda: (events.append("launch"), launch())[1]
    prefix = PrefixCache(model, memory_budget=1 << 30)
    prompts = [[257, 60 + i, *range(70, 90 + 3 * i)] for i in range(4)]
    plans = [prefix.plan(p) for p in prompts]
    released = []
    engine.start()
    try:
        results: list[list[int]] = [[] for _ in prompts]
        done = [threading.Event() for _ in prompts]

        def on_token(i: int, t: int) -> bool:
            if not results[i]:
                events.append("first")
            results[i].append(t)
            return False

        def on_done(i: int) -> None:
            released.append(plans[i].released)
            done[i].set()

        with engine._cond:  # one turn reads them all
            for i, p in enumerate(prompts):
                engine.submit(GenerationRequest(ids=p, max_new_tokens=4, params=SamplingParams(temperature=1.0),
                                                seed=i, on_token=lambda t, i=i: on_token(i, t),
                                                on_done=lambda reason, cache, i=i: on_done(i), prefix=plans[i]))
        assert all(d.wait(60) for d in done)
    finally:
        engine.stop()
    for i, p in enumerate(prompts):
        assert results[i] == generate(model, [p], 4, temperature=1.0, seed=i)[0]
    first_store = events.index("store")
    assert events[:len(prompts)] == ["first"] * len(prompts)  # every first token before any store
    assert "launch" in events[len(prompts):first_store]  # the joined rows' first step launched before
    assert events.count("store") == len(prompts) and "tokens" not in events[:first_store]
    assert released == [True] * len(prompts)
    # Each prompt is now found whole, with its logits: its first token needs no forward.
    for p, plan in zip(prompts, (prefix.plan(p) for p in prompts)):
        assert plan.start == len(p) and plan.logits is not None
        plan.release()


@pytest.mark.parametrize(("max_batch", "per_turn"), [(8, [1] * 6), (2, [4, 1, 1])])
def test_queued_snapshots_are_stored_a_few_a_turn_and_at_most_max_batch_wait(model, monkeypatch, max_batch, per_turn):
    """With no host time to spare a turn (budget 0), each turn with a step in flight stores one queued
    snapshot, and every one beyond ``max_batch`` at once; all are stored, the tokens unchanged."""
    monkeypatch.setattr("ssmkit.serve.batching.SNAPSHOT_TURN_S", 0.0)
    events: list[str] = []
    store = PrefixCache.store
    monkeypatch.setattr(PrefixCache, "store", lambda self, *a, **k: (events.append("store"), store(self, *a, **k))[1])
    engine = Engine(model, max_batch=max_batch, prefill_budget=8192, overlap=True)
    launch = engine.decoder.launch
    engine.decoder.launch = lambda: (events.append("launch"), launch())[1]
    prefix = PrefixCache(model, memory_budget=1 << 30)
    prompts = [[257, 90 + i, *range(100, 110 + 2 * i)] for i in range(6)]
    engine.start()
    try:
        results = run_batch(engine, prompts, 12, prefix)
    finally:
        engine.stop()
    for i, p in enumerate(prompts):
        assert results[i] == generate(model, [p], 12, temperature=1.0, seed=i)[0]
    turns = "".join("L" if e == "launch" else "s" for e in events).split("L")[1:]
    assert [len(t) for t in turns if t] == per_turn
    assert prefix.stats()["snapshots"] == len(prompts) and not engine._snapshots


def test_a_request_ending_with_its_snapshot_queued_stores_it_before_its_plan_is_released(model, monkeypatch):
    """Short requests end while their prompt-end snapshots wait in the queue (no host time to spare a turn,
    a long request keeping steps in flight): each snapshot is stored before its plan is released, so when a
    request is done its whole prompt is found (a prompt waiting on it as its leader would otherwise read it
    again)."""
    monkeypatch.setattr("ssmkit.serve.batching.SNAPSHOT_TURN_S", 0.0)
    engine = Engine(model, max_batch=8, prefill_budget=8192, overlap=True)
    prefix = PrefixCache(model, memory_budget=1 << 30)
    prompts = [[257, 90 + i, *range(100, 110 + 2 * i)] for i in range(6)]
    found: dict[int, int] = {}
    done = [threading.Event() for _ in prompts]
    long_done = threading.Event()

    def on_done(i):
        def record(reason, cache):
            plan = prefix.plan(prompts[i])
            found[i] = plan.start
            plan.release()
            done[i].set()
        return record

    engine.start()
    try:
        engine.submit(GenerationRequest(ids=[257, 5, 6], max_new_tokens=10**6, params=SamplingParams(temperature=1.0),
                                        seed=99, on_token=lambda t: False, on_done=lambda r, c: long_done.set()))
        while engine.steps < 2:  # the long request decodes: a step is in flight every turn from now on
            threading.Event().wait(0.005)
        with engine._cond:  # all six arrive in one turn
            for i, p in enumerate(prompts):
                engine.submit(GenerationRequest(ids=p, max_new_tokens=2, params=SamplingParams(temperature=1.0),
                                                seed=i, on_token=lambda t: False, on_done=on_done(i),
                                                prefix=prefix.plan(p)))
        assert all(d.wait(60) for d in done)
        assert not long_done.is_set()  # the short ones ended with steps still in flight
    finally:
        engine.stop()
    assert found == {i: len(p) for i, p in enumerate(prompts)}


def test_a_failing_step_ends_the_decoding_requests_once_and_the_engine_goes_on(model):
    engine = Engine(model, max_batch=4, prefill_chunk_size=64, overlap=True)
    launch = engine.decoder.launch
    calls = [0]

    def failing():
        calls[0] += 1
        if calls[0] == 3:  # after two steps, with one in flight
            raise RuntimeError("device lost")
        return launch()

    engine.decoder.launch = failing
    engine.start()
    done: dict[int, list[str]] = {0: [], 1: []}
    events = [threading.Event(), threading.Event()]
    try:
        with engine._cond:  # both in the first turn
            for i in range(2):
                engine.submit(GenerationRequest(
                    ids=[257, 5 + i], max_new_tokens=20, params=SamplingParams(temperature=0), seed=i,
                    on_token=lambda t: False,
                    on_done=lambda reason, cache, i=i: (done[i].append(reason), events[i].set())))
        assert all(e.wait(60) for e in events)
        assert [len(v) for v in done.values()] == [1, 1] and all("device lost" in v[0] for v in done.values())
        assert run_batch(engine, [[257, 9, 9]], 5, None)[0] == generate(model, [[257, 9, 9]], 5, temperature=1.0, seed=0)[0]
    finally:
        engine.stop()
    assert engine.in_flight == 0
