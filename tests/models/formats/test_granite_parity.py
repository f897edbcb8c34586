"""Granite-4.0 hybrid checkpoints: transformers' GraniteMoeHybridForCausalLM <-> ssmkit hybrid LanguageModel
(Mamba-2 with grouped gated norms, attention with or without RoPE, experts with top-k softmax routing plus a
shared MLP or the shared MLP alone, embedding / residual / attention / logits multipliers): same logits, same
greedy tokens, decode equal to the parallel forward, in both directions; unsupported config values name their
field."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "GraniteMoeHybridForCausalLM"):
    pytest.skip("this transformers release has no GraniteMoeHybridForCausalLM", allow_module_level=True)

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
from safetensors.torch import load_file, save_file

from ssmkit.interop import CheckpointError
from ssmkit.layers import Attention, Mamba2, MoE
from ssmkit.models import (
    AttentionConfig,
    LanguageModel,
    Mamba2Config,
    MLPConfig,
    ModelConfig,
    MoEConfig,
)

# 5 layers, attention at 1 and 4 with RoPE (base 500) over whole heads of 12 (not hidden / heads), GQA 4/2 and
# biases; Mamba-2 with 2 groups, 6 heads of 8, d_state 6, conv 3, projection biases and a dt limit; 6 experts of
# 20, top 3, plus a shared MLP of 28; every multiplier away from 1 and a non-default eps, so a dropped or
# mis-mapped field shows in the logits.
GRANITE = {
    "vocab_size": 67, "hidden_size": 24, "intermediate_size": 20, "shared_intermediate_size": 28,
    "num_hidden_layers": 5, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12,
    "layer_types": ["mamba", "attention", "mamba", "mamba", "attention"], "num_local_experts": 6,
    "num_experts_per_tok": 3, "mamba_n_heads": 6, "mamba_d_head": 8, "mamba_n_groups": 2, "mamba_d_state": 6,
    "mamba_d_conv": 3, "mamba_expand": 2, "mamba_chunk_size": 8, "mamba_conv_bias": True, "mamba_proj_bias": True,
    "time_step_limit": (0.01, 5.0), "attention_bias": True, "rms_norm_eps": 1e-4, "tie_word_embeddings": False,
    "position_embedding_type": "rope", "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
    "embedding_multiplier": 3.0, "residual_multiplier": 0.4, "attention_multiplier": 0.2, "logits_scaling": 2.5,
    "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
}
# The dense kind (no experts: the shared MLP alone), no positional encoding, a tied head, the new layer-type names,
# head_dim, mamba_d_head and the KV heads left to their defaults.
DENSE = {**{k: v for k, v in GRANITE.items() if k != "head_dim"}, "num_local_experts": 0, "num_experts_per_tok": 0,
         "position_embedding_type": "nope", "mamba_d_head": "auto", "num_key_value_heads": None,
         "tie_word_embeddings": True, "mamba_proj_bias": False, "mamba_conv_bias": False, "attention_bias": False,
         "layer_types": ["full_attention", "linear_attention", "linear_attention", "full_attention",
                         "linear_attention"]}
CONFIGS = {"moe": GRANITE, "dense": DENSE}


def hf_granite(kind: str = "moe", seed: int = 0, **overrides) -> transformers.GraniteMoeHybridForCausalLM:
    return random_hf_model(transformers.GraniteMoeHybridForCausalLM, transformers.GraniteMoeHybridConfig,
                           {**CONFIGS[kind], **overrides}, seed, randomize_hybrid_)


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    return saved_hf_folder(tmp_path_factory, hf_granite("moe"), "granite_moe")


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    return saved_hf_folder(tmp_path_factory, hf_granite("dense"), "granite_dense")


@pytest.fixture(params=sorted(CONFIGS))
def hf_folder(request):
    return request.getfixturevalue(f"{request.param}_folder")


def test_loaded_config_and_modules(moe_folder):
    _, folder = moe_folder
    model = LanguageModel.from_pretrained(folder)
    cfg = model.config
    assert cfg.layer_pattern == "2eAe2e2eAe"
    assert [isinstance(b.mixer, Attention) for b in model.layers] == [i in (1, 4) for i in range(5)]
    a, m, moe = cfg.attention, cfg.mamba2, cfg.moe
    assert (a.num_heads, a.num_heads_kv, a.head_dim, a.rotary_emb_dim, a.rotary_emb_base, a.bias,
            a.softmax_scale) == (4, 2, 12, 12, 500.0, True, 0.2)
    assert (m.headdim, m.ngroups, m.d_state, m.d_conv, m.bias, m.dt_limit) == (8, 2, 6, 3, True, (0.01, 5.0))
    assert (moe.num_experts, moe.top_k, moe.d_intermediate, moe.shared_d_intermediate, moe.router_softmax) == (
        6, 3, 20, 28, "top_k")
    assert (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.logits_multiplier) == (3.0, 0.4, 1 / 2.5)
    assert cfg.norm_eps == 1e-4 and not cfg.residual_in_fp32 and not cfg.tie_embeddings
    assert isinstance(model.layers[0].ff, MoE) and model.layers[0].ff.shared_mlp is not None
    assert model.layers[1].mixer.softmax_scale == 0.2 and model.layers[0].residual_multiplier == 0.4
    mixer = model.layers[0].mixer
    assert isinstance(mixer, Mamba2) and mixer.norm.group_size == 24 and mixer.norm.eps == 1e-4


def test_dense_config_has_the_shared_mlp_alone(dense_folder):
    _, folder = dense_folder
    cfg = LanguageModel.from_pretrained(folder).config
    assert cfg.layer_pattern == "Am2m2mAm2m" and cfg.mlp.d_intermediate == 28
    assert cfg.attention.rotary_emb_dim == 0 and cfg.tie_embeddings


def test_transformers_to_ssmkit_logits_and_greedy_tokens(hf_folder):
    hf, folder = hf_folder
    model = LanguageModel.from_pretrained(folder).eval()
    assert_same_logits_and_greedy_tokens(hf, model, token_ids(67, (2, 23), 3), 9)


def test_decode_equals_parallel_forward(hf_folder):
    _, folder = hf_folder
    model = LanguageModel.from_pretrained(folder).eval()
    assert_decode_equals_parallel_forward(model, token_ids(67, (2, 17), 5), 7)


def test_sharded_folder_is_read(moe_folder, tmp_path):
    hf, folder = moe_folder
    assert_sharded_folder_is_read(hf, folder, tmp_path / "sharded")


def test_module_names_of_the_experts_are_read(moe_folder, tmp_path):
    """The fused MoE tensors under transformers' module names (``experts.gate_up_proj``, ``router.weight``),
    as ``state_dict()`` gives them, load the same state as the names ``save_pretrained`` writes."""
    hf, folder = moe_folder
    raw = json.loads((folder / "config.json").read_text())
    write_checkpoint(tmp_path / "modules", raw, {n: t.contiguous() for n, t in hf.state_dict().items()})
    assert any(n.endswith("experts.gate_up_proj") for n in load_file(str(tmp_path / "modules" / "model.safetensors")))
    a, b = LanguageModel.from_pretrained(folder), LanguageModel.from_pretrained(tmp_path / "modules")
    for name, t in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], t), name


def test_hub_style_config_fields_are_read(moe_folder, tmp_path):
    """config.json as the hub's Granite-4.0 folders write it: ``rope_theta`` and ``rope_scaling`` at the top
    level, ``layers_block_type`` for the layer types, and fields transformers ignores; transformers and ssmkit
    read the same function from it."""
    hf, folder = moe_folder
    raw = json.loads((folder / "config.json").read_text())
    raw["layers_block_type"] = raw.pop("layer_types")
    del raw["rope_parameters"]
    raw.update(rope_theta=500.0, rope_scaling=None, normalization_function="rmsnorm", init_method="mup",
               torch_dtype="float32", max_position_embeddings=4096)
    write_checkpoint(tmp_path / "hub", raw, load_file(str(folder / "model.safetensors")))
    model = LanguageModel.from_pretrained(tmp_path / "hub").eval()
    assert model.config.layer_pattern == "2eAe2e2eAe" and model.config.attention.rotary_emb_base == 500.0
    again = transformers.GraniteMoeHybridForCausalLM.from_pretrained(tmp_path / "hub").eval()
    ids = token_ids(67, (1, 15), 2)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)
        assert (model(ids).logits - hf(ids).logits).abs().max() <= 1e-4 * hf(ids).logits.abs().max()


def ssmkit_granite(ff: str = "e", tie: bool = True, rotary: int = 0) -> LanguageModel:
    # vocab 72: no padding rows, so both sides generate over the same vocabulary.
    torch.manual_seed(5)
    cfg = ModelConfig(vocab_size=72, d_model=32, n_layer=4, layer_pattern=f"2{ff}A{ff}",
                      mamba2=Mamba2Config(d_state=4, headdim=16, ngroups=2, chunk_size=16, d_conv=4),
                      attention=AttentionConfig(num_heads=4, num_heads_kv=1, rotary_emb_dim=rotary,
                                                rotary_emb_base=1000.0, softmax_scale=0.3),
                      mlp=MLPConfig(d_intermediate=24),
                      moe=MoEConfig(num_experts=5, top_k=2, d_intermediate=12, router_softmax="top_k",
                                    shared_d_intermediate=20),
                      norm_eps=1e-6, tie_embeddings=tie, residual_in_fp32=False, pad_vocab_size_multiple=1,
                      embedding_multiplier=2.0, residual_multiplier=0.5, logits_multiplier=0.25)
    return randomize_hybrid_(LanguageModel(cfg), 7).eval()


@pytest.mark.parametrize(("ff", "tie", "rotary"), [("e", True, 0), ("e", False, 8), ("m", False, 0)])
def test_ssmkit_to_transformers_and_back(tmp_path, ff, tie, rotary):
    model = ssmkit_granite(ff, tie, rotary)
    model.save_pretrained(tmp_path / "out", format="transformers")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (raw["model_type"], raw["layer_types"], raw["logits_scaling"]) == (
        "granitemoehybrid", ["mamba", "attention"] * 2, 4.0)
    assert raw["num_local_experts"] == (5 if ff == "e" else 0)
    hf = transformers.GraniteMoeHybridForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf.config.position_embedding_type == ("rope" if rotary else "nope")
    assert_same_logits_and_greedy_tokens(hf, model, token_ids(72, (2, 19), 4), 6, same_vocab=True)
    again = LanguageModel.from_pretrained(tmp_path / "out")
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name


@pytest.mark.parametrize(("change", "field"), [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"position_embedding_type": "alibi"}, "position_embedding_type"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10.0, "factor": 2.0}}, "rope_type"),
    ({"layer_types": ["mamba", "attention", "mamba", "mamba", "moe"]}, "layer_types"),
    ({"layer_types": ["mamba", "attention"]}, "layer_types"),
    ({"num_experts_per_tok": 7}, "num_experts_per_tok"),
    ({"num_local_experts": -1}, "num_local_experts"),
    ({"logits_scaling": 0}, "logits_scaling"),
    ({"embedding_multiplier": "12"}, "embedding_multiplier"),
    ({"residual_multiplier": -0.2}, "residual_multiplier"),
    ({"attention_multiplier": 0.0}, "attention_multiplier"),
    ({"router_aux_loss_coef": -1.0}, "router_aux_loss_coef"),
    ({"shared_intermediate_size": 0}, "shared_intermediate_size"),
    ({"mamba_n_heads": 5}, "mamba_n_heads"),
    ({"mamba_n_groups": 4}, "mamba_n_groups"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"time_step_limit": [1.0, 0.5]}, "time_step_limit"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
])
def test_unsupported_config_values_name_the_field(moe_folder, tmp_path, change, field):
    _, folder = moe_folder
    raw = json.loads((folder / "config.json").read_text())
    write_checkpoint(tmp_path / "bad", {**raw, **change})
    with pytest.raises(CheckpointError, match=field):
        LanguageModel.from_pretrained(tmp_path / "bad")


def test_mis_shaped_tensors_name_the_tensor(moe_folder, tmp_path):
    _, folder = moe_folder
    raw = json.loads((folder / "config.json").read_text())
    write_checkpoint(tmp_path / "short", {**raw, "intermediate_size": 21}, load_file(str(folder / "model.safetensors")))
    with pytest.raises(CheckpointError, match=r"model.layers.0.block_sparse_moe.input_linear.weight has shape"):
        LanguageModel.from_pretrained(tmp_path / "short")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.3.shared_mlp.output_linear.weight"]
    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "config.json").write_text(json.dumps(raw))
    save_file(tensors, str(tmp_path / "missing" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors.*shared_mlp.output_linear"):
        LanguageModel.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize(("pattern", "moe", "match"), [
    ("2eAm", {}, "all followed by SwiGLU MLPs"),
    ("2eWe", {}, "full attention"),
    ("2e", {"shared_d_intermediate": 0}, "shared_d_intermediate"),
    ("2e", {"router_softmax": "all", "shared_d_intermediate": 8}, "router_softmax"),
    ("2", {}, "all followed by"),
])
def test_models_granite_cannot_express_are_refused(tmp_path, pattern, moe, match):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, layer_pattern=pattern, mamba2=Mamba2Config(headdim=16),
                      attention=AttentionConfig(num_heads=4), residual_multiplier=0.5,
                      moe=MoEConfig(num_experts=4, **{"router_softmax": "top_k", "shared_d_intermediate": 8, **moe}))
    with pytest.raises(ValueError, match=f"cannot be saved as transformers' Granite.*{match}"):
        LanguageModel(cfg, device="meta").save_pretrained(tmp_path / "out", format="transformers")


def test_partial_rotary_is_refused(tmp_path):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, layer_pattern="2mAm", mamba2=Mamba2Config(headdim=16),
                      attention=AttentionConfig(num_heads=4, rotary_emb_dim=4), embedding_multiplier=2.0)
    with pytest.raises(ValueError, match="rotary_emb_dim must be 0 or head_dim"):
        LanguageModel(cfg, device="meta").save_pretrained(tmp_path / "out", format="transformers")


@pytest.mark.parametrize(("preset", "count"), [("granite-4.0-h-tiny", 6_939_037_248),
                                               ("granite-4.0-h-small", 32_207_337_984)])
def test_presets_have_transformers_parameter_count(capsys, preset, count):
    from ssmkit.cli import main
    from ssmkit.models.formats.granite import granite_config_to_transformers
    from ssmkit.models.presets import get_preset

    cfg = get_preset(preset)
    ours = LanguageModel(cfg, device="meta")
    raw = granite_config_to_transformers(cfg, cfg.padded_vocab_size)
    assert raw["layer_types"].count("attention") == 4 and raw["position_embedding_type"] == "nope"
    with torch.device("meta"):
        hf = transformers.GraniteMoeHybridForCausalLM(transformers.GraniteMoeHybridConfig(**raw))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters()) == count
    assert main(["info", "--preset", preset, "--context", "4096"]) == 0
    out = capsys.readouterr().out
    assert f"parameters: {count:,}" in out and "cache for one sequence at 4,096 tokens" in out


def test_convert_cli_round_trip(moe_folder, tmp_path):
    hf, folder = moe_folder
    again = convert_there_and_back(folder, tmp_path, transformers.GraniteMoeHybridForCausalLM)
    ids = token_ids(67, (1, 13), 6)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "granitemoehybrid"


def test_granite_tiny_preset_decodes_like_the_parallel_forward():
    from ssmkit.models.presets import get_preset

    torch.manual_seed(0)
    model = randomize_hybrid_(LanguageModel(get_preset("granite-hybrid-tiny")), 3).eval()
    assert_decode_equals_parallel_forward(model, token_ids(256, (2, 30), 8), 11)



def test_int8_decode_step_applies_the_residual_multiplier():
    """Weight-only int8 mixers decode through the unfused step, which applies the residual multiplier too:
    a block's one-token step equals ``r + m * mixer(norm(r))`` on the same int8 layer."""
    from ssmkit.models.presets import get_preset

    torch.manual_seed(0)
    model = randomize_hybrid_(LanguageModel(get_preset("granite-hybrid-tiny")), 3).eval().quantize()
    block = model.layers[0]
    assert isinstance(block.mixer, Mamba2) and block.residual_multiplier == 0.22
    r = torch.randn(2, 1, 64)
    fused, plain = block.allocate_state(2), block.allocate_state(2)
    with torch.no_grad():
        for _ in range(3):
            expected = r + 0.22 * block.mixer(block.norm(r), cache=plain)
            expected = expected + 0.22 * block.ff(block.ff_norm(expected))
            torch.testing.assert_close(block(r, cache=fused), expected)
