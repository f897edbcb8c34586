"""Falcon-H1 checkpoints: transformers' FalconH1ForCausalLM <-> ssmkit LanguageModel of parallel hybrid layers
("Fm": attention and Mamba-2 side by side, then a SwiGLU MLP, µP multipliers everywhere): same logits, same
greedy tokens, decode equal to the parallel forward, in both directions; unsupported config values name their
field; the published presets have transformers' parameter counts."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "FalconH1ForCausalLM"):
    pytest.skip("this transformers release has no FalconH1ForCausalLM", allow_module_level=True)

from hybrid_checks import (
    assert_decode_equals_parallel_forward,
    assert_same_logits_and_greedy_tokens,
    assert_sharded_folder_is_read,
    convert_there_and_back,
    random_hf_model,
    randomize_hybrid_,
    saved_hf_folder,
    token_ids,
    write_checkpoint,
)
from safetensors.torch import load_file

from ssmkit.interop import CheckpointError
from ssmkit.layers import ParallelHybrid
from ssmkit.layers.embedding import ScaledEmbedding
from ssmkit.models import (
    AttentionConfig,
    LanguageModel,
    Mamba2Config,
    MLPConfig,
    ModelConfig,
    ParallelHybridConfig,
)
from ssmkit.models.formats.falcon_h1 import falcon_h1_config_to_transformers

# 3 layers; GQA 4/2 with head_dim 10 (not hidden / heads) and a non-default rope base; Mamba-2 of 36 channels
# (mamba_d_ssm, not expand * hidden) in 6 heads and 2 groups with the grouped gated norm normalising before the
# gate, d_state 6, conv 3, every bias on (in_proj and out_proj apart), a dt limit; every µP multiplier not 1
# and each different, non-default eps: a dropped or swapped field shows in the logits.
FALCON_H1 = {
    "vocab_size": 67, "hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 10, "mamba_d_ssm": 36, "mamba_n_heads": 6, "mamba_d_head": "auto",
    "mamba_n_groups": 2, "mamba_d_state": 6, "mamba_d_conv": 3, "mamba_expand": 2, "mamba_chunk_size": 8,
    "mamba_conv_bias": True, "mamba_proj_bias": True, "projectors_bias": False, "mamba_rms_norm": True,
    "mamba_norm_before_gate": True, "time_step_limit": (0.01, 5.0), "attention_bias": True, "mlp_bias": True,
    "rms_norm_eps": 1e-4, "tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
    "embedding_multiplier": 1.7, "lm_head_multiplier": 0.6, "key_multiplier": 0.45, "attention_in_multiplier": 1.3,
    "attention_out_multiplier": 0.8, "ssm_in_multiplier": 1.25, "ssm_out_multiplier": 0.7,
    "ssm_multipliers": [0.35, 0.25, 0.4, 0.5, 0.3], "mlp_multipliers": [0.9, 0.6],
    "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
}


def hf_falcon_h1(seed: int = 0, **overrides) -> transformers.FalconH1ForCausalLM:
    return random_hf_model(transformers.FalconH1ForCausalLM, transformers.FalconH1Config,
                           {**FALCON_H1, **overrides}, seed, randomize_hybrid_)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return saved_hf_folder(tmp_path_factory, hf_falcon_h1(), "falcon_h1")


def test_loaded_config_and_modules(hf_folder):
    _, folder = hf_folder
    model = LanguageModel.from_pretrained(folder)
    cfg = model.config
    assert (cfg.layer_pattern, cfg.n_layer) == ("Fm", 3)
    p = cfg.parallel_hybrid
    a, m = p.attention, p.mamba2
    assert (a.num_heads, a.num_heads_kv, a.head_dim, a.rotary_emb_dim, a.rotary_emb_base, a.bias) == (
        4, 2, 10, 10, 500.0, True)
    assert (m.d_inner, m.headdim, m.ngroups, m.d_state, m.d_conv, m.chunk_size, m.bias, m.out_proj_bias) == (
        36, 6, 2, 6, 3, 8, True, False)
    assert (m.rmsnorm, m.norm_before_gate, m.dt_limit, m.in_proj_multipliers) == (
        True, True, (0.01, 5.0), (0.35, 0.25, 0.4, 0.5, 0.3))
    assert (p.key_multiplier, p.attention_in_multiplier, p.attention_out_multiplier, p.ssm_in_multiplier,
            p.ssm_out_multiplier) == (0.45, 1.3, 0.8, 1.25, 0.7)
    assert (cfg.mlp.gate_multiplier, cfg.mlp.down_multiplier, cfg.mlp.bias) == (0.9, 0.6, True)
    assert (cfg.embedding_multiplier, cfg.logits_multiplier, cfg.norm_eps, cfg.tie_embeddings) == (
        1.7, 0.6, 1e-4, False)
    mixer = model.layers[0].mixer
    assert isinstance(mixer, ParallelHybrid) and isinstance(model.embedding, ScaledEmbedding)
    assert mixer.mamba.norm.group_size == 18 and mixer.mamba.norm.eps == 1e-4
    assert mixer.self_attn.softmax_scale == pytest.approx(0.45 / 10**0.5)


def test_transformers_to_ssmkit_logits_and_greedy_tokens(hf_folder):
    hf, folder = hf_folder
    model = LanguageModel.from_pretrained(folder).eval()
    assert_same_logits_and_greedy_tokens(hf, model, token_ids(67, (2, 23), 3), 9)


def test_decode_equals_parallel_forward(hf_folder):
    _, folder = hf_folder
    model = LanguageModel.from_pretrained(folder).eval()
    assert_decode_equals_parallel_forward(model, token_ids(67, (2, 17), 5), 7)


@pytest.mark.parametrize("change", [
    {"mamba_rms_norm": False, "mamba_proj_bias": False, "projectors_bias": True},
    {"mamba_norm_before_gate": False, "mamba_d_ssm": None, "mamba_expand": 1, "mamba_n_heads": 4,
     "tie_word_embeddings": True},
])
def test_other_options_match_transformers(tmp_path, change):
    hf = hf_falcon_h1(4, **change)
    hf.save_pretrained(tmp_path / "hf")
    model = LanguageModel.from_pretrained(tmp_path / "hf").eval()
    assert_same_logits_and_greedy_tokens(hf, model, token_ids(67, (2, 19), 8), 6)


def test_sharded_folder_is_read(hf_folder, tmp_path):
    hf, folder = hf_folder
    assert_sharded_folder_is_read(hf, folder, tmp_path / "sharded")


def ssmkit_falcon_h1(tie: bool) -> LanguageModel:
    # vocab 72: no padding rows, so both sides generate over the same vocabulary.
    torch.manual_seed(5)
    mixer = ParallelHybridConfig(
        attention=AttentionConfig(num_heads=4, num_heads_kv=1, rotary_emb_dim=8, rotary_emb_base=1000.0,
                                  bias=not tie),
        mamba2=Mamba2Config(d_state=4, headdim=8, ngroups=2, chunk_size=16, d_conv=4, d_inner=48, rmsnorm=tie,
                            bias=tie, out_proj_bias=not tie, in_proj_multipliers=(0.5, 1.5, 0.7, 0.9, 0.4)),
        key_multiplier=0.6, attention_in_multiplier=0.9, attention_out_multiplier=1.1, ssm_in_multiplier=0.8,
        ssm_out_multiplier=0.5)
    cfg = ModelConfig(vocab_size=72, d_model=32, n_layer=3, layer_pattern="Fm", parallel_hybrid=mixer,
                      mlp=MLPConfig(d_intermediate=24, bias=not tie, gate_multiplier=0.7, down_multiplier=1.2),
                      norm_eps=1e-6, tie_embeddings=tie, residual_in_fp32=False, embedding_multiplier=2.5,
                      logits_multiplier=0.3)
    return randomize_hybrid_(LanguageModel(cfg), 7).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_ssmkit_to_transformers_and_back(tmp_path, tie):
    model = ssmkit_falcon_h1(tie)
    model.save_pretrained(tmp_path / "out", format="transformers")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (raw["model_type"], raw["mamba_d_ssm"], raw["mamba_n_heads"], raw["lm_head_multiplier"]) == (
        "falcon_h1", 48, 6, 0.3)
    hf = transformers.FalconH1ForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert_same_logits_and_greedy_tokens(hf, model, token_ids(72, (2, 19), 4), 6, same_vocab=True)
    again = LanguageModel.from_pretrained(tmp_path / "out").eval()
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
    ids = token_ids(72, (1, 11), 2)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


@pytest.mark.parametrize(("change", "field"), [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": "yes"}, "mlp_bias"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10.0, "factor": 2.0}}, "rope_type"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"head_dim": 9}, "head_dim"),
    ({"mamba_n_heads": 5}, "mamba_n_heads"),
    ({"mamba_d_head": 5}, "mamba_n_heads"),
    ({"mamba_n_groups": 4}, "mamba_n_groups"),
    ({"time_step_limit": [1.0, 0.5]}, "time_step_limit"),
    ({"ssm_multipliers": [1.0, 1.0]}, "ssm_multipliers"),
    ({"mlp_multipliers": [1.0, "x"]}, "mlp_multipliers"),
    ({"key_multiplier": "big"}, "key_multiplier"),
    ({"embedding_multiplier": float("nan")}, "embedding_multiplier"),
    ({"mamba_rms_norm": 1}, "mamba_rms_norm"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
])
def test_unsupported_config_values_name_the_field(hf_folder, tmp_path, change, field):
    _, folder = hf_folder
    raw = json.loads((folder / "config.json").read_text())
    write_checkpoint(tmp_path / "bad", {**raw, **change})
    with pytest.raises(CheckpointError, match=field):
        LanguageModel.from_pretrained(tmp_path / "bad")


def test_mis_shaped_tensors_name_the_tensor(hf_folder, tmp_path):
    _, folder = hf_folder
    raw = json.loads((folder / "config.json").read_text())
    write_checkpoint(tmp_path / "short", {**raw, "mamba_d_state": 7}, load_file(str(folder / "model.safetensors")))
    with pytest.raises(CheckpointError, match=r"model.layers.0.mamba.in_proj.weight has shape"):
        LanguageModel.from_pretrained(tmp_path / "short")


@pytest.mark.parametrize(("pattern", "n_layer", "why"), [
    ("FmAm", 2, "'Fm'"), ("F", 1, "'Fm'"), ("Fe", 1, "'Fm'")])
def test_models_falcon_h1_cannot_express_are_refused(tmp_path, pattern, n_layer, why):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=n_layer, layer_pattern=pattern,
                      parallel_hybrid=ParallelHybridConfig(attention=AttentionConfig(num_heads=4, rotary_emb_dim=8),
                                                           mamba2=Mamba2Config(d_state=4, headdim=16)),
                      attention=AttentionConfig(num_heads=4, rotary_emb_dim=8))
    with pytest.raises(ValueError, match=f"cannot be saved as transformers' Falcon-H1.*{why}"):
        LanguageModel(cfg, device="meta").save_pretrained(tmp_path / "out", format="transformers")


def test_partial_rotary_attention_is_refused(tmp_path):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=1, layer_pattern="Fm",
                      parallel_hybrid=ParallelHybridConfig(attention=AttentionConfig(num_heads=4, rotary_emb_dim=4),
                                                           mamba2=Mamba2Config(d_state=4, headdim=16)))
    with pytest.raises(ValueError, match="rotate whole heads"):
        LanguageModel(cfg, device="meta").save_pretrained(tmp_path / "out", format="transformers")


@pytest.mark.parametrize("settings", [
    {"embedding_multiplier": 2.0}, {"logits_multiplier": 0.5},
    {"mamba2": Mamba2Config(headdim=16, d_inner=48)}, {"mlp": MLPConfig(d_intermediate=8, down_multiplier=0.5)},
])
def test_other_formats_refuse_falcon_h1_settings(tmp_path, settings):
    base = {"mamba2": Mamba2Config(headdim=16), "mlp": MLPConfig(d_intermediate=8)}
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, layer_pattern="2m", **{**base, **settings})
    with pytest.raises(ValueError, match="only transformers' Falcon-H1"):
        LanguageModel(cfg, device="meta").save_pretrained(tmp_path / "out", format="transformers")


@pytest.mark.parametrize(("preset", "count"), [("falcon-h1-0.5b", 521_411_104), ("falcon-h1-1.5b", 1_554_789_760)])
def test_presets_have_transformers_parameter_counts(capsys, preset, count):
    from ssmkit.cli import main
    from ssmkit.models.presets import get_preset

    cfg = get_preset(preset)
    ours = LanguageModel(cfg, device="meta")
    raw = falcon_h1_config_to_transformers(cfg, cfg.padded_vocab_size)
    with torch.device("meta"):
        hf = transformers.FalconH1ForCausalLM(transformers.FalconH1Config(**raw))
    hf_count = sum(p.numel() for p in hf.parameters())
    assert sum(p.numel() for p in ours.parameters()) == hf_count == count
    assert main(["info", "--preset", preset, "--context", "4096"]) == 0
    assert f"parameters: {count:,}" in capsys.readouterr().out


def test_convert_cli_round_trip(hf_folder, tmp_path):
    hf, folder = hf_folder
    again = convert_there_and_back(folder, tmp_path, transformers.FalconH1ForCausalLM)
    ids = token_ids(67, (1, 13), 6)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "falcon_h1"
