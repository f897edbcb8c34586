"""transformers' Bamba checkpoints (``model_type`` ``bamba``, IBM's Bamba-9B) <-> ssmkit hybrid LanguageModels.

A Bamba layer is a pre-norm block of one mixer — Mamba-2 (``2``) or, at ``attn_layer_indices``, full
attention (``A``) with rotary embeddings on ``partial_rotary_factor`` of each head (0.5 unless the config
says otherwise) — followed by a pre-norm SwiGLU MLP (``m``): the layer pattern is ``"2m"`` or ``"Am"`` per
layer. The Mamba-2 mixer's gated RMSNorm normalises ``y * silu(z)`` per group of ``d_inner / n_groups``
channels with the model's ``rms_norm_eps`` (ssmkit's ``Mamba2`` with ``ngroups`` groups,
``norm_before_gate=False``).

Tensor names (the same module names as Jamba's):

================================================= ====================================
transformers                                      ssmkit
================================================= ====================================
``model.embed_tokens.weight``                     ``embedding.weight``
``model.final_layernorm.weight``                  ``norm_f.weight``
``model.layers.{i}.input_layernorm.weight``       ``layers.{i}.norm.weight``
``model.layers.{i}.pre_ff_layernorm.weight``      ``layers.{i}.ff_norm.weight``
``model.layers.{i}.mamba.*`` / ``self_attn.*``    ``layers.{i}.mixer.*``
``model.layers.{i}.feed_forward.*``               ``layers.{i}.ff.*``
================================================= ====================================

Fields that only affect training or generation defaults (``z_loss_coefficient``, ``num_logits_to_keep``,
``attention_dropout`` at 0, token ids) are not part of the function; ``mamba_chunk_size`` only tiles the scan.

Example::

    config, state = load_bamba_checkpoint("bamba-folder")   # what LanguageModel.from_pretrained does
    save_bamba_checkpoint(model, "out")                     # BambaForCausalLM.from_pretrained("out")
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ssmkit.models.formats.files import CheckpointError
from ssmkit.models.formats.hybrid_common import (
    config_field,
    config_values,
    decoder_layer_expected,
    decoder_layer_name,
    field_error,
    read_folder,
    refuse_quantized,
    select_state,
    time_step_limit,
    write_transformers_folder,
)

if TYPE_CHECKING:
    from torch import nn

    from ssmkit.models.config import ModelConfig

MODEL_TYPE = "bamba"
# transformers' BambaConfig defaults for the fields config.json may leave out.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 128000, "tie_word_embeddings": False, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
    "initializer_range": 0.02, "rms_norm_eps": 1e-5, "attention_dropout": 0.0, "attn_layer_indices": None,
    "mamba_n_heads": 128, "mamba_d_head": "auto", "mamba_n_groups": 1, "mamba_d_state": 256, "mamba_d_conv": 4,
    "mamba_expand": 2, "mamba_chunk_size": 256, "mamba_conv_bias": True, "mamba_proj_bias": False,
    "time_step_limit": (0.0, math.inf), "attention_bias": False, "mlp_bias": False,
}
_DEFAULT_ROPE_THETA = 10000.0
_DEFAULT_PARTIAL_ROTARY = 0.5  # BambaConfig hard-codes it when rope_parameters does not say


def _rope(raw: dict[str, Any], head_dim: int, source: Path) -> tuple[int, float]:
    """(rotary dims per head, base) from ``rope_parameters`` (or the older top-level ``rope_theta``)."""
    rope = raw.get("rope_parameters")
    if rope is None:
        rope = {}
    if not isinstance(rope, dict):
        raise field_error(source, "rope_parameters", rope, "expected an object")
    if raw.get("rope_scaling") not in (None, {}):
        raise field_error(source, "rope_scaling", raw["rope_scaling"], "only the default RoPE is implemented")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise field_error(source, "rope_parameters.rope_type", rope_type, "only 'default' RoPE is implemented")
    theta = rope.get("rope_theta", raw.get("rope_theta", _DEFAULT_ROPE_THETA))
    factor = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", _DEFAULT_PARTIAL_ROTARY))
    for name, v in (("rope_theta", theta), ("partial_rotary_factor", factor)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
            raise field_error(source, f"rope_parameters.{name}", v, "expected a positive number")
    dims = int(head_dim * factor)
    if not 0 < dims <= head_dim or dims % 2:
        raise field_error(source, "rope_parameters.partial_rotary_factor", factor,
                          f"head_dim ({head_dim}) x factor must be an even number of dims in [2, head_dim]")
    return dims, float(theta)


def _attention_layers(values: dict[str, Any], n_layer: int, source: Path) -> set[int]:
    indices = values["attn_layer_indices"] or []
    if not isinstance(indices, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in indices):
        raise field_error(source, "attn_layer_indices", indices, "expected a list of layer indices")
    if any(not 0 <= i < n_layer for i in indices):
        raise field_error(source, "attn_layer_indices", indices, f"every index must be in [0, {n_layer})")
    return set(indices)


def bamba_config_from_transformers(raw: dict[str, Any], source: Path) -> ModelConfig:
    """The :class:`ModelConfig` of a transformers Bamba config.json; unsupported values raise
    :class:`CheckpointError` naming the field."""
    from ssmkit.models.config import (
        AttentionConfig,
        Mamba2Config,
        MLPConfig,
        ModelConfig,
    )

    values = config_values(raw, _DEFAULTS, MODEL_TYPE, source)
    if raw.get("num_key_value_heads", 0) is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    if values["hidden_act"] != "silu":
        raise field_error(source, "hidden_act", values["hidden_act"], "only 'silu' is implemented")
    refuse_quantized(raw, source)

    def get(name: str, kind: type = int, minimum: int = 1) -> Any:
        return config_field(values, source, name, kind, minimum)

    d_model, n_layer, eps = get("hidden_size"), get("num_hidden_layers"), get("rms_norm_eps", float)
    heads, expand = get("num_attention_heads"), get("mamba_expand")
    head_dim = get("head_dim") if "head_dim" in values else d_model // heads
    if head_dim < 1:
        raise field_error(source, "num_attention_heads", heads, f"more heads than hidden_size ({d_model})")
    ssm_heads = get("mamba_n_heads")
    ssm_head_dim = values["mamba_d_head"]
    if ssm_head_dim == "auto":
        ssm_head_dim = expand * d_model // ssm_heads
    else:
        ssm_head_dim = get("mamba_d_head")
    if ssm_head_dim * ssm_heads != expand * d_model:
        raise field_error(source, "mamba_n_heads", ssm_heads, f"mamba_n_heads * mamba_d_head ({ssm_heads} * "
                          f"{ssm_head_dim}) must equal mamba_expand * hidden_size ({expand} * {d_model})")
    if ssm_heads % get("mamba_n_groups"):
        raise field_error(source, "mamba_n_groups", values["mamba_n_groups"],
                          f"must divide mamba_n_heads ({ssm_heads})")
    lo, hi = time_step_limit(values, source)
    rotary, theta = _rope(raw, head_dim, source)
    attention = _attention_layers(values, n_layer, source)
    pattern = "".join("Am" if i in attention else "2m" for i in range(n_layer))
    try:
        return ModelConfig(
            vocab_size=get("vocab_size"), d_model=d_model, n_layer=n_layer, layer_pattern=pattern,
            mamba2=Mamba2Config(d_state=get("mamba_d_state"), d_conv=get("mamba_d_conv"), expand=expand,
                                headdim=ssm_head_dim, ngroups=get("mamba_n_groups"),
                                chunk_size=get("mamba_chunk_size"), dt_limit=(lo, hi),
                                conv_bias=get("mamba_conv_bias", bool), bias=get("mamba_proj_bias", bool),
                                norm_before_gate=False, rmsnorm=True, D_has_hdim=False),
            attention=AttentionConfig(num_heads=heads, num_heads_kv=get("num_key_value_heads"), head_dim=head_dim,
                                      rotary_emb_dim=rotary, rotary_emb_base=theta,
                                      bias=get("attention_bias", bool)),
            mlp=MLPConfig(d_intermediate=get("intermediate_size"), bias=get("mlp_bias", bool)),
            norm_eps=eps, tie_embeddings=get("tie_word_embeddings", bool), residual_in_fp32=False,
            pad_vocab_size_multiple=1, initializer_range=get("initializer_range", float),
            rescale_prenorm_residual=False,
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def bamba_config_to_transformers(config: ModelConfig, vocab_rows: int) -> dict[str, Any]:
    """transformers' Bamba config.json (as a dict) for ``config``; ValueError for what Bamba cannot express.
    ``vocab_rows`` (the embedding's rows) becomes ``vocab_size``."""
    specs = config.layer_specs()
    m, a = config.mamba2, config.attention
    head_dim = a.head_dim or config.d_model // a.num_heads
    problems = []
    if any(s.mixer not in ("mamba2", "attention") or s.ff != "mlp" for s in specs):
        problems.append("every layer must be Mamba-2 or full attention followed by an MLP ('2m' or 'Am')")
    if any(s.mixer == "mamba2" for s in specs):
        if not m.rmsnorm or m.norm_before_gate or m.D_has_hdim:
            problems.append("mamba2 needs rmsnorm=true, norm_before_gate=false, D_has_hdim=false")
        if (m.expand * config.d_model) % m.headdim:
            problems.append("mamba2.headdim must divide expand * d_model")
    if any(s.mixer == "attention" for s in specs) and not a.rotary_emb_dim:
        problems.append("attention needs a rotary embedding (attention.rotary_emb_dim > 0)")
    if problems:
        raise ValueError(f"layer_pattern {config.layer_pattern!r} cannot be saved as transformers' Bamba: "
                         + "; ".join(problems))
    return {
        "architectures": ["BambaForCausalLM"], "model_type": MODEL_TYPE, "vocab_size": vocab_rows,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layer,
        "intermediate_size": config.mlp.d_intermediate, "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_heads_kv or a.num_heads, "head_dim": head_dim, "attention_bias": a.bias,
        "mlp_bias": config.mlp.bias,
        "attn_layer_indices": [i for i, s in enumerate(specs) if s.mixer == "attention"],
        "rope_parameters": {"rope_type": "default", "rope_theta": a.rotary_emb_base,
                            "partial_rotary_factor": a.rotary_emb_dim / head_dim},
        "mamba_n_heads": m.expand * config.d_model // m.headdim, "mamba_d_head": m.headdim,
        "mamba_n_groups": m.ngroups, "mamba_d_state": m.d_state, "mamba_d_conv": m.d_conv, "mamba_expand": m.expand,
        "mamba_chunk_size": m.chunk_size, "mamba_conv_bias": m.conv_bias, "mamba_proj_bias": m.bias,
        "time_step_limit": [float(v) for v in m.dt_limit], "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu",
        "initializer_range": config.initializer_range,
        # ssmkit has no special tokens in its config; transformers' defaults would stop generate() early.
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }


def load_bamba_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a transformers Bamba folder (one or sharded safetensors): ``(ModelConfig, state_dict with
    LanguageModel names)``. Raises FileNotFoundError for a missing folder or file, :class:`CheckpointError`
    for unsupported config values and missing, unexpected or mis-shaped tensors, naming the file."""
    config, tensors, source = read_folder(path, bamba_config_from_transformers)
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return config, select_state(tensors, decoder_layer_expected(config, MODEL_TYPE), source)


def save_bamba_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` as a transformers Bamba folder (config.json + model.safetensors), loadable by
    ``BambaForCausalLM.from_pretrained``; ValueError when its layers are not Bamba's (see
    :func:`bamba_config_to_transformers`). Returns the folder's path."""
    config = model.config
    state = model.state_dict()
    raw = bamba_config_to_transformers(config, state["embedding.weight"].shape[0])
    specs = config.layer_specs()
    return write_transformers_folder(path, raw, state, lambda n: decoder_layer_name(n, specs, MODEL_TYPE))
