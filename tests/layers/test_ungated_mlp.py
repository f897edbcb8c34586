"""The ungated MLP feed-forward kind ('u'): its definition in float64 for every activation, its errors, and a
model with it that trains, decodes, saves and reloads."""

from __future__ import annotations

import pytest
import torch

from ssmkit.layers import registry
from ssmkit.layers.ungated_mlp import ACTIVATIONS, UngatedMLP, UngatedMLPConfig
from ssmkit.models import LanguageModel, Mamba2Config, ModelConfig

_DEFINITIONS = {
    "relu2": lambda h: torch.clamp(h, min=0) ** 2,
    "relu": lambda h: torch.clamp(h, min=0),
    "silu": lambda h: h / (1 + torch.exp(-h)),
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / 2 ** 0.5)),
    "gelu_pytorch_tanh": lambda h: 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h ** 3))),
}


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_its_definition_in_float64_with_gradients(activation, bias):
    torch.manual_seed(0)
    ff = UngatedMLP(12, UngatedMLPConfig(d_intermediate=20, activation=activation, bias=bias), dtype=torch.float64)
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    h = x @ ff.up_proj.weight.T + (ff.up_proj.bias if bias else 0)
    ref = _DEFINITIONS[activation](h) @ ff.down_proj.weight.T + (ff.down_proj.bias if bias else 0)
    out = ff(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), [x, ff.up_proj.weight])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, ff.up_proj.weight])
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    assert registry.by_letter("u").size(ff.config, 12) == (sum(p.numel() for p in ff.parameters()), 0)


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="ungated_mlp.activation"):
        UngatedMLP(8, UngatedMLPConfig(activation="tanh"))
    with pytest.raises(ValueError, match="ungated_mlp.d_intermediate"):
        UngatedMLP(8, UngatedMLPConfig(d_intermediate=0))
    with pytest.raises(ValueError, match="d_model"):
        UngatedMLP(8, d_intermediate=4)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="ungated_mlp.activation"):
        ModelConfig(vocab_size=16, d_model=8, n_layer=1, layer_pattern="2u",
                    ungated_mlp=UngatedMLPConfig(activation="swish"))


def test_a_model_with_it_trains_decodes_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layer=2, layer_pattern="2u",
                      mamba2=Mamba2Config(d_state=8, headdim=16, chunk_size=8),
                      ungated_mlp=UngatedMLPConfig(d_intermediate=48, bias=True))
    model = LanguageModel(cfg)
    ids = torch.randint(0, 40, (2, 12))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = None
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    model.eval()
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(2)
        steps = [model(ids[:, :5], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                           for t in range(5, 12)]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path / "m")
    again = LanguageModel.from_pretrained(tmp_path / "m")
    assert again.config == cfg
    with torch.no_grad():
        assert torch.equal(again(ids).logits, full)
