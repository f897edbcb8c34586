"""Jamba checkpoints: transformers' JambaForCausalLM <-> ssmkit hybrid LanguageModel, same logits, same
greedy tokens, same auxiliary loss, in both directions."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from hybrid_checks import random_hf_model, saved_hf_folder, write_checkpoint

from ssmkit.interop import CheckpointError, load_transformers_checkpoint
from ssmkit.layers import Attention, Mamba, MoE
from ssmkit.models import (
    AttentionConfig,
    LanguageModel,
    MambaConfig,
    MLPConfig,
    ModelConfig,
    MoEConfig,
)
from ssmkit.models.presets import jamba_layer_pattern
from ssmkit.testing import assert_close, relative_error

# 8 layers, attention at i % 4 == 1 (layers 1 and 5), MoE at i % 2 == 0, GQA 4/2, 4 experts top-2;
# non-default eps, dt rank, conv width and state size, so a dropped field shows in the logits.
JAMBA = dict(vocab_size=67, hidden_size=32, intermediate_size=40, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=4, attn_layer_offset=1,
             expert_layer_period=2, expert_layer_offset=0, mamba_d_state=6, mamba_d_conv=3, mamba_expand=2,
             mamba_dt_rank=3, rms_norm_eps=1e-5, router_aux_loss_coef=0.02, tie_word_embeddings=False,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random values for the parameters initialised to constants (A_log, D, dt bias, norms, conv bias) and
    larger router weights, so that routing differs between tokens."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            p.copy_(torch.empty(p.shape).uniform_(math.log(0.5), math.log(8.0), generator=g))
        elif leaf == "D":
            p.copy_(torch.randn(p.shape, generator=g))
        elif name.endswith("dt_proj.bias"):
            p.copy_(torch.empty(p.shape).uniform_(-4.0, 1.0, generator=g))
        elif "norm" in name:
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        elif name.endswith("conv1d.bias"):
            p.copy_(torch.randn(p.shape, generator=g))
        elif "router" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def hf_jamba(seed: int = 0, **overrides) -> transformers.JambaForCausalLM:
    return random_hf_model(transformers.JambaForCausalLM, transformers.JambaConfig, {**JAMBA, **overrides}, seed,
                           randomize_)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return saved_hf_folder(tmp_path_factory, hf_jamba(), "jamba")


def test_loaded_config_and_modules(hf_folder):
    _, folder = hf_folder
    model = LanguageModel.from_pretrained(folder)
    cfg = model.config
    assert cfg.layer_pattern == jamba_layer_pattern(8, attn_layer_period=4, attn_layer_offset=1,
                                                    expert_layer_period=2, expert_layer_offset=0)
    assert [isinstance(b.mixer, Attention) for b in model.layers] == [i % 4 == 1 for i in range(8)]
    assert [isinstance(b.ff, MoE) for b in model.layers] == [i % 2 == 0 for i in range(8)]
    assert (cfg.attention.num_heads, cfg.attention.num_heads_kv, cfg.moe.num_experts, cfg.moe.top_k) == (4, 2, 4, 2)
    assert cfg.mamba.inner_layernorms and cfg.mamba.mixer_rms_eps == cfg.norm_eps == 1e-5
    assert (cfg.mamba.dt_rank, cfg.mamba.d_conv, cfg.moe.router_aux_loss_coef) == (3, 3, 0.02)
    assert not cfg.tie_embeddings and not cfg.residual_in_fp32
    mamba = model.layers[0].mixer
    assert isinstance(mamba, Mamba) and mamba.dt_layernorm.weight.shape == (3,) and mamba.b_layernorm.eps == 1e-5


def test_transformers_to_ssmkit_logits_loss_and_greedy_tokens(hf_folder):
    hf, folder = hf_folder
    model = LanguageModel.from_pretrained(folder).eval()
    ids = torch.randint(0, 67, (2, 23), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids, labels=ids, output_router_logits=True)
        out = model(ids, labels=ids)
    err = relative_error(out.logits[..., :67], ref.logits)
    assert err <= 1e-4, err
    assert_close(out.aux_loss, ref.aux_loss, torch.float32, name="aux_loss")
    assert_close(out.loss, ref.loss, torch.float32, name="loss")
    assert ref.aux_loss > 1.0  # routing is really exercised (1 would be perfectly balanced)

    prompt = ids[:1, :9]
    with torch.no_grad():
        hf_tokens = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)[0, 9:]
        ours = model.generate(prompt, 20, temperature=0)[0, 9:]
    assert ours.tolist() == hf_tokens.tolist()


def ssmkit_jamba() -> LanguageModel:
    torch.manual_seed(5)
    cfg = ModelConfig(vocab_size=70, d_model=32, n_layer=8, layer_pattern=jamba_layer_pattern(8),
                      mamba=MambaConfig(d_state=4, inner_layernorms=True, mixer_rms_eps=1e-6),
                      attention=AttentionConfig(num_heads=8, num_heads_kv=2), mlp=MLPConfig(d_intermediate=24),
                      moe=MoEConfig(num_experts=3, top_k=2, d_intermediate=24), norm_eps=1e-6, tie_embeddings=True)
    return randomize_(LanguageModel(cfg), 7).eval()


def test_ssmkit_to_transformers_and_back(tmp_path):
    model = ssmkit_jamba()
    model.save_pretrained(tmp_path / "out", format="transformers")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (raw["model_type"], raw["num_experts"], raw["num_key_value_heads"]) == ("jamba", 3, 2)
    hf = transformers.JambaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf.config.layers_block_type == ["attention" if i == 4 else "mamba" for i in range(8)]
    assert hf.config.layers_num_experts == [3 if i % 2 else 1 for i in range(8)]
    ids = torch.randint(0, 70, (2, 19), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids).logits
    assert ours.shape == ref.shape  # vocab 70 padded to 72 rows: transformers' vocab_size is 72
    assert relative_error(ours, ref) <= 1e-4
    again = LanguageModel.from_pretrained(tmp_path / "out")
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name


def test_fused_expert_tensors_are_read(hf_folder, tmp_path):
    hf, folder = hf_folder
    fused = {n: t.contiguous() for n, t in hf.state_dict().items()}
    assert any(n.endswith("experts.gate_up_proj") for n in fused)
    write_checkpoint(tmp_path / "fused", json.loads((folder / "config.json").read_text()), fused)
    _, per_expert = load_transformers_checkpoint(folder)
    _, from_fused = load_transformers_checkpoint(tmp_path / "fused")
    assert per_expert.keys() == from_fused.keys()
    assert all(torch.equal(per_expert[n], from_fused[n]) for n in per_expert)


def test_unsupported_configs_and_models_raise(hf_folder, tmp_path):
    _, folder = hf_folder
    raw = json.loads((folder / "config.json").read_text())
    write_checkpoint(tmp_path / "gelu", {**raw, "hidden_act": "gelu"})
    with pytest.raises(CheckpointError, match="hidden_act"):
        LanguageModel.from_pretrained(tmp_path / "gelu")
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "config.json").write_text(json.dumps({**raw, "mamba_d_state": 7}))
    (tmp_path / "short" / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"mamba.A_log has shape \(64, 6\), the config implies \(64, 7\)"):
        LanguageModel.from_pretrained(tmp_path / "short")

    base = dict(vocab_size=64, d_model=32, n_layer=4, mamba=MambaConfig(d_state=4, inner_layernorms=True,
                                                                        mixer_rms_eps=1e-5),
                attention=AttentionConfig(num_heads=4, window=8), mlp=MLPConfig(d_intermediate=16),
                moe=MoEConfig(num_experts=2, d_intermediate=16))
    for pattern, message in (("MmWm", "full attention"), ("MmAe", "inner_layernorms .* norm_eps"),
                             ("M", "needs a feed-forward"), ("AmAmMmMm", "not every k-th layer")):
        eps = 1e-6 if pattern == "MmAe" else 1e-5
        n = 8 if pattern == "AmAmMmMm" else 4
        model = LanguageModel(ModelConfig(**{**base, "n_layer": n, "norm_eps": eps, "layer_pattern": pattern}),
                              device="meta")
        with pytest.raises(ValueError, match=message):
            model.save_pretrained(tmp_path / pattern, format="transformers")
