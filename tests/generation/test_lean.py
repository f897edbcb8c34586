"""The lean CPU decode step (generation/lean.py): same tokens and states as the blocks' own step, and
taken only where it applies."""

import dataclasses
import gc
import importlib
import weakref

import pytest
import torch

from ssmkit.generation import generate, lean
from ssmkit.generation.decode import forward_one, forward_one_layers
from ssmkit.generation.lean import LeanDecoder, lean_decoder
from ssmkit.layers import lean_step
from ssmkit.models import LanguageModel, ModelConfig, get_preset
from ssmkit.models.config import AttentionConfig
from ssmkit.ops import native

# The module, not the function that ssmkit.generation exports under the same name.
generate_module = importlib.import_module("ssmkit.generation.generate")


def make(name: str, kind: str = "fp32") -> LanguageModel:
    torch.manual_seed(0)
    model = LanguageModel(get_preset(name)).eval()
    if kind == "bf16":
        model = model.to(torch.bfloat16)
    elif kind == "int8":
        model.quantize("int8")
    return model


def greedy(model: LanguageModel, monkeypatch: pytest.MonkeyPatch, lean: bool) -> list:
    if not lean:
        monkeypatch.setattr(generate_module, "lean_decoder", lambda model, cache: None)
    out = generate(model, [[1, 2, 3, 4], [7, 5]], 24, temperature=0)
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("name", ["debug-mamba", "debug-mamba2", "debug-hybrid"])
def test_greedy_tokens_equal_the_layers_step(monkeypatch, name, kind):
    model = make(name, kind)
    assert greedy(model, monkeypatch, lean=True) == greedy(model, monkeypatch, lean=False)


@pytest.mark.parametrize("kind", ["bf16", "int8"])
@pytest.mark.parametrize("name", ["debug-mamba", "debug-mamba2"])
def test_without_native_kernels(monkeypatch, name, kind):
    """No C compiler (or SSMKIT_NATIVE=0): the lean step takes torch's matmuls and state update, same tokens."""
    monkeypatch.setattr(native, "library", lambda: None)
    model = make(name, kind)
    with torch.no_grad():
        decoder = lean_decoder(model, model.allocate_cache(1))
    assert decoder is not None and all(step.layer_step is None for step in decoder.steps)
    assert all(getattr(step, "fused_step", None) is None and getattr(step, "selective_step", None) is None
               for step in decoder.steps)
    tokens = generate(model, [[1, 2, 3, 4], [7, 5]], 24, temperature=0)
    monkeypatch.setattr(generate_module, "lean_decoder", lambda model, cache: None)
    assert tokens == generate(model, [[1, 2, 3, 4], [7, 5]], 24, temperature=0)


def _varied_mamba(kind: str) -> LanguageModel:
    """debug-mamba with out_proj scaled up: at initialisation greedy decoding of Mamba-1 repeats the prompt's last
    token (the residual stays near the tied embedding), which would compare nothing."""
    torch.manual_seed(0)
    model = LanguageModel(get_preset("debug-mamba")).eval()
    with torch.no_grad():
        for block in model.layers:
            block.mixer.out_proj.weight.mul_(16)
    return model.to(torch.bfloat16) if kind == "bf16" else model.quantize("int8") if kind == "int8" else model


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_mamba_block_in_one_native_call_keeps_tokens_and_logits(monkeypatch, kind):
    """Mamba-1's one-call block step (ops/native/mamba_step.c) against the lean step with torch's norm, matmuls,
    dt_proj and casts around the native convolution and selective steps: the same greedy tokens, batch 2, and
    the same logits (float32 and int8 to float32 rounding; bfloat16 to a few bfloat16 steps of the logits)."""
    if native.library() is None:
        pytest.skip("no C compiler here: the native steps are not built")
    one, two = _varied_mamba(kind), _varied_mamba(kind)
    prompts = [[1, 2, 3, 4], [7, 5]]
    with torch.no_grad():
        decoders = [lean_decoder(one, one.allocate_cache(2))]
        monkeypatch.setattr(lean_step, "native_mamba_layer_step", lambda: None)  # two's decoder: without the step
        decoders.append(lean_decoder(two, two.allocate_cache(2)))
    assert all(s.layer_step is not None for s in decoders[0].steps)
    assert all(s.layer_step is None for s in decoders[1].steps)
    tokens = generate(one, prompts, 24, temperature=0)
    assert tokens == generate(two, prompts, 24, temperature=0)
    assert len(set(tokens[0][4:])) > 3  # the tokens vary: the comparison compares something
    tol = 5e-2 if kind == "bf16" else 1e-4
    caches = [m.allocate_cache(2) for m in (one, two)]
    with torch.no_grad():
        for model, cache in zip((one, two), caches):
            model(torch.tensor([[1, 2, 3, 4], [7, 5, 9, 9]]), cache=cache)
        for token in ([3, 7], [1, 0], [60, 2]):
            token = torch.tensor(token)
            a, b = (d(token, c) for d, c in zip(decoders, caches))
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item())


@pytest.mark.parametrize("name", ["debug-mamba", "debug-mamba2", "debug-hybrid"])
def test_logits_and_states_equal_the_layers_step(name):
    model = make(name)
    prompt = torch.randint(0, model.config.vocab_size, (2, 7))
    a = model.allocate_cache(2)
    with torch.no_grad():
        model(prompt, cache=a)
        b = a.clone()
        lean = lean_decoder(model, b)
        assert isinstance(lean, LeanDecoder)
        for token in ([3, 7], [1, 0], [60, 2]):
            token = torch.tensor(token)
            torch.testing.assert_close(lean(token, b), forward_one_layers(model, token, a), rtol=1e-5, atol=1e-5)
    for sa, sb in zip(a.states, b.states):
        for ta, tb in zip(sa.tensors().values(), sb.tensors().values()):
            torch.testing.assert_close(tb, ta, rtol=1e-5, atol=1e-5)


def test_embedding_and_logits_multipliers():
    """µP scales of the model (Falcon-H1's embedding / lm_head multipliers) are applied by the lean step too."""
    torch.manual_seed(0)
    config = dataclasses.replace(get_preset("debug-mamba2"), embedding_multiplier=3.0, logits_multiplier=0.25)
    model = LanguageModel(config).eval()
    a = model.allocate_cache(1)
    with torch.no_grad():
        model(torch.tensor([[4, 9, 2]]), cache=a)
        b = a.clone()
        lean = lean_decoder(model, b)
        assert lean is not None
        token = torch.tensor([11])
        torch.testing.assert_close(lean(token, b), forward_one_layers(model, token, a), rtol=1e-5, atol=1e-5)


def test_taken_only_where_it_applies():
    model = make("debug-mamba2")
    cache = model.allocate_cache(2)
    with torch.no_grad():
        assert lean_decoder(model, cache) is not None
        assert lean_decoder(model, model.allocate_cache(3)) is not None
        other = make("debug-mamba").allocate_cache(2)
        assert lean_decoder(model, other) is None  # another model's states
        assert lean_decoder(make("jamba-tiny"), make("jamba-tiny").allocate_cache(1)) is None  # MoE, attention
        attention = LanguageModel(ModelConfig(vocab_size=64, d_model=32, n_layer=2, layer_pattern="MA",
                                              attention=AttentionConfig(num_heads=4)))
        assert lean_decoder(attention, attention.allocate_cache(1)) is None
        assert lean_decoder(model.double(), model.allocate_cache(2)) is None  # float64
    assert lean_decoder(make("debug-mamba2"), cache) is None  # autograd on: the layers' step


def test_follows_parameter_updates():
    model = make("debug-mamba")
    token = torch.tensor([5])
    with torch.no_grad():
        first = lean_decoder(model, model.allocate_cache(1))
        before = forward_one(model, token, model.allocate_cache(1))
        model.layers[0].mixer.out_proj.weight.mul_(3.0)
        model.layers[1].mixer.A_log.add_(0.5)
        assert lean_decoder(model, model.allocate_cache(1)) is not first  # rebuilt
        after = forward_one(model, token, model.allocate_cache(1))
        expected = forward_one_layers(model, token, model.allocate_cache(1))
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_decoder_is_kept_beside_the_model_not_in_it():
    model = make("debug-mamba2")
    with torch.no_grad():
        assert lean_decoder(model, model.allocate_cache(1)) is not None
    assert model in lean._DECODERS and "_lean_decoder" not in model.__dict__
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None  # the cached decoder does not keep its model alive
