"""Nemotron-H checkpoints: transformers' NemotronHForCausalLM <-> ssmkit hybrid LanguageModel (per-layer
pattern of Mamba-2, attention and squared-ReLU MLP layers): same logits, same greedy tokens, decode equal to
the parallel forward, in both directions; unsupported config values name their field."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "NemotronHForCausalLM"):
    pytest.skip("this transformers release has no NemotronHForCausalLM", allow_module_level=True)

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

from ssmkit.interop import CheckpointError, load_transformers_checkpoint
from ssmkit.layers import Attention, Mamba2
from ssmkit.layers.ungated_mlp import UngatedMLP, UngatedMLPConfig
from ssmkit.models import AttentionConfig, LanguageModel, Mamba2Config, ModelConfig
from ssmkit.testing import relative_error

# "M-M*-MM-*": Mamba-2 and attention layers, MLP layers after both, a Mamba layer without one; GQA 4/2 with
# head_dim 12 (not hidden / heads), 3 SSM groups of 2 heads, d_inner 2x hidden, biases on the Mamba
# projections and the MLP, a dt limit and a non-default eps, so a dropped field shows in the logits.
NEMOTRON = {
    "vocab_size": 67, "hidden_size": 24, "hybrid_override_pattern": "M-M*-MM-*", "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 12, "intermediate_size": 40, "mlp_hidden_act": "relu2", "mlp_bias": True,
    "ssm_state_size": 6, "mamba_num_heads": 6, "mamba_head_dim": 8, "n_groups": 3, "conv_kernel": 3,
    "chunk_size": 8, "use_bias": True, "use_conv_bias": True, "time_step_limit": (0.01, 5.0),
    "layer_norm_epsilon": 1e-4, "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": None,
    "pad_token_id": None,
}


def hf_nemotron(seed: int = 0, **overrides) -> transformers.NemotronHForCausalLM:
    return random_hf_model(transformers.NemotronHForCausalLM, transformers.NemotronHConfig,
                           {**NEMOTRON, **overrides}, seed, randomize_hybrid_)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return saved_hf_folder(tmp_path_factory, hf_nemotron(), "nemotron_h")


def test_loaded_config_and_modules(hf_folder):
    _, folder = hf_folder
    model = LanguageModel.from_pretrained(folder)
    cfg = model.config
    assert (cfg.layer_pattern, cfg.n_layer) == ("2u2Au22uA", 6)
    kinds = [(type(b.mixer), None if b.ff is None else type(b.ff)) for b in model.layers]
    assert kinds == [(Mamba2, UngatedMLP), (Mamba2, None), (Attention, UngatedMLP), (Mamba2, None),
                     (Mamba2, UngatedMLP), (Attention, None)]
    a, m, f = cfg.attention, cfg.mamba2, cfg.ungated_mlp
    assert (a.num_heads, a.num_heads_kv, a.head_dim, a.rotary_emb_dim, a.bias) == (4, 2, 12, 0, False)
    assert (m.expand, m.headdim, m.ngroups, m.d_state, m.d_conv, m.bias, m.dt_limit) == (
        2, 8, 3, 6, 3, True, (0.01, 5.0))
    assert (f.d_intermediate, f.activation, f.bias) == (40, "relu2", True)
    assert cfg.norm_eps == 1e-4 and not cfg.residual_in_fp32 and not cfg.tie_embeddings
    mixer = model.layers[0].mixer
    assert mixer.norm.group_size == 16 and mixer.norm.eps == 1e-4


def test_transformers_to_ssmkit_logits_and_greedy_tokens(hf_folder):
    hf, folder = hf_folder
    model = LanguageModel.from_pretrained(folder).eval()
    assert_same_logits_and_greedy_tokens(hf, model, token_ids(67, (2, 23), 3), 9)


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu", "gelu_pytorch_tanh"])
def test_other_mlp_activations_match(tmp_path, activation):
    hf = hf_nemotron(2, mlp_hidden_act=activation, mlp_bias=False, use_bias=False, hybrid_override_pattern="*-M-")
    hf.save_pretrained(tmp_path / "hf")
    model = LanguageModel.from_pretrained(tmp_path / "hf").eval()
    assert model.config.ungated_mlp.activation == activation and model.config.layer_pattern == "Au2u"
    ids = token_ids(67, (2, 11), 4)
    with torch.no_grad():
        assert relative_error(model(ids).logits, hf(ids).logits) <= 1e-4


def test_decode_equals_parallel_forward(hf_folder):
    _, folder = hf_folder
    model = LanguageModel.from_pretrained(folder).eval()
    assert_decode_equals_parallel_forward(model, token_ids(67, (2, 17), 5), 7)


def test_sharded_and_module_named_folders_are_read(hf_folder, tmp_path):
    hf, folder = hf_folder
    whole = assert_sharded_folder_is_read(hf, folder, tmp_path / "sharded")
    # The module names ("model." rather than the "backbone." that save_pretrained writes), and MTP tensors.
    renamed = {n.replace("backbone.", "model.", 1): t for n, t in load_file(str(folder / "model.safetensors")).items()}
    renamed["mtp.layers.0.norm.weight"] = torch.ones(24)
    write_checkpoint(tmp_path / "renamed", json.loads((folder / "config.json").read_text()), renamed)
    _, again = load_transformers_checkpoint(tmp_path / "renamed")
    assert again.keys() == whole.keys() and all(torch.equal(whole[n], again[n]) for n in whole)


def ssmkit_nemotron(tie: bool) -> LanguageModel:
    # vocab 72: no padding rows, so both sides generate over the same vocabulary.
    torch.manual_seed(5)
    cfg = ModelConfig(vocab_size=72, d_model=32, n_layer=4, layer_pattern="2uA2Au",
                      mamba2=Mamba2Config(d_state=4, headdim=16, ngroups=2, chunk_size=16, d_conv=4),
                      attention=AttentionConfig(num_heads=4, num_heads_kv=1),
                      ungated_mlp=UngatedMLPConfig(d_intermediate=24), norm_eps=1e-6, tie_embeddings=tie,
                      residual_in_fp32=False)
    return randomize_hybrid_(LanguageModel(cfg), 7).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_ssmkit_to_transformers_and_back(tmp_path, tie):
    model = ssmkit_nemotron(tie)
    model.save_pretrained(tmp_path / "out", format="transformers")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["model_type"] == "nemotron_h"
    hf = transformers.NemotronHForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf.config.hybrid_override_pattern == "M-*M*-"
    assert_same_logits_and_greedy_tokens(hf, model, token_ids(72, (2, 19), 4), 6, same_vocab=True)
    again = LanguageModel.from_pretrained(tmp_path / "out")
    assert not again.config.tie_embeddings  # transformers' Nemotron-H never ties: the head is its own tensor
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name


@pytest.mark.parametrize(("change", "field"), [
    ({"hybrid_override_pattern": "-M*"}, "hybrid_override_pattern"),
    ({"hybrid_override_pattern": "M--"}, "hybrid_override_pattern"),
    ({"hybrid_override_pattern": "MEM"}, "hybrid_override_pattern"),
    ({"hybrid_override_pattern": "MX"}, "hybrid_override_pattern"),
    ({"layers_block_type": ["linear_attention", "moe"]}, "layers_block_type"),
    ({"layers_block_type": ["linear_attention", "conv"]}, "layers_block_type"),
    ({"mlp_hidden_act": "tanh"}, "mlp_hidden_act"),
    ({"mamba_hidden_act": "gelu"}, "mamba_hidden_act"),
    ({"mamba_num_heads": 5}, "mamba_num_heads"),
    ({"n_groups": 4}, "'n_groups' = 4: must divide mamba_num_heads"),
    ({"time_step_limit": [1.0, 0.5]}, "time_step_limit"),
    ({"head_dim": 0}, "head_dim"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
])
def test_unsupported_config_values_name_the_field(hf_folder, tmp_path, change, field):
    _, folder = hf_folder
    raw = {k: v for k, v in json.loads((folder / "config.json").read_text()).items()
           if k not in ("layers_block_type", "hybrid_override_pattern")}
    raw["hybrid_override_pattern"] = NEMOTRON["hybrid_override_pattern"]
    write_checkpoint(tmp_path / "bad", {**raw, **change})
    with pytest.raises(CheckpointError, match=field):
        LanguageModel.from_pretrained(tmp_path / "bad")


def test_mis_shaped_tensors_name_the_tensor(hf_folder, tmp_path):
    _, folder = hf_folder
    raw = json.loads((folder / "config.json").read_text())
    write_checkpoint(tmp_path / "short", {**raw, "ssm_state_size": 7}, load_file(str(folder / "model.safetensors")))
    with pytest.raises(CheckpointError, match=r"backbone.layers.0.mixer.in_proj.weight has shape"):
        LanguageModel.from_pretrained(tmp_path / "short")


@pytest.mark.parametrize("pattern", ["2uAm", "2uMu", "2uWu", "2uAe"])
def test_models_nemotron_h_cannot_express_are_not_saved_as_it(tmp_path, pattern):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, layer_pattern=pattern,
                      mamba2=Mamba2Config(d_state=4, headdim=16), attention=AttentionConfig(num_heads=4))
    with pytest.raises(ValueError, match="cannot be saved as transformers"):
        LanguageModel(cfg, device="meta").save_pretrained(tmp_path / "out", format="transformers")


def test_attention_with_rotary_is_refused(tmp_path):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, layer_pattern="2uAu", mamba2=Mamba2Config(headdim=16),
                      attention=AttentionConfig(num_heads=4, rotary_emb_dim=8))
    with pytest.raises(ValueError, match="Nemotron-H: attention must have no rotary embedding"):
        LanguageModel(cfg, device="meta").save_pretrained(tmp_path / "out", format="transformers")


def test_nemotron_h_8b_preset_has_transformers_parameter_count(capsys):
    from ssmkit.cli import main
    from ssmkit.models.formats.nemotron_h import nemotron_h_config_to_transformers
    from ssmkit.models.presets import get_preset

    cfg = get_preset("nemotron-h-8b")
    ours = LanguageModel(cfg, device="meta")
    raw = nemotron_h_config_to_transformers(cfg, cfg.padded_vocab_size)
    hf_config = transformers.NemotronHConfig(**raw)
    assert hf_config.hybrid_override_pattern == "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
    with torch.device("meta"):
        hf = transformers.NemotronHForCausalLM(hf_config)
    count = sum(p.numel() for p in hf.parameters())
    assert sum(p.numel() for p in ours.parameters()) == count == 8_100_852_736
    assert main(["info", "--preset", "nemotron-h-8b", "--context", "8192"]) == 0
    assert f"parameters: {count:,}" in capsys.readouterr().out


def test_convert_cli_round_trip(hf_folder, tmp_path):
    hf, folder = hf_folder
    again = convert_there_and_back(folder, tmp_path, transformers.NemotronHForCausalLM)
    ids = token_ids(67, (1, 13), 6)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)
    assert again.config.hybrid_override_pattern == NEMOTRON["hybrid_override_pattern"]


def test_nemotron_h_tiny_preset_decodes_like_the_parallel_forward():
    from ssmkit.models.presets import get_preset

    torch.manual_seed(0)
    model = randomize_hybrid_(LanguageModel(get_preset("nemotron-h-tiny")), 3).eval()
    assert_decode_equals_parallel_forward(model, token_ids(256, (2, 30), 8), 11)
