"""What a server keeps for Falcon-H1 models (parallel attention + Mamba-2 layers): every layer's state (the KV
cache, grown past its first block, and the Mamba-2 conv/SSM state) saved by a session store, read back by a
restarted one, and packed as rows of a batched cache, continues decoding exactly as the state never saved."""

from __future__ import annotations

import anyio
import pytest
import torch

from ssmkit.layers import ParallelHybridState
from ssmkit.models import LanguageModel, ModelCache, get_preset
from ssmkit.serve.sessions import SessionStore
from ssmkit.serve.slots import SlotCache

PROMPT = 300  # past the KV cache's first block of 256 tokens: the saved cache has grown


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LanguageModel(get_preset("falcon-h1-tiny")).eval()


def ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_a_session_saved_and_read_by_a_restarted_store_resumes_exactly(model, tmp_path):
    tokens = ids(PROMPT + 6, 1)
    cache = model.allocate_cache(1)
    model(tokens[:, :PROMPT], cache=cache)
    assert all(isinstance(s, ParallelHybridState) and s.capacity > 256 for s in cache.states)

    async def save() -> str:
        store = SessionStore(tmp_path, model, memory_budget=1)
        session = await store.create(pending=None, cache=cache.clone())
        return session.id

    async def load(sid: str) -> ModelCache:
        store = SessionStore(tmp_path, model, memory_budget=10**9)  # a new server process on the same folder
        return (await store.state(store.get(sid))).clone()

    sid = anyio.run(save)
    resumed = anyio.run(load, sid)
    assert resumed.seqlen_offset == PROMPT
    for t in range(PROMPT, PROMPT + 6):
        expected = model(tokens[:, t:t + 1], cache=cache).logits
        assert torch.equal(model(tokens[:, t:t + 1], cache=resumed).logits, expected)
    full = model(tokens).logits
    torch.testing.assert_close(expected[:, -1], full[:, -1], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_rows_of_a_batched_cache_decode_as_their_own_caches(model):
    prompts = [ids(11, 2), ids(5, 3)]
    alone = []
    slots = SlotCache()
    for prompt in prompts:
        cache = model.allocate_cache(1)
        model(prompt, cache=cache)
        alone.append(cache)
        slots.add(cache.clone())
    step = torch.tensor([[7], [9]])
    view = slots.view()
    batched = model(step, cache=view).logits
    slots.write_back(view)
    for row, cache in enumerate(alone):
        torch.testing.assert_close(batched[row], model(step[row:row + 1], cache=cache).logits[0],
                                   rtol=1e-5, atol=1e-6)
        kept = slots.row_cache(row)
        torch.testing.assert_close(kept.states[0].ssm, cache.states[0].ssm, rtol=1e-5, atol=1e-7)
        assert int(kept.states[0].length) == int(cache.states[0].length)


@torch.no_grad()
def test_generation_with_the_cache_equals_greedy_parallel_decoding(model):
    prompt = ids(9, 4)
    tokens = model.generate(prompt, 12, temperature=0)
    seq = prompt
    for _ in range(12):
        seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert tokens.tolist() == seq.tolist()
