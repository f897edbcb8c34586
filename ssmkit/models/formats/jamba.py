"""Hugging Face transformers checkpoints of Jamba (model_type ``jamba``) <-> ssmkit hybrid models.

A Jamba layer i is attention iff ``i % attn_layer_period == attn_layer_offset`` (else Mamba with learned
RMSNorms on dt, B and C), and its feed-forward is a mixture of experts iff ``i % expert_layer_period ==
expert_layer_offset`` (else a dense SwiGLU MLP; every layer has one). In ssmkit that is the
``layer_pattern`` of :func:`ssmkit.models.presets.jamba_layer_pattern` with ``mamba.inner_layernorms``.

Tensor names (transformers -> ssmkit):

================================================= ====================================
``model.embed_tokens.weight``                     ``embedding.weight``
``model.final_layernorm.weight``                  ``norm_f.weight``
``model.layers.{i}.input_layernorm.weight``       ``layers.{i}.norm.weight``
``model.layers.{i}.pre_ff_layernorm.weight``      ``layers.{i}.ff_norm.weight``
``model.layers.{i}.mamba.*`` / ``self_attn.*``    ``layers.{i}.mixer.*``
``model.layers.{i}.feed_forward.*``               ``layers.{i}.ff.*``
================================================= ====================================

Experts are stored per expert (``feed_forward.experts.{e}.{gate,up,down}_proj.weight``, what
transformers' ``save_pretrained`` writes); the fused form of transformers 5's modules
(``experts.gate_up_proj`` [E, 2F, H], ``experts.down_proj`` [E, H, F]) is also read.
Jamba keeps the residual stream in the model's dtype, so loaded models get ``residual_in_fp32=False``.

Example::

    config, state = load_jamba_checkpoint("jamba-folder")     # what LanguageModel.from_pretrained does
    save_jamba_checkpoint(model, "out")                       # JambaForCausalLM.from_pretrained("out")
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ssmkit.layers import registry
from ssmkit.models.formats.files import CheckpointError
from ssmkit.models.formats.hybrid_common import (
    config_field,
    config_values,
    decoder_layer_expected,
    decoder_layer_name,
    read_folder,
    refuse_quantized,
    select_state,
    write_transformers_folder,
)

if TYPE_CHECKING:
    from torch import nn

    from ssmkit.models.config import ModelConfig

MODEL_TYPE = "jamba"
# transformers' JambaConfig defaults for the fields config.json may leave out.
_DEFAULTS: dict[str, Any] = dict(
    vocab_size=65536, tie_word_embeddings=False, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", initializer_range=0.02, rms_norm_eps=1e-6,
    router_aux_loss_coef=0.001, num_experts_per_tok=2, num_experts=16, expert_layer_period=2,
    expert_layer_offset=1, attn_layer_period=8, attn_layer_offset=4, mamba_d_state=16, mamba_d_conv=4,
    mamba_expand=2, mamba_dt_rank="auto", mamba_conv_bias=True, mamba_proj_bias=False,
)


def _coefficient(values: dict[str, Any], source: Path) -> float:
    """``router_aux_loss_coef``: a finite number >= 0."""
    v = values["router_aux_loss_coef"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
        raise CheckpointError(f"{source}: field 'router_aux_loss_coef' = {v!r:.80}: expected a number >= 0")
    return float(v)


def jamba_config_from_transformers(raw: dict[str, Any], source: Path) -> ModelConfig:
    """The :class:`ModelConfig` of a transformers Jamba config.json; unsupported values raise
    :class:`CheckpointError` naming the field."""
    from ssmkit.models.config import (
        AttentionConfig,
        MambaConfig,
        MLPConfig,
        ModelConfig,
        MoEConfig,
    )
    from ssmkit.models.presets import jamba_layer_pattern

    values = config_values(raw, _DEFAULTS, MODEL_TYPE, source)
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    if values["hidden_act"] != "silu":
        raise CheckpointError(f"{source}: field 'hidden_act' = {values['hidden_act']!r}: only 'silu' is implemented")
    refuse_quantized(raw, source)

    def get(name: str, kind: type = int, minimum: int = 1) -> Any:
        return config_field(values, source, name, kind, minimum)

    d_model, n_layer, eps = get("hidden_size"), get("num_hidden_layers"), get("rms_norm_eps", float)
    heads = get("num_attention_heads")
    head_dim = raw.get("head_dim")
    dt_rank = values["mamba_dt_rank"]
    if dt_rank != "auto":
        dt_rank = get("mamba_dt_rank")
    num_experts, f = get("num_experts"), get("intermediate_size")
    periods = {k: get(k, minimum=0) for k in
               ("attn_layer_period", "attn_layer_offset", "expert_layer_period", "expert_layer_offset")}
    try:
        pattern = jamba_layer_pattern(n_layer, **periods)
        if num_experts == 1:  # transformers builds a dense MLP wherever a layer would have one expert
            pattern = pattern.replace("e", "m")
        return ModelConfig(
            vocab_size=get("vocab_size"), d_model=d_model, n_layer=n_layer, layer_pattern=pattern,
            mamba=MambaConfig(d_state=get("mamba_d_state"), d_conv=get("mamba_d_conv"), expand=get("mamba_expand"),
                              dt_rank=dt_rank, conv_bias=get("mamba_conv_bias", bool),
                              bias=get("mamba_proj_bias", bool), inner_layernorms=True, mixer_rms_eps=eps),
            attention=AttentionConfig(num_heads=heads, num_heads_kv=get("num_key_value_heads"),
                                      head_dim=None if head_dim is None else get("head_dim")),
            mlp=MLPConfig(d_intermediate=f),
            moe=MoEConfig(num_experts=num_experts, top_k=get("num_experts_per_tok"), d_intermediate=f,
                          router_aux_loss_coef=_coefficient(values, source)),
            norm_eps=eps, tie_embeddings=get("tie_word_embeddings", bool), residual_in_fp32=False,
            pad_vocab_size_multiple=1, initializer_range=get("initializer_range", float),
            rescale_prenorm_residual=False,
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _find_period(n_layer: int, hits: list[bool], what: str) -> tuple[int, int]:
    """The smallest (period, offset) with hits[i] == (i % period == offset) for every layer."""
    for period in range(1, n_layer + 2):
        for offset in range(period):
            if all(hit == (i % period == offset) for i, hit in enumerate(hits)):
                return period, offset
    layers = [i for i, h in enumerate(hits) if h]
    raise ValueError(f"the {what} layers {layers} are not every k-th layer from an offset, as Jamba's config "
                     f"(period and offset) requires")


def jamba_config_to_transformers(config: ModelConfig, vocab_rows: int) -> dict[str, Any]:
    """transformers' Jamba config.json (as a dict) for ``config``; ValueError for what Jamba cannot express.

    ``vocab_rows`` (the embedding's rows) becomes ``vocab_size``. The router z-loss coefficient is not
    part of Jamba's config (it only affects training) and is dropped.
    """
    specs = config.layer_specs()
    problems = []
    if any(MODEL_TYPE not in registry.by_name(s.mixer).transformers for s in specs):
        problems.append("every mixer must be Mamba ('M') or full attention ('A')")
    if any(s.ff is None or MODEL_TYPE not in registry.by_name(s.ff).transformers for s in specs):
        problems.append("every layer needs a feed-forward ('m' or 'e' suffix)")
    m, a, moe = config.mamba, config.attention, config.moe
    has_moe, has_mlp = any(s.ff == "moe" for s in specs), any(s.ff == "mlp" for s in specs)
    if any(s.mixer == "mamba" for s in specs):
        if not m.inner_layernorms or m.mixer_rms_eps != config.norm_eps:
            problems.append("mamba.inner_layernorms must be true with mamba.mixer_rms_eps == norm_eps")
    if any(s.mixer == "attention" for s in specs):
        if a.rotary_emb_dim or a.bias:
            problems.append("attention must have no rotary embedding and no bias")
        if a.head_dim not in (None, config.d_model // a.num_heads) or config.d_model % a.num_heads:
            problems.append("attention.head_dim must be d_model / num_heads")
    if has_moe and (moe.renormalize or moe.num_experts < 2):
        problems.append("moe.renormalize must be false and moe.num_experts >= 2")
    if has_moe and (moe.router_softmax != "all" or moe.shared_d_intermediate):
        problems.append("moe.router_softmax must be 'all' and moe.shared_d_intermediate 0 (Jamba's router)")
    if has_mlp and config.mlp.bias:
        problems.append("mlp.bias must be false (Jamba's MLPs have no bias)")
    if has_moe and has_mlp and moe.d_intermediate != config.mlp.d_intermediate:
        problems.append("moe.d_intermediate must equal mlp.d_intermediate (Jamba's one intermediate_size)")
    if problems:
        raise ValueError(f"layer_pattern {config.layer_pattern!r} cannot be saved as transformers' Jamba: "
                         + "; ".join(problems))
    attn_period, attn_offset = _find_period(config.n_layer, [s.mixer == "attention" for s in specs], "attention")
    if has_moe:
        exp_period, exp_offset = _find_period(config.n_layer, [s.ff == "moe" for s in specs], "MoE")
    else:
        exp_period, exp_offset = 2, 1
    rank = m.dt_rank if m.dt_rank != "auto" else -(-config.d_model // 16)
    return dict(
        architectures=["JambaForCausalLM"], model_type=MODEL_TYPE, vocab_size=vocab_rows,
        hidden_size=config.d_model, num_hidden_layers=config.n_layer,
        intermediate_size=moe.d_intermediate if has_moe else config.mlp.d_intermediate,
        num_attention_heads=a.num_heads, num_key_value_heads=a.num_heads_kv or a.num_heads,
        num_experts=moe.num_experts if has_moe else 1, num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.router_aux_loss_coef, attn_layer_period=attn_period,
        attn_layer_offset=attn_offset, expert_layer_period=exp_period, expert_layer_offset=exp_offset,
        mamba_d_state=m.d_state, mamba_d_conv=m.d_conv, mamba_expand=m.expand, mamba_dt_rank=rank,
        mamba_conv_bias=m.conv_bias, mamba_proj_bias=m.bias, rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings, hidden_act="silu", initializer_range=config.initializer_range,
        # ssmkit has no special tokens in its config; transformers' defaults would stop generate() early.
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def _unfuse_experts(tensors: dict[str, torch.Tensor]) -> None:
    """Split transformers 5's fused expert tensors into the per-expert names, in place."""
    for name in [n for n in tensors if n.endswith("feed_forward.experts.gate_up_proj")]:
        prefix = name.removesuffix("gate_up_proj")
        gate_up = tensors.pop(name)
        down = tensors.pop(prefix + "down_proj", None)
        f = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            tensors[f"{prefix}{e}.gate_proj.weight"] = gate_up[e, :f]
            tensors[f"{prefix}{e}.up_proj.weight"] = gate_up[e, f:]
            if down is not None:
                tensors[f"{prefix}{e}.down_proj.weight"] = down[e]


def load_jamba_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a transformers Jamba folder: ``(ModelConfig, state_dict with LanguageModel names)``.

    Raises FileNotFoundError for a missing folder or file, :class:`CheckpointError` (a ValueError) for
    unsupported config values and missing, unexpected or mis-shaped tensors, naming the file.
    """
    config, tensors, source = read_folder(path, jamba_config_from_transformers)
    _unfuse_experts(tensors)
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return config, select_state(tensors, decoder_layer_expected(config, MODEL_TYPE), source)


def save_jamba_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a hybrid ``model`` as a transformers Jamba folder (config.json + model.safetensors, experts
    per expert), loadable by ``JambaForCausalLM.from_pretrained``; ValueError when the layer pattern or
    settings are not Jamba's (see :func:`jamba_config_to_transformers`). Returns the folder's path."""
    config = model.config
    state = model.state_dict()
    raw = jamba_config_to_transformers(config, state["embedding.weight"].shape[0])
    specs = config.layer_specs()
    return write_transformers_folder(path, raw, state, lambda n: decoder_layer_name(n, specs, MODEL_TYPE))
