"""Bamba checkpoints: transformers' BambaForCausalLM <-> ssmkit hybrid LanguageModel (Mamba-2 with grouped
gated norms, partial-rotary attention at configured layers, SwiGLU MLPs): same logits, same greedy tokens,
decode equal to the parallel forward, in both directions; unsupported config values name their field."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "BambaForCausalLM"):
    pytest.skip("this transformers release has no BambaForCausalLM", allow_module_level=True)

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
from ssmkit.layers import Attention, Mamba2
from ssmkit.models import (
    AttentionConfig,
    LanguageModel,
    Mamba2Config,
    MLPConfig,
    ModelConfig,
)

# 5 layers, attention at 1 and 4; GQA 4/2 with head_dim 12 (not hidden / heads) and a non-default rotary
# fraction and base; Mamba-2 with 2 groups (so the gated norm has 2 groups), 6 heads of 8, d_state 6, conv 3,
# projection biases (Mamba, attention, MLP) and a dt limit; non-default eps, so a dropped field shows in the logits.
BAMBA = {
    "vocab_size": 67, "hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 5, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 12, "attn_layer_indices": [1, 4], "mamba_n_heads": 6, "mamba_d_head": 8,
    "mamba_n_groups": 2, "mamba_d_state": 6, "mamba_d_conv": 3, "mamba_expand": 2, "mamba_chunk_size": 8,
    "mamba_conv_bias": True, "mamba_proj_bias": True, "time_step_limit": (0.01, 5.0), "attention_bias": True,
    "mlp_bias": True, "rms_norm_eps": 1e-4, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5},
    "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
}


def hf_bamba(seed: int = 0, **overrides) -> transformers.BambaForCausalLM:
    return random_hf_model(transformers.BambaForCausalLM, transformers.BambaConfig, {**BAMBA, **overrides}, seed,
                           randomize_hybrid_)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return saved_hf_folder(tmp_path_factory, hf_bamba(), "bamba")


def test_loaded_config_and_modules(hf_folder):
    _, folder = hf_folder
    model = LanguageModel.from_pretrained(folder)
    cfg = model.config
    assert cfg.layer_pattern == "2mAm2m2mAm"
    assert [isinstance(b.mixer, Attention) for b in model.layers] == [i in (1, 4) for i in range(5)]
    a, m = cfg.attention, cfg.mamba2
    assert (a.num_heads, a.num_heads_kv, a.head_dim, a.rotary_emb_dim, a.rotary_emb_base, a.bias) == (
        4, 2, 12, 6, 500.0, True)
    assert (m.headdim, m.ngroups, m.d_state, m.d_conv, m.chunk_size, m.bias, m.dt_limit) == (
        8, 2, 6, 3, 8, True, (0.01, 5.0))
    assert cfg.norm_eps == 1e-4 and not cfg.residual_in_fp32 and not cfg.tie_embeddings and cfg.mlp.bias
    mixer = model.layers[0].mixer
    assert isinstance(mixer, Mamba2) and mixer.norm.group_size == 24 and mixer.norm.eps == 1e-4


def test_transformers_to_ssmkit_logits_and_greedy_tokens(hf_folder):
    hf, folder = hf_folder
    model = LanguageModel.from_pretrained(folder).eval()
    assert_same_logits_and_greedy_tokens(hf, model, token_ids(67, (2, 23), 3), 9)


def test_decode_equals_parallel_forward(hf_folder):
    _, folder = hf_folder
    model = LanguageModel.from_pretrained(folder).eval()
    assert_decode_equals_parallel_forward(model, token_ids(67, (2, 17), 5), 7)


def test_sharded_folder_is_read(hf_folder, tmp_path):
    hf, folder = hf_folder
    assert_sharded_folder_is_read(hf, folder, tmp_path / "sharded")


def ssmkit_bamba(tie: bool = True) -> LanguageModel:
    # vocab 72: no padding rows, so both sides generate over the same vocabulary.
    torch.manual_seed(5)
    cfg = ModelConfig(vocab_size=72, d_model=32, n_layer=4, layer_pattern="2mAm",
                      mamba2=Mamba2Config(d_state=4, headdim=16, ngroups=2, chunk_size=16, d_conv=4),
                      attention=AttentionConfig(num_heads=4, num_heads_kv=1, rotary_emb_dim=8,
                                                rotary_emb_base=1000.0),
                      mlp=MLPConfig(d_intermediate=24, bias=not tie), norm_eps=1e-6, tie_embeddings=tie,
                      residual_in_fp32=False)
    return randomize_hybrid_(LanguageModel(cfg), 7).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_ssmkit_to_transformers_and_back(tmp_path, tie):
    model = ssmkit_bamba(tie)
    model.save_pretrained(tmp_path / "out", format="transformers")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (raw["model_type"], raw["attn_layer_indices"], raw["mamba_n_groups"]) == ("bamba", [1, 3], 2)
    hf = transformers.BambaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf.config.layers_block_type == ["linear_attention", "full_attention"] * 2
    assert_same_logits_and_greedy_tokens(hf, model, token_ids(72, (2, 19), 4), 6, same_vocab=True)
    again = LanguageModel.from_pretrained(tmp_path / "out")
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name


@pytest.mark.parametrize(("change", "field"), [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": "yes"}, "mlp_bias"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10.0, "factor": 2.0}}, "rope_type"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10.0, "partial_rotary_factor": 0.1}},
     "partial_rotary_factor"),
    ({"attn_layer_indices": [7]}, "attn_layer_indices"),
    ({"mamba_n_heads": 5}, "mamba_n_heads"),
    ({"time_step_limit": [1.0, 0.5]}, "time_step_limit"),
    ({"mamba_n_groups": 4}, "mamba_n_groups"),
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


@pytest.mark.parametrize(("pattern", "n_layer"), [("2mA", 2), ("2mWm", 2), ("2mAe", 2), ("2mMm", 2)])
def test_models_bamba_cannot_express_are_refused(tmp_path, pattern, n_layer):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=n_layer, layer_pattern=pattern,
                      mamba2=Mamba2Config(d_state=4, headdim=16), attention=AttentionConfig(num_heads=4,
                                                                                           rotary_emb_dim=8))
    model = LanguageModel(cfg, device="meta")
    with pytest.raises(ValueError, match="cannot be saved as transformers' Bamba.*'2m' or 'Am'"):
        model.save_pretrained(tmp_path / "out", format="transformers")


def test_attention_without_rotary_is_refused():
    # (save_pretrained writes such a model as Granite-4.0's granitemoehybrid, which has NoPE attention)
    from ssmkit.models.formats.bamba import bamba_config_to_transformers

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, layer_pattern="2mAm", mamba2=Mamba2Config(headdim=16),
                      attention=AttentionConfig(num_heads=4))
    with pytest.raises(ValueError, match="rotary_emb_dim"):
        bamba_config_to_transformers(cfg, 64)


def test_bamba_9b_preset_has_transformers_parameter_count(capsys):
    from ssmkit.cli import main
    from ssmkit.models.formats.bamba import bamba_config_to_transformers
    from ssmkit.models.presets import get_preset

    cfg = get_preset("bamba-9b")
    ours = LanguageModel(cfg, device="meta")
    raw = bamba_config_to_transformers(cfg, cfg.padded_vocab_size)
    assert raw["attn_layer_indices"] == [9, 18, 27] and raw["mamba_n_heads"] == 128
    with torch.device("meta"):
        hf = transformers.BambaForCausalLM(transformers.BambaConfig(**raw))
    count = sum(p.numel() for p in hf.parameters())
    assert sum(p.numel() for p in ours.parameters()) == count == 9_780_235_392
    assert main(["info", "--preset", "bamba-9b", "--context", "4096"]) == 0
    assert f"parameters: {count:,}" in capsys.readouterr().out


def test_convert_cli_round_trip(hf_folder, tmp_path):
    hf, folder = hf_folder
    again = convert_there_and_back(folder, tmp_path, transformers.BambaForCausalLM)
    ids = token_ids(67, (1, 13), 6)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "bamba"


def test_bamba_tiny_preset_decodes_like_the_parallel_forward():
    from ssmkit.models.presets import get_preset

    torch.manual_seed(0)
    model = randomize_hybrid_(LanguageModel(get_preset("bamba-tiny")), 3).eval()
    assert_decode_equals_parallel_forward(model, token_ids(256, (2, 30), 8), 11)

