"""The decode step behind generate(): sync-free pieces, graph eligibility, the batched eos check."""

import importlib

import pytest
import torch

from ssmkit.generation import decode, generate
from ssmkit.generation.decode import (
    DecodeState,
    forward_one_layers,
    graph_blocker,
    pick,
)
from ssmkit.generation.sampling import SamplingParams, make_generators
from ssmkit.models import LanguageModel, ModelConfig, get_preset
from ssmkit.models.config import AttentionConfig, Mamba3Config

# The module, not the function that ssmkit.generation exports under the same name.
generate_module = importlib.import_module("ssmkit.generation.generate")


def make(config):
    torch.manual_seed(0)
    return LanguageModel(config)


def mamba3_config():
    return ModelConfig(vocab_size=40, d_model=32, n_layer=2, layer_pattern="3",
                       mamba3=Mamba3Config(d_state=8, headdim=16, chunk_size=8))


@pytest.mark.parametrize("name", ["debug-mamba", "debug-mamba2", "samba-tiny", "mamba3"])
def test_forward_one_layers_equals_the_model_forward(name):
    model = make(mamba3_config() if name == "mamba3" else get_preset(name))
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    a, b = model.allocate_cache(2), model.allocate_cache(2)
    with torch.no_grad():
        model(prompt, cache=a)
        model(prompt, cache=b)
        token = torch.tensor([3, 7])
        expected = model(token[:, None], cache=a, logits_to_keep=1).logits[:, -1]
        torch.testing.assert_close(forward_one_layers(model, token, b), expected, rtol=0, atol=0)
    for sa, sb in zip(a.states, b.states):
        for ta, tb in zip(sa.tensors().values(), sb.tensors().values()):
            assert torch.equal(ta, tb)


def test_graph_blocker_names_what_cannot_be_captured():
    for name in ("debug-mamba", "debug-mamba2", "debug-hybrid", "samba-tiny"):
        assert graph_blocker(make(get_preset(name))) is None, name
    assert graph_blocker(make(mamba3_config())) is None
    assert "MoE feed-forward" in graph_blocker(make(get_preset("jamba-tiny")))
    attention = ModelConfig(vocab_size=64, d_model=32, n_layer=2, layer_pattern="MA",
                            attention=AttentionConfig(num_heads=4))
    assert graph_blocker(make(attention)) == "layer 1 is full attention (its KV cache length is read on the host each step)"


def test_cuda_graph_argument_is_checked_and_falls_back_on_cpu():
    model = make(get_preset("debug-mamba2"))
    eager = generate(model, [[1, 2, 3]], 10, temperature=0, cuda_graph=False)
    assert generate(model, [[1, 2, 3]], 10, temperature=0) == eager  # auto: eager on CPU
    with pytest.raises(ValueError, match="cuda_graph=True: the model is not on a CUDA device"):
        generate(model, [[1, 2, 3]], 10, cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph must be True, False or None"):
        generate(model, [[1, 2, 3]], 10, cuda_graph="yes")


def test_pick_updates_masks_in_place_and_keeps_finished_rows_on_eos():
    logits = torch.tensor([[0.0, 5.0, 1.0, 9.0], [7.0, 0.0, 1.0, 2.0]])
    state = DecodeState(cache=None, params=SamplingParams(temperature=0), vocab_size=3, generators=None,
                        eos_ids=torch.tensor([0]), done=torch.tensor([False, False]),
                        seen=torch.zeros(2, 4, dtype=torch.bool))
    done, seen = state.done, state.seen
    # Token 3 is vocabulary padding: never picked.
    assert pick(logits.clone(), state).tolist() == [1, 0]
    assert state.done is done and done.tolist() == [False, True]
    assert state.seen is seen and seen.nonzero().tolist() == [[0, 1], [1, 0]]
    assert pick(logits.clone(), state).tolist() == [1, 0]  # the finished row repeats eos


@pytest.mark.parametrize("every", [1, 3, 16])
def test_batched_eos_check_yields_what_a_per_token_check_yields(monkeypatch, every):
    model = make(get_preset("debug-hybrid"))
    prompts = [[1, 2, 3], [9, 8], [5]]
    free = generate(model, prompts, 12, temperature=1.0, seed=2)
    eos = free[1][4]
    reference = generate(model, prompts, 12, temperature=1.0, seed=2, eos_token_id=eos)
    monkeypatch.setattr(generate_module, "_eos_check_every", lambda device: every)
    assert generate(model, prompts, 12, temperature=1.0, seed=2, eos_token_id=eos) == reference
    steps = list(model.stream(torch.tensor([prompts[0]]), 12, temperature=1.0, seed=2, eos_token_id=free[0][2]))
    assert len(steps) == 3  # stops right after the eos, not at the next check
    # A caller's cache ends exactly after the last token read (no steps past the eos).
    cache = model.allocate_cache(1)
    out = generate(model, [prompts[0]], 12, temperature=1.0, seed=2, eos_token_id=free[0][2], cache=cache)
    assert len(out[0]) == 3 and cache.seqlen_offset == len(prompts[0]) + 2


def test_decode_state_clone_is_independent():
    model = make(get_preset("debug-mamba2"))
    state = DecodeState(model.allocate_cache(2), SamplingParams(), 64, make_generators(1, 2, torch.device("cpu")),
                        torch.tensor([1]), torch.zeros(2, dtype=torch.bool), torch.zeros(2, 64, dtype=torch.bool))
    copy = state.clone()
    token = decode.step(model, torch.tensor([4, 5]), copy)
    assert token.shape == (2,) and copy.generators.draws.tolist() == [1, 1]
    assert state.generators.draws.tolist() == [0, 0] and not state.seen.any()
    assert all(not t.any() for s in state.cache.states for t in s.tensors().values())


def test_cached_decode_A_follows_parameter_updates():
    from ssmkit.layers import Mamba, Mamba2
    from ssmkit.layers.mamba import decode_A

    for layer in (Mamba(16, d_state=4), Mamba2(32, d_state=8, headdim=16)):
        with torch.no_grad():
            first = decode_A(layer)
            assert decode_A(layer) is first  # reused between steps
            layer.A_log.add_(0.5)  # an in-place update (optimizer step, load_state_dict) is seen
            torch.testing.assert_close(decode_A(layer), -torch.exp(layer.A_log), rtol=0, atol=0)
        # With autograd on, the value is computed afresh and carries the gradient.
        assert decode_A(layer).requires_grad
