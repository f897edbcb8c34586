"""Zamba2 checkpoints: transformers' Zamba2ForCausalLM <-> ssmkit LanguageModel of Mamba-2 and shared-transformer
hybrid (Z) layers: same logits, same greedy tokens, decode equal to the parallel forward, in both directions;
the shared blocks are one set of parameters; unsupported config values name their field."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Zamba2ForCausalLM"):
    pytest.skip("this transformers release has no Zamba2ForCausalLM", allow_module_level=True)

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
from ssmkit.layers import Mamba2
from ssmkit.layers.shared_transformer import SharedTransformerConfig
from ssmkit.layers.shared_transformer_mamba2 import SharedTransformerMamba2
from ssmkit.models import LanguageModel, Mamba2Config, ModelConfig

NO_TOKENS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
# 7 layers, three hybrid calls of two shared blocks (so block 0 is called twice); attention adapters and RoPE
# (base 500) on; MLP and Mamba projection biases; a non-default activation; Mamba-2 with 2 groups of 6 heads,
# d_state 6, conv 3, a Δ floor (time_step_min) that clamps; tied head (transformers ties the blocks then).
ZAMBA2 = {
    "vocab_size": 67, "hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 7,
    "layers_block_type": ["mamba", "hybrid", "mamba", "hybrid", "mamba", "linear_attention", "hybrid"],
    "num_attention_heads": 4, "mamba_d_state": 6, "mamba_d_conv": 3, "mamba_expand": 2, "n_mamba_heads": 6,
    "mamba_ngroups": 2, "chunk_size": 8, "add_bias_linear": True, "hidden_act": "gelu_pytorch_tanh",
    "num_mem_blocks": 2, "use_shared_attention_adapter": True, "adapter_rank": 5, "use_mem_rope": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}, "time_step_min": 0.05,
    "tie_word_embeddings": True, **NO_TOKENS,
}
# The other options: grouped KV heads (4 / 2) of a head_dim that is not 2 * hidden / heads, no RoPE, no
# attention adapters, an untied head (one hybrid call per block), more blocks than calls, no biases.
ZAMBA2_GQA = {
    "vocab_size": 61, "hidden_size": 16, "intermediate_size": 20, "num_hidden_layers": 3,
    "layers_block_type": ["hybrid", "mamba", "hybrid"],
    "num_attention_heads": 4, "num_key_value_heads": 2, "attention_head_dim": 6, "mamba_d_state": 5,
    "mamba_d_conv": 4, "mamba_expand": 2, "n_mamba_heads": 4, "mamba_ngroups": 1, "chunk_size": 4,
    "hidden_act": "silu", "num_mem_blocks": 3, "adapter_rank": 3, "use_mem_rope": False,
    "tie_word_embeddings": False, **NO_TOKENS,
}


def hf_zamba2(kwargs: dict, seed: int = 0) -> transformers.Zamba2ForCausalLM:
    return random_hf_model(transformers.Zamba2ForCausalLM, transformers.Zamba2Config, kwargs, seed, randomize_hybrid_)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return saved_hf_folder(tmp_path_factory, hf_zamba2(ZAMBA2), "zamba2")


def test_loaded_config_modules_and_shared_parameters(hf_folder):
    hf, folder = hf_folder
    model = LanguageModel.from_pretrained(folder)
    cfg, s = model.config, model.config.shared_transformer
    assert cfg.layer_pattern == "2Z2Z22Z" and cfg.tie_embeddings and not cfg.residual_in_fp32
    assert (s.num_blocks, s.num_heads, s.head_size(24), s.rotary_emb_dim, s.rotary_emb_base, s.adapter_rank) == (
        2, 4, 12, 12, 500.0, 5)
    assert (s.activation, s.mlp_bias, s.attention_adapters, s.mlp_width(24)) == ("gelu_pytorch_tanh", True, True, 40)
    m = cfg.mamba2
    assert (m.headdim, m.ngroups, m.d_state, m.d_conv, m.bias, m.dt_limit) == (8, 2, 6, 3, True, (0.05, float("inf")))
    calls = [b.mixer for b in model.layers if isinstance(b.mixer, SharedTransformerMamba2)]
    assert [c.block_index for c in calls] == [0, 1, 0]
    assert calls[0].shared is calls[2].shared is model.shared["shared_transformer_mamba2"][0]
    assert isinstance(model.layers[0].mixer, Mamba2) and model.layers[0].mixer.norm.eps == 1e-5
    # One set of shared parameters, counted once, as transformers counts its tied blocks.
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    assert not any(n.startswith("layers.") and "shared" in n for n in model.state_dict())


def test_transformers_to_ssmkit_logits_and_greedy_tokens(hf_folder):
    hf, folder = hf_folder
    model = LanguageModel.from_pretrained(folder).eval()
    assert_same_logits_and_greedy_tokens(hf, model, token_ids(67, (2, 23), 3), 9)


def test_grouped_heads_untied_head_and_unused_blocks(tmp_path_factory):
    hf, folder = saved_hf_folder(tmp_path_factory, hf_zamba2(ZAMBA2_GQA, seed=4), "zamba2_gqa")
    model = LanguageModel.from_pretrained(folder).eval()
    s = model.config.shared_transformer
    assert (s.num_blocks, s.num_heads_kv, s.head_dim, s.rotary_emb_dim, s.attention_adapters) == (2, 2, 6, 0, False)
    assert_same_logits_and_greedy_tokens(hf, model, token_ids(61, (2, 21), 5), 7)
    assert_decode_equals_parallel_forward(model, token_ids(61, (2, 15), 6), 5)


def test_decode_equals_parallel_forward(hf_folder):
    _, folder = hf_folder
    model = LanguageModel.from_pretrained(folder).eval()
    assert_decode_equals_parallel_forward(model, token_ids(67, (2, 17), 5), 7)


def test_packed_documents_restart_every_state(hf_folder):
    """seq_idx restarts the shared attention's keys and positions with the Mamba-2 states: a packed row's
    second document gives the logits it gives alone."""
    _, folder = hf_folder
    model = LanguageModel.from_pretrained(folder).eval()
    a, b = token_ids(67, (1, 7), 1), token_ids(67, (1, 9), 2)
    seq_idx = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), seq_idx=seq_idx).logits
        alone = model(b).logits
    torch.testing.assert_close(packed[:, 7:], alone, rtol=1e-4, atol=1e-5)


def test_sharded_folder_is_read(hf_folder, tmp_path):
    hf, folder = hf_folder
    assert_sharded_folder_is_read(hf, folder, tmp_path / "sharded")


def test_tied_copies_of_shared_blocks_are_accepted_when_equal(hf_folder, tmp_path):
    """A checkpoint holding the shared block again under its later calls (every tied name) reads the same; a
    copy that differs from the block it is tied to is an error naming both tensors."""
    _, folder = hf_folder
    raw = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    copies = {n.replace("layers.1.", "layers.6.", 1): t.clone() for n, t in weights.items()
              if n.startswith("model.layers.1.shared_transformer.")}
    write_checkpoint(tmp_path / "all", raw, {**weights, **copies})
    again = LanguageModel.from_pretrained(tmp_path / "all")
    for name, t in LanguageModel.from_pretrained(folder).state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
    name = "model.layers.6.shared_transformer.self_attn.q_proj.weight"
    copies[name] = copies[name] + 1
    write_checkpoint(tmp_path / "bad", raw, {**weights, **copies})
    with pytest.raises(CheckpointError, match=r"layers\.6\.shared_transformer\.self_attn\.q_proj\.weight differs"):
        LanguageModel.from_pretrained(tmp_path / "bad")


def ssmkit_zamba2(tie: bool = True, adapters: bool = True) -> LanguageModel:
    # vocab 72: no padding rows, so both sides generate over the same vocabulary.
    torch.manual_seed(5)
    cfg = ModelConfig(vocab_size=72, d_model=32, n_layer=6, layer_pattern="Z2Z2" + ("Z2" if tie else "22"),
                      mamba2=Mamba2Config(d_state=4, headdim=16, ngroups=2, chunk_size=16, d_conv=4,
                                          dt_limit=(0.01, float("inf")), bias=not tie),
                      shared_transformer=SharedTransformerConfig(
                          num_blocks=2, num_heads=4, num_heads_kv=4 if adapters else 2, rotary_emb_dim=16,
                          rotary_emb_base=1000.0, d_intermediate=24, mlp_bias=not tie, adapter_rank=3,
                          attention_adapters=adapters, activation="gelu"),
                      norm_eps=1e-5, tie_embeddings=tie, residual_in_fp32=False, pad_vocab_size_multiple=1)
    return randomize_hybrid_(LanguageModel(cfg), 7).eval()


@pytest.mark.parametrize(("tie", "adapters"), [(True, True), (False, False)])
def test_ssmkit_to_transformers_and_back(tmp_path, tie, adapters):
    model = ssmkit_zamba2(tie, adapters)
    model.save_pretrained(tmp_path / "out", format="transformers")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (raw["model_type"], raw["num_mem_blocks"], raw["use_shared_attention_adapter"]) == ("zamba2", 2, adapters)
    hf = transformers.Zamba2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf.config.hybrid_layer_ids == ([0, 2, 4] if tie else [0, 2])
    assert_same_logits_and_greedy_tokens(hf, model, token_ids(72, (2, 19), 4), 6, same_vocab=True)
    again = LanguageModel.from_pretrained(tmp_path / "out")
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name


@pytest.mark.parametrize(("change", "field"), [
    ({"hidden_act": "quick_gelu"}, "hidden_act"),
    ({"add_bias_linear": "yes"}, "add_bias_linear"),
    ({"rms_norm_eps": 1e-6}, "rms_norm_eps"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10.0, "factor": 2.0}}, "rope_type"),
    ({"layers_block_type": ["m", "g", "m", "g", "m", "m", "g"]}, "layers_block_type"),
    ({"num_hidden_layers": 6}, "num_hidden_layers"),
    ({"hybrid_layer_ids": [1, 3]}, "hybrid_layer_ids"),
    ({"mamba_headdim": 4}, "mamba_headdim"),
    ({"attention_hidden_size": 40}, "attention_hidden_size"),
    ({"n_mamba_heads": 5}, "n_mamba_heads"),
    ({"mamba_ngroups": 4}, "mamba_ngroups"),
    ({"num_key_value_heads": 2}, "use_shared_attention_adapter"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings"),
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


@pytest.mark.parametrize(("pattern", "change", "message"), [
    ("2A", {}, "'2'.*'Z'"),
    ("Z2", {"norm_eps": 1e-6}, "norm_eps"),
    ("Z2", {"shared_transformer": SharedTransformerConfig(num_heads=4, rotary_emb_dim=4)}, "rotary_emb_dim"),
    ("Z2", {"mamba2": Mamba2Config(headdim=16, bias=True)}, "add_bias_linear"),
    ("ZZ2", {"tie_embeddings": False}, "untied head"),
])
def test_models_zamba2_cannot_express_are_refused(tmp_path, pattern, change, message):
    base = {"mamba2": Mamba2Config(headdim=16), "shared_transformer": SharedTransformerConfig(num_heads=4)}
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=len(pattern), layer_pattern=pattern,
                      **{**base, **change})
    if "A" in pattern:
        cfg.attention.num_heads = 4
    model = LanguageModel(cfg, device="meta")
    from ssmkit.models.formats.zamba2 import save_zamba2_checkpoint

    with pytest.raises(ValueError, match=f"cannot be saved as transformers' Zamba2.*{message}"):
        save_zamba2_checkpoint(model, tmp_path / "out")


@pytest.mark.parametrize("preset", ["zamba2-1.2b", "zamba2-2.7b"])
def test_presets_have_transformers_parameter_count(capsys, preset):
    from ssmkit.cli import main
    from ssmkit.models.formats.zamba2 import zamba2_config_to_transformers
    from ssmkit.models.presets import get_preset

    cfg = get_preset(preset)
    ours = LanguageModel(cfg, device="meta")
    raw = zamba2_config_to_transformers(cfg, cfg.padded_vocab_size)
    with torch.device("meta"):
        hf = transformers.Zamba2ForCausalLM(transformers.Zamba2Config(**raw))
    count = sum(p.numel() for p in hf.parameters())
    assert sum(p.numel() for p in ours.parameters()) == count
    assert hf.config.hybrid_layer_ids == [i for i, c in enumerate(cfg.layer_pattern) if c == "Z"]
    assert main(["info", "--preset", preset, "--context", "4096"]) == 0
    assert f"parameters: {count:,}" in capsys.readouterr().out


def test_convert_cli_round_trip(hf_folder, tmp_path):
    hf, folder = hf_folder
    again = convert_there_and_back(folder, tmp_path, transformers.Zamba2ForCausalLM)
    ids = token_ids(67, (1, 13), 6)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "zamba2"


def test_zamba2_tiny_preset_decodes_like_the_parallel_forward():
    from ssmkit.models.presets import get_preset

    # Its own initialisation: randomize_hybrid_'s weights on these sizes make activations large enough that
    # float32 rounding alone moves the logits by 2e-4 (float64 agrees to 5e-13).
    torch.manual_seed(0)
    model = LanguageModel(get_preset("zamba2-tiny")).eval()
    assert_decode_equals_parallel_forward(model, token_ids(256, (2, 30), 8), 11)
