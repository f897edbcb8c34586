"""The prefix-state cache in-process: exact tokens resumed from any token, LRU budgets, the disk tier."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch

from ssmkit.generation import generate
from ssmkit.models import LanguageModel, get_preset
from ssmkit.serve.batching import Engine
from ssmkit.serve.prefix_cache import BLOCK_TOKENS, PrefixCache
from ssmkit.serve.prefix_disk import DiskTier

from .conftest import tiny_model
from .test_batching import Collector
from .test_batching import submit as submit_plain


def submit(engine: Engine, prefix: PrefixCache | None, ids, n, sampling, seed=0, eos=(258,)) -> Collector:
    c = submit_plain(engine, ids, n, sampling, seed=seed, eos=eos) if prefix is None else None
    if c is None:
        from ssmkit.generation.sampling import SamplingParams
        from ssmkit.serve.batching import GenerationRequest

        c = Collector()
        c.plan = prefix.plan(ids)
        c.request = GenerationRequest(ids=ids, max_new_tokens=n, params=SamplingParams(**sampling), seed=seed,
                                      on_token=c.on_token, on_done=c.on_done, eos_ids=eos, prefix=c.plan)
        engine.submit(c.request)
    assert c.done.wait(120), "the engine did not finish"
    assert not c.reason.startswith("error"), c.reason
    return c


def hybrid_model() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(get_preset("jamba-tiny")).eval()  # full attention: its KV is part of each snapshot


def window_model() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(get_preset("samba-tiny")).eval()  # sliding-window attention (a fixed-size ring)


@pytest.mark.parametrize("make", [tiny_model, hybrid_model, window_model], ids=["bytes-mamba2", "jamba", "samba"])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "top_p": 0.9}], ids=["greedy", "seeded"])
def test_resumed_requests_sample_the_tokens_of_a_cold_run(make, sampling):
    model = make()
    vocab = model.config.vocab_size
    rng = random.Random(1)
    doc = [rng.randrange(vocab - 3) for _ in range(203)]  # neither a block nor an interval multiple
    questions = [[rng.randrange(vocab - 3) for _ in range(n)] for n in (5, 1, 17)]
    prefix = PrefixCache(model, memory_budget=1 << 30, interval=48)
    engine = Engine(model, max_batch=4, max_requests=8, prefill_chunk_size=64)
    engine.start()
    try:
        # The document alone (as a session reads it): its end is snapshotted at token 203.
        submit(engine, prefix, doc, 0, {"temperature": 0})
        for i, q in enumerate(questions):
            ids = doc + q
            warm = submit(engine, prefix, ids, 12, sampling, seed=10 + i, eos=())
            assert warm.plan.start == len(doc), "the hit lands on the document's last token"
            cold = generate(model, [ids], 12, seed=10 + i, **sampling)[0]
            assert warm.tokens == cold
        # The same prompt again resumes at its very end: the snapshot kept the logits after its last token.
        again = submit(engine, prefix, doc + questions[2], 12, sampling, seed=12, eos=())
        assert again.plan.start == len(doc) + len(questions[2]) and again.plan.logits is not None
        assert again.tokens == generate(model, [doc + questions[2]], 12, seed=12, **sampling)[0]
        # Another document sharing 100 tokens resumes from the deepest interval snapshot below 100.
        other = doc[:100] + [1, 2, 3]
        hit = submit(engine, prefix, other, 6, sampling, seed=3, eos=())
        assert hit.plan.start == 96
        assert hit.tokens == generate(model, [other], 6, seed=3, **sampling)[0]
    finally:
        engine.stop()
    stats = prefix.stats()
    assert stats["hits"] == 5 and stats["misses"] == 1
    assert stats["tokens_saved"] == 4 * 203 + 17 + 96


def test_a_tail_that_differs_in_its_last_token_is_no_hit():
    model = tiny_model()
    prefix = PrefixCache(model, memory_budget=1 << 30, interval=10**6)
    ids = list(range(1, 2 * BLOCK_TOKENS + 7))
    prefix.store(prefix.plan(ids).keys, len(ids), _state(model, 0, len(ids)))
    changed = ids[:-1] + [99, 5]
    assert prefix.plan(changed).start == 0  # same blocks, tail differs in its last token: the full blocks have no snapshot
    assert prefix.plan(ids + [5]).start == len(ids)
    assert prefix.plan(ids[:-1]).start == 0  # shorter than the snapshot
    assert prefix.plan(ids).start == 0  # the whole prompt, but no logits were kept with it
    prefix.store(prefix.plan(ids).keys, len(ids), _state(model, 0, len(ids)), torch.ones(1, 8))
    whole = prefix.plan(ids)
    assert whole.start == len(ids) and torch.equal(whole.logits, torch.ones(1, 8))


def _state(model: LanguageModel, value: float, position: int):
    cache = model.allocate_cache(1)
    cache.seqlen_offset = position
    for s in cache.states:
        for t in s.tensors().values():
            t.fill_(value)
    return cache


def _first(cache) -> float:
    return float(next(iter(cache.states[0].tensors().values())).flatten()[0])


def test_memory_budget_evicts_the_least_recently_used():
    model = tiny_model()
    size = model.cache_nbytes(1)
    prefix = PrefixCache(model, memory_budget=int(2.5 * size), interval=10**6)
    prompts = [[257, k, *range(40)] for k in range(4)]
    for k in range(3):
        prefix.store(prefix.plan(prompts[k]).keys, len(prompts[k]), _state(model, k, len(prompts[k])))
    stats = prefix.stats()
    assert stats["entries_in_memory"] == 2 and stats["evictions"] == 1 and stats["memory_bytes"] <= 2.5 * size
    assert prefix.plan(prompts[0] + [1]).start == 0  # evicted
    assert prefix.plan(prompts[1] + [1]).start == len(prompts[1])  # used: now the most recent
    prefix.store(prefix.plan(prompts[3]).keys, len(prompts[3]), _state(model, 3, len(prompts[3])))
    assert prefix.plan(prompts[2] + [1]).start == 0  # the least recently used went
    hit = prefix.plan(prompts[1] + [1])
    assert hit.start == len(prompts[1]) and _first(hit.cache) == 1.0
    small = PrefixCache(model, memory_budget=size - 1)  # a snapshot larger than the budget is not kept
    small.store(hit.keys, 5, _state(model, 0, 5))
    assert small.stats()["snapshots"] == 0
    with pytest.raises(ValueError, match="has read"):
        prefix.store(hit.keys, 5, _state(model, 0, 4))


def _wait(prefix: PrefixCache, key: str, value: int) -> None:
    deadline = time.monotonic() + 30
    while prefix.stats()[key] < value:
        assert time.monotonic() < deadline, prefix.stats()
        time.sleep(0.02)


def test_disk_tier_writes_evicted_states_within_its_budget_and_survives_a_restart(tmp_path):
    model = tiny_model()
    size = model.cache_nbytes(1)
    folder = tmp_path / "prefix-cache"
    # Room for one snapshot file and the next one's allowance (state + 64 KiB), not for two files and it:
    # a third write makes room by removing the least recently used file.
    disk = DiskTier(folder, size + 64 * 1024 + int(1.5 * size) + 2048, model, BLOCK_TOKENS)
    prefix = PrefixCache(model, memory_budget=size, interval=10**6, disk=disk)
    prompts = [[257, k, *range(70)] for k in range(4)]
    for k in range(4):
        prefix.store(prefix.plan(prompts[k]).keys, len(prompts[k]), _state(model, k, len(prompts[k])))
    _wait(prefix, "disk_writes", 3)
    stats = prefix.stats()
    assert stats["entries_in_memory"] == 1 and stats["entries_on_disk"] == 2 and stats["disk_bytes"] <= disk.budget
    assert len(list(folder.glob("*.safetensors"))) == 2 and not list(folder.glob("*.pkl"))
    record = json.loads(next(folder.glob("*.json")).read_text())
    assert record["format"] == "ssmkit-prefix-state" and len(record["tail"]) == 72 % BLOCK_TOKENS
    assert prefix.plan(prompts[0] + [9]).start == 0  # pushed off the disk by the budget
    hit = prefix.plan(prompts[2] + [9])
    assert hit.start == len(prompts[2]) and prefix.stats()["disk_hits"] == 1
    assert _first(hit.cache) == 2.0
    prefix.close()
    # A restart finds the snapshot on disk; a damaged record is removed, other files are left alone.
    names = sorted(p.stem for p in folder.glob("*.json"))
    again = PrefixCache(model, memory_budget=size, interval=10**6, disk=DiskTier(folder, disk.budget, model, BLOCK_TOKENS))
    # The hit above read C back into memory, pushing D out towards the disk: B or D is the other file there.
    assert again.stats()["entries_on_disk"] == 2
    hits = [k for k in (1, 2, 3) if again.plan(prompts[k] + [9]).start == len(prompts[k])]
    assert len(hits) == 2 and 2 in hits, hits
    again.close()
    for name in names:
        (folder / f"{name}.json").write_text("{not json")
    (folder / "notes.txt").write_text("mine")
    (folder / ".x.safetensors.123.tmp").write_text("debris")
    again = PrefixCache(model, memory_budget=size, interval=10**6, disk=DiskTier(folder, disk.budget, model, BLOCK_TOKENS))
    try:
        assert again.stats()["entries_on_disk"] == 0 and again.plan(prompts[2] + [9]).start == 0
        assert not list(folder.glob("*.json")) and not list(folder.glob("*.safetensors"))
        assert (folder / "notes.txt").exists() and not list(folder.glob("*.tmp"))
    finally:
        again.close()


def test_lookup_work_is_linear_in_the_prompt():
    """Many snapshots under one chain hash with distinct tails: a lookup compares one tail per length."""
    model = tiny_model()
    prefix = PrefixCache(model, memory_budget=1 << 30, interval=10**6)
    base = list(range(BLOCK_TOKENS))
    for k in range(50):
        ids = base + [k % 200, k // 200 + 1]
        prefix.store(prefix.plan(ids).keys, len(ids), _state(model, 0, len(ids)))
    long = base + [7, 1] + [3] * 20_000
    start = time.perf_counter()
    plan = prefix.plan(long)
    assert plan.start == BLOCK_TOKENS + 2
    assert time.perf_counter() - start < 2.0
    assert len(plan.points) == 0  # no interval snapshots with an interval beyond the prompt


def test_the_second_question_leaves_a_snapshot_where_the_questions_branch():
    model = tiny_model()
    rng = random.Random(5)
    doc = [rng.randrange(256) for _ in range(300)]
    prefix = PrefixCache(model, memory_budget=1 << 30, interval=10**6)  # no interval snapshots
    engine = Engine(model, max_batch=4, max_requests=8, prefill_chunk_size=128)
    engine.start()
    try:
        first = submit(engine, prefix, [257, *doc, 1, 2], 4, {"temperature": 0})
        second = submit(engine, prefix, [257, *doc, 3], 4, {"temperature": 0})
        assert first.plan.start == 0 and second.plan.start == 0
        assert second.plan.points == [4 * BLOCK_TOKENS]  # the last whole block both prompts share
        for k, q in enumerate([[4, 5, 6], [7]]):
            ids = [257, *doc, *q]
            later = submit(engine, prefix, ids, 6, {"temperature": 1.0}, seed=k)
            assert later.plan.start == 4 * BLOCK_TOKENS
            assert later.tokens == generate(model, [ids], 6, temperature=1.0, seed=k, eos_token_id=258)[0]
    finally:
        engine.stop()


def test_a_prompt_waits_for_a_leader_reading_the_same_document():
    model = tiny_model()
    prefix = PrefixCache(model, memory_budget=1 << 30, interval=64)
    doc = list(range(1, 200))
    leader = prefix.plan([257, *doc, 1])
    follower = prefix.plan([257, *doc, 2], may_wait=True)
    assert follower.leader is not None and not follower.leader_done() and follower.cache is None
    assert prefix.plan([257, 9, 9], may_wait=True).leader is None  # nothing shared: no waiting
    assert prefix.stats()["hits"] + prefix.stats()["misses"] == 2  # a waiting plan is not counted
    leader.release()
    assert follower.leader_done()
    # A plan dropped without release (a request that never reached the engine) frees its followers too.
    other = prefix.plan([257, *doc, 3])
    waiting = prefix.plan([257, *doc, 4], may_wait=True)
    assert not waiting.leader_done()
    del other
    assert waiting.leader_done()
