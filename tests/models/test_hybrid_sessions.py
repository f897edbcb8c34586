"""What a server session persists for the transformers hybrids (Bamba, Nemotron-H, Zamba2): every layer's
state (attention KV and Mamba-2 conv/SSM; a Zamba2 hybrid layer's KV of its shared-block call beside its
Mamba-2 states), saved after a prompt and loaded again, continues decoding exactly as the cache that was
never saved."""

from __future__ import annotations

import pytest
import torch

from ssmkit.models import LanguageModel, ModelCache, get_preset


@pytest.mark.parametrize(("preset", "kinds"), [
    ("bamba-tiny", {"AttentionState", "Mamba2State"}),
    ("nemotron-h-tiny", {"AttentionState", "Mamba2State"}),
    ("zamba2-tiny", {"SharedTransformerMamba2State", "Mamba2State"}),
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
