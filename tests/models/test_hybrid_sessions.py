"""What a server session persists for the transformers hybrids (Bamba, Nemotron-H, Zamba2, Granite-4.0-H):
every layer's state (attention KV and Mamba-2 conv/SSM; a Zamba2 hybrid layer's KV of its shared-block call
beside its Mamba-2 states), saved after a prompt and loaded again (as a file, and through a server's session
store read back by a restarted one), continues decoding exactly as the cache that was never saved."""

from __future__ import annotations

import anyio
import pytest
import torch

from ssmkit.models import LanguageModel, ModelCache, get_preset
from ssmkit.serve.sessions import SessionStore

PRESETS = ("bamba-tiny", "nemotron-h-tiny", "zamba2-tiny", "granite-hybrid-tiny")


@pytest.mark.parametrize(("preset", "kinds"), [
    ("bamba-tiny", {"AttentionState", "Mamba2State"}),
    ("nemotron-h-tiny", {"AttentionState", "Mamba2State"}),
    ("zamba2-tiny", {"SharedTransformerMamba2State", "Mamba2State"}),
    ("granite-hybrid-tiny", {"AttentionState", "Mamba2State"}),
])
def test_a_saved_cache_resumes_decoding_exactly(tmp_path, preset, kinds):
    torch.manual_seed(0)
    model = LanguageModel(get_preset(preset)).eval()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(2)
        model(ids[:, :12], cache=cache)
        cache.save(tmp_path / "session.safetensors")
        resumed = ModelCache.load(tmp_path / "session.safetensors")
        assert {type(s).__name__ for s in resumed.states} == kinds
        for t in range(12, 20):
            expected = model(ids[:, t:t + 1], cache=cache).logits
            assert torch.equal(model(ids[:, t:t + 1], cache=resumed).logits, expected)
        torch.testing.assert_close(expected[:, -1], full[:, -1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_session_spilled_to_disk_and_read_by_a_restarted_store_resumes_exactly(tmp_path, preset):
    """``ssmkit serve``'s session store: a session's state written out under a memory budget of one byte, read
    by a new store on the same folder (a restarted server), decodes as the cache kept in memory."""
    torch.manual_seed(0)
    model = LanguageModel(get_preset(preset)).eval()
    ids = torch.randint(0, 256, (1, 18), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = model.allocate_cache(1)
        model(ids[:, :11], cache=cache)

    async def save() -> str:
        return (await SessionStore(tmp_path, model, memory_budget=1).create(pending=None, cache=cache.clone())).id

    async def load(sid: str) -> ModelCache:
        store = SessionStore(tmp_path, model, memory_budget=10**9)
        return (await store.state(store.get(sid))).clone()

    resumed = anyio.run(load, anyio.run(save))
    assert resumed.seqlen_offset == 11
    with torch.no_grad():
        for t in range(11, 18):
            expected = model(ids[:, t:t + 1], cache=cache).logits
            assert torch.equal(model(ids[:, t:t + 1], cache=resumed).logits, expected)
