"""SessionStore in-process: memory budget, files after every change, recovery after a crash at any point."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest
import torch

from ssmkit.serve.sessions import SessionNotFound, SessionStore, model_fingerprint

from .conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def filled(model, value: float):
    cache = model.allocate_cache(1)
    for s in cache.states:
        for t in s.tensors().values():
            t.fill_(value)
    cache.seqlen_offset = int(value)
    return cache


def same(a, b) -> bool:
    return a.seqlen_offset == b.seqlen_offset and all(
        torch.equal(x, y) for sa, sb in zip(a.states, b.states)
        for x, y in zip(sa.tensors().values(), sb.tensors().values()))


def test_budget_spills_and_states_come_back_from_disk(model, tmp_path):
    size = model.cache_nbytes(1)

    async def scenario():
        store = SessionStore(tmp_path, model, memory_budget=2 * size)
        sessions = [await store.create(pending=257, cache=filled(model, i)) for i in range(5)]
        assert store.stats()["in_memory"] == 2 and store.memory_bytes == 2 * size
        assert sessions[0].cache is None and sessions[4].cache is not None
        assert same(await store.state(sessions[0]), filled(model, 0))
        assert sessions[0].cache is not None and store.memory_bytes <= 2 * size
        # A state in use (its lock held) is never spilled, even past the budget.
        async with sessions[1].lock:
            await store.state(sessions[1])
            for s in sessions[2:]:
                await store.state(s)
            assert sessions[1].cache is not None
        fork = await store.fork(sessions[3])
        assert fork.id != sessions[3].id and same(await store.state(fork), filled(model, 3))
        await store.commit(sessions[3], filled(model, 9), pending=12)
        assert same(await store.state(fork), filled(model, 3))
        assert sessions[3].pending == 12 and sessions[3].tokens == 10
        await store.delete(sessions[2])
        with pytest.raises(SessionNotFound):
            store.get(sessions[2].id)
        return {s.id: s for s in sessions if s is not sessions[2]} | {fork.id: fork}

    kept = asyncio.run(scenario())
    # Exactly one JSON and one state file per live session.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{sid}.json" for sid in kept] + [f"{sid}.{s.version}.safetensors" for sid, s in kept.items()])


def test_recovery_keeps_every_committed_state_and_drops_debris(model, tmp_path):
    async def write():
        store = SessionStore(tmp_path, model, memory_budget=1 << 30)
        a = await store.create(pending=257, cache=filled(model, 1))
        b = await store.create(pending=None, cache=filled(model, 2))
        await store.commit(a, filled(model, 5), pending=7)
        return a, b

    a, b = asyncio.run(write())
    # A crash after writing a new state but before its JSON: the old version stays current.
    filled(model, 99).save(tmp_path / f"{a.id}.{a.version + 1}.safetensors")
    (tmp_path / f".{a.id}.json.123.tmp").write_text("{")
    (tmp_path / ("sess_" + "f" * 32 + ".json")).write_text("not json")
    bad = "sess_" + "e" * 32
    (tmp_path / f"{bad}.json").write_text(json.dumps({"id": bad, "created": 0, "pending": 1, "version": 3}))

    store = SessionStore(tmp_path, model, memory_budget=1 << 30)
    assert sorted(s.id for s in store.list()) == sorted([a.id, b.id])
    ra, rb = store.get(a.id), store.get(b.id)
    assert (ra.pending, ra.tokens_read, ra.state_bytes) == (7, 5, model.cache_nbytes(1))
    assert rb.pending is None and rb.tokens == 2
    assert same(asyncio.run(store.state(ra)), filled(model, 5))
    names = {p.name for p in tmp_path.iterdir()}
    assert f"{a.id}.{a.version + 1}.safetensors" not in names and not any(n.endswith(".tmp") for n in names)


def test_fingerprint_follows_the_weights(model, tmp_path):
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    assert model_fingerprint(tmp_path / "a") == model_fingerprint(tmp_path / "b")
    other = tiny_model()
    with torch.no_grad():
        other.embedding.weight[0, 0] += 1
    other.save_pretrained(tmp_path / "b")
    assert model_fingerprint(tmp_path / "a") != model_fingerprint(tmp_path / "b")


def test_a_state_saved_in_one_dtype_opens_in_another(tmp_path):
    """`ssmkit serve --dtype` may change between runs over the same sessions: a state written by the float32
    model comes back in the bf16 model's cache dtypes (values cast), and the other way round."""
    fp32 = tiny_model()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    for writer, reader in ((fp32, bf16), (bf16, fp32)):
        folder = tmp_path / str(writer.embedding.weight.dtype)

        async def write(writer=writer, folder=folder):
            store = SessionStore(folder, writer, memory_budget=1 << 30)
            return await store.create(pending=3, cache=filled(writer, 1.5))

        sid = asyncio.run(write()).id
        store = SessionStore(folder, reader, memory_budget=1 << 30)
        got = asyncio.run(store.state(store.get(sid)))
        want = reader.allocate_cache(1)
        assert got.seqlen_offset == 1
        for s, w in zip(got.states, want.states):
            for name, t in s.tensors().items():
                assert t.dtype == getattr(w, name).dtype and bool((t == 1.5).all()), name
