"""generate() on a CUDA GPU: the CUDA-graph decode path gives the eager path's tokens, greedy and seeded.

Run on the device machine: ``python -m pytest -m gpu tests/gpu/test_generate_cuda_graph.py -q``.
"""

from __future__ import annotations

import pytest
import torch

from ssmkit.generation.decode import graph_blocker
from ssmkit.models import LanguageModel, ModelConfig, get_preset
from ssmkit.models.config import AttentionConfig, Mamba2Config, Mamba3Config
from ssmkit.testing import raise_dt_bias

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _configs() -> dict[str, ModelConfig]:
    return {
        "mamba": get_preset("debug-mamba"),
        "mamba2": ModelConfig(vocab_size=300, d_model=64, n_layer=3, layer_pattern="2",
                              mamba2=Mamba2Config(d_state=32, headdim=16, ngroups=2, chunk_size=16)),
        "mamba3": ModelConfig(vocab_size=100, d_model=64, n_layer=2, layer_pattern="3",
                              mamba3=Mamba3Config(d_state=16, headdim=16, chunk_size=16)),
        "mamba3-mimo": ModelConfig(vocab_size=100, d_model=64, n_layer=2, layer_pattern="3",
                                   mamba3=Mamba3Config(d_state=16, headdim=16, chunk_size=16, is_mimo=True,
                                                       mimo_rank=2, is_outproj_norm=True)),
        # Mamba + sliding-window attention (ring KV cache) + MLP: the prompts outgrow the window of 32.
        "samba": get_preset("samba-tiny"),
        # Full attention cannot be captured: generate falls back to eager (checked below).
        "mamba-attention": ModelConfig(vocab_size=64, d_model=32, n_layer=2, layer_pattern="MA",
                                       attention=AttentionConfig(num_heads=4, rotary_emb_dim=8)),
    }


CONFIGS = _configs()
SAMPLING = [
    {"temperature": 0},
    {"temperature": 1.0, "seed": 7},
    {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "min_p": 0.02, "repetition_penalty": 1.2, "seed": 3},
]


def _model(name: str, dtype: torch.dtype) -> LanguageModel:
    torch.manual_seed(0)
    return raise_dt_bias(LanguageModel(CONFIGS[name], device="cuda", dtype=dtype).eval())


def _prompts(vocab: int, batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return [torch.randint(0, vocab, (int(torch.randint(1, 50, (1,), generator=g)),), generator=g).tolist()
            for _ in range(batch)]


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "mamba-attention"])
@pytest.mark.parametrize("sampling", SAMPLING, ids=["greedy", "sample", "filters"])
@pytest.mark.parametrize("batch", [1, 5])
def test_graph_tokens_equal_eager_tokens(name, sampling, batch):
    model = _model(name, torch.float32)
    assert graph_blocker(model) is None
    prompts = _prompts(model.config.vocab_size, batch)
    eager = model.generate(prompts, 40, cuda_graph=False, **sampling)
    graphed = model.generate(prompts, 40, cuda_graph=True, **sampling)
    assert graphed == eager
    assert all(len(row) == 40 for row in graphed)


@pytest.mark.parametrize("name", ["mamba2", "samba"])
def test_graph_in_bfloat16_with_eos_and_a_tensor_batch(name):
    model = _model(name, torch.bfloat16)
    prompts = torch.tensor(_prompts(model.config.vocab_size, 4)[0][:1] * 4).view(4, 1)
    prompts[1:, 0] = torch.tensor([5, 9, 11])
    free = model.generate(prompts, 60, cuda_graph=False, temperature=1.0, seed=1)
    eos = int(free[2, 1 + 30])
    eager = model.generate(prompts, 60, cuda_graph=False, temperature=1.0, seed=1, eos_token_id=eos)
    graphed = model.generate(prompts, 60, cuda_graph=True, temperature=1.0, seed=1, eos_token_id=eos)
    assert torch.equal(graphed, eager)


def test_graph_matches_eager_for_a_cache_continued_and_the_cache_after():
    model = _model("mamba2", torch.float32)
    doc = torch.randint(0, 300, (2, 30), device="cuda")
    cache = model.allocate_cache(2)
    with torch.no_grad():
        model(doc, cache=cache)
    fork = cache.clone()
    question = torch.randint(0, 300, (2, 3), device="cuda")
    eager = model.generate(question, 20, cuda_graph=False, temperature=0, cache=cache)
    graphed = model.generate(question, 20, cuda_graph=True, temperature=0, cache=fork)
    assert torch.equal(graphed, eager)
    assert cache.seqlen_offset == fork.seqlen_offset == 30 + 3 + 19
    for a, b in zip(cache.states, fork.states):
        for ta, tb in zip(a.tensors().values(), b.tensors().values()):
            torch.testing.assert_close(ta, tb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mamba", "mamba2", "samba"])
def test_a_kept_graph_serves_later_calls_with_the_eager_tokens(name):
    from ssmkit.generation.graph_cache import cached_graphs, clear_graph_cache

    model = _model(name, torch.bfloat16)
    clear_graph_cache(model)
    sampling = {"temperature": 0.8, "top_p": 0.9, "repetition_penalty": 1.1}
    for seed in (1, 2, 3):
        prompts = _prompts(model.config.vocab_size, 3 + seed)[:3]  # other prompts, the same batch of 3
        graphed = model.generate(prompts, 30, cuda_graph=True, seed=seed, **sampling)
        assert graphed == model.generate(prompts, 30, cuda_graph=False, seed=seed, **sampling)
    assert cached_graphs(model) == 1


def test_full_attention_falls_back_to_eager():
    model = _model("mamba-attention", torch.float32)
    assert "full attention" in graph_blocker(model)
    prompts = _prompts(64, 3)
    assert model.generate(prompts, 20, temperature=0) == model.generate(prompts, 20, temperature=0, cuda_graph=False)
    with pytest.raises(ValueError, match="cuda_graph=True: layer 1 is full attention"):
        model.generate(prompts, 20, cuda_graph=True)


def test_decode_step_does_not_synchronise():
    """Eager decode steps (not only the graph) run without host synchronisation."""
    from ssmkit.generation.decode import DecodeState, step
    from ssmkit.generation.sampling import SamplingParams, make_generators

    model = _model("samba", torch.bfloat16)
    cache = model.allocate_cache(3)
    with torch.no_grad():
        model(torch.randint(0, 256, (3, 40), device="cuda"), cache=cache)
        state = DecodeState(cache, SamplingParams(top_p=0.9, repetition_penalty=1.1), 256,
                            make_generators(0, 3, torch.device("cuda")), torch.tensor([1], device="cuda"),
                            torch.zeros(3, dtype=torch.bool, device="cuda"),
                            torch.zeros(3, 256, dtype=torch.bool, device="cuda"))
        token = torch.zeros(3, dtype=torch.long, device="cuda")
        step(model, token, state)  # first call: compilation and lazy initialisation may synchronise
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                token = step(model, token, state)
        finally:
            torch.cuda.set_sync_debug_mode("default")
