"""The parallel hybrid mixer (F, Falcon-H1's) against its definition in float64: ``ssm_out · Mamba2(ssm_in · x)
+ attention_out · Attention(attention_in · x)`` with the keys scaled and the Mamba-2 in-projection's parts
scaled, each multiplier checked against the same layers with it folded into their weights; its state (KV and
Mamba-2) through prompts, steps, seq_idx, initial states and copies; and the other µP multipliers it came with
(MLP, Mamba-2 on its own, the model's embedding and logits)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ssmkit.layers import MLP, Attention, Mamba2, ParallelHybrid, ParallelHybridState
from ssmkit.layers.configs import AttentionConfig, Mamba2Config
from ssmkit.models import (
    LanguageModel,
    MLPConfig,
    ModelCache,
    ModelConfig,
    ParallelHybridConfig,
)
from ssmkit.testing import assert_close

D = 24
MAMBA = Mamba2Config(d_state=6, headdim=6, ngroups=2, chunk_size=8, d_conv=3, d_inner=36, bias=True,
                     out_proj_bias=False, norm_before_gate=True, in_proj_multipliers=(0.5, 1.5, 0.7, 1.2, 0.4))
ATTENTION = AttentionConfig(num_heads=4, num_heads_kv=2, head_dim=8, rotary_emb_dim=8, rotary_emb_base=500.0,
                            bias=True)
MULTIPLIERS = {"key_multiplier": 0.45, "attention_in_multiplier": 1.3, "attention_out_multiplier": 0.8,
               "ssm_in_multiplier": 1.25, "ssm_out_multiplier": 0.7}


@torch.no_grad()
def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        p.copy_((0.3 if "weight" in name else 1.0) * torch.randn(p.shape, generator=g, dtype=p.dtype))
        if name.endswith("dt_bias"):
            p.add_(1.0)
    return module


def make(dtype: torch.dtype = torch.float64, **multipliers: float) -> ParallelHybrid:
    config = ParallelHybridConfig(attention=ATTENTION, mamba2=MAMBA, **(multipliers or MULTIPLIERS))
    return _randomize(ParallelHybrid(D, config, norm_eps=1e-4, dtype=dtype), 1).eval()


def reference(layer: ParallelHybrid, x: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """The definition with plain layers: key and in-projection multipliers folded into copies of the weights."""
    c = layer.config
    attn = Attention(D, c.attention, dtype=x.dtype)
    attn.load_state_dict(layer.self_attn.state_dict())
    mamba = Mamba2(D, Mamba2Config(**{**vars(c.mamba2), "in_proj_multipliers": (1.0,) * 5}), norm_eps=1e-4,
                   dtype=x.dtype)
    mamba.load_state_dict(layer.mamba.state_dict())
    with torch.no_grad():
        attn.k_proj.weight.mul_(c.key_multiplier)
        attn.k_proj.bias.mul_(c.key_multiplier)
        scale = layer.mamba.in_proj_scale
        mamba.in_proj.weight.mul_(scale[:, None])
        mamba.in_proj.bias.mul_(scale)
    return (c.ssm_out_multiplier * mamba(c.ssm_in_multiplier * x, seq_idx=seq_idx)
            + c.attention_out_multiplier * attn(c.attention_in_multiplier * x, seq_idx=seq_idx))


@pytest.mark.parametrize("length", [1, 7, 13])
def test_forward_is_the_scaled_sum_of_the_two_layers(length):
    layer = make()
    x = torch.randn(2, length, D, dtype=torch.float64)
    assert_close(layer(x), reference(layer, x), rtol=1e-12, atol=0, name="parallel hybrid")


def test_seq_idx_restarts_both_halves():
    layer = make()
    x = torch.randn(2, 15, D, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 6 + [1] * 9, [0] * 10 + [1] * 5], dtype=torch.int32)
    out = layer(x, seq_idx=seq_idx)
    assert_close(out, reference(layer, x, seq_idx), rtol=1e-12, atol=0, name="with seq_idx")
    assert_close(out[:1, 6:], layer(x[:1, 6:]), rtol=1e-12, atol=0, name="second document alone")


def test_gradients_match_the_definition():
    layer = make()
    x = torch.randn(2, 11, D, dtype=torch.float64, requires_grad=True)
    (ours,) = torch.autograd.grad(layer(x).square().sum(), x)
    (ref,) = torch.autograd.grad(reference(layer, x).square().sum(), x)
    assert_close(ours, ref, rtol=1e-12, atol=0, name="input gradient")
    layer(x).square().sum().backward()
    assert [n for n, p in layer.named_parameters() if not p.grad.abs().sum() > 0] == []
    # Parameters under a multiplier, and the input, against finite differences.
    names = ("self_attn.k_proj.bias", "mamba.in_proj.bias", "self_attn.o_proj.bias")
    named = dict(layer.named_parameters())
    params = [named[n].detach().clone().requires_grad_() for n in names]

    def f(t, *values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (t,))

    torch.autograd.gradcheck(f, (x[:1, :5].detach().clone().requires_grad_(), *params), eps=1e-6,
                            fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prompt_then_steps_equal_the_parallel_forward(dtype):
    layer = make(dtype)
    x = torch.randn(2, 13, D, dtype=dtype)
    full = layer(x)
    state = layer.allocate_state(2)
    assert isinstance(state, ParallelHybridState)
    outs = [layer(x[:, :6], cache=state)] + [layer(x[:, t:t + 1], cache=state) for t in range(6, 13)]
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close(torch.cat(outs, 1), full, rtol=rtol, atol=1e-6 if dtype == torch.float32 else 0, name="steps")
    assert state.length.tolist() == [13, 13]


def test_initial_state_is_read_only_and_continues_the_sequence():
    layer = make()
    x = torch.randn(2, 12, D, dtype=torch.float64)
    state = layer.allocate_state(2)
    layer(x[:, :5], cache=state)
    before = state.clone()
    out = layer(x[:, 5:], initial_state=state)
    assert all(torch.equal(a, b) for a, b in zip(state.tensors().values(), before.tensors().values()))
    assert_close(out, layer(x)[:, 5:], rtol=1e-12, atol=0, name="continued")
    with pytest.raises(ValueError, match="either cache"):
        layer(x, cache=state, initial_state=state)
    with pytest.raises(TypeError, match="ParallelHybridState"):
        layer(x, cache=layer.mamba.allocate_state(2))


def test_state_copies_clones_and_saves_both_halves(tmp_path):
    layer = make(torch.float32)
    x = torch.randn(1, 9, D)
    state = layer.allocate_state(1)
    layer(x, cache=state)
    grown = layer.allocate_state(1, max_length=600)  # another KV capacity: copy_ takes over the other's
    grown.copy_(state)
    assert grown.capacity == state.capacity and torch.equal(grown.ssm, state.ssm) and torch.equal(grown.conv, state.conv)
    ModelCache([state]).save(tmp_path / "c.safetensors")
    loaded = ModelCache.load(tmp_path / "c.safetensors").states[0]
    assert type(loaded) is ParallelHybridState
    step = torch.randn(1, 1, D)
    assert torch.equal(layer(step, cache=loaded), layer(step, cache=state))
    state.zero_()
    assert not any(t.any() for t in state.tensors().values())


def test_multipliers_of_one_are_the_plain_sum():
    layer = make(**{k: 1.0 for k in MULTIPLIERS})
    x = torch.randn(1, 5, D, dtype=torch.float64)
    layer.mamba.in_proj_scale = None
    assert_close(layer(x), layer.mamba(x) + layer.self_attn(x), rtol=1e-12, atol=0, name="sum")


@pytest.mark.parametrize("bias", [True, False])
def test_mlp_multipliers_equal_scaled_weights(bias):
    torch.manual_seed(0)
    ff = MLP(D, 10, bias=bias, gate_multiplier=0.7, down_multiplier=1.6).double()
    plain = MLP(D, 10, bias=bias).double()
    plain.load_state_dict(ff.state_dict())
    with torch.no_grad():
        for lin, m in ((plain.gate_proj, 0.7), (plain.down_proj, 1.6)):
            lin.weight.mul_(m)
            if bias:
                lin.bias.mul_(m)
    x = torch.randn(3, D, dtype=torch.float64)
    assert_close(ff(x), plain(x), rtol=1e-12, atol=0, name="mlp multipliers")


def test_mamba2_fused_step_keeps_its_multipliers():
    layer = _randomize(Mamba2(D, MAMBA, dtype=torch.float64), 2)
    norm = torch.nn.RMSNorm(D, eps=1e-5, dtype=torch.float64)
    norm.eps = 1e-5
    r = torch.randn(2, 1, D, dtype=torch.float64)
    a, b = layer.allocate_state(2), layer.allocate_state(2)
    fused = layer.step_from_residual(r, norm, a)
    assert_close(fused, r + layer(norm(r), cache=b), rtol=1e-12, atol=0, name="fused step")


@pytest.mark.parametrize("tie", [True, False])
def test_model_embedding_and_logits_multipliers(tie):
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layer=2, layer_pattern="2m", tie_embeddings=tie,
                      mamba2=Mamba2Config(d_state=4, headdim=8), mlp=MLPConfig(d_intermediate=8))
    torch.manual_seed(0)
    plain = LanguageModel(cfg).double().eval()
    scaled = LanguageModel(dataclasses.replace(cfg, embedding_multiplier=3.0, logits_multiplier=0.2)).double().eval()
    scaled.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 32, (2, 9))
    emb = plain.embedding.weight[ids] * 3.0
    residual = emb
    for block in plain.layers:
        residual = block(residual)
    expected = 0.2 * (plain.norm_f(residual) @ plain.head_weight.T)
    assert_close(scaled(ids).logits, expected, rtol=1e-12, atol=0, name="multiplied logits")
    cache = scaled.allocate_cache(2)
    steps = [scaled(ids[:, :4], cache=cache).logits] + [scaled(ids[:, t:t + 1], cache=cache).logits
                                                       for t in range(4, 9)]
    assert_close(torch.cat(steps, 1), expected, rtol=1e-10, atol=0, name="decode with multipliers")
    assert ModelConfig.from_dict(scaled.config.to_dict()).logits_multiplier == 0.2
    old = cfg.to_dict()
    del old["embedding_multiplier"], old["logits_multiplier"]
    assert ModelConfig.from_dict(old).embedding_multiplier == 1.0
    with pytest.raises(ValueError, match="logits_multiplier must be finite"):
        dataclasses.replace(cfg, logits_multiplier=float("inf"))


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="parallel_hybrid.mamba2.headdim"):
        ParallelHybrid(D, attention=ATTENTION, mamba2=Mamba2Config(headdim=7, d_inner=36))
    with pytest.raises(ValueError, match="parallel_hybrid.key_multiplier must be finite"):
        ParallelHybrid(D, attention=ATTENTION, mamba2=MAMBA, key_multiplier=float("nan"))
    with pytest.raises(ValueError, match="mamba2.d_inner must be > 0"):
        Mamba2Config(d_inner=0).validate(D)
