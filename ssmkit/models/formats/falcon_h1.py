"""transformers' Falcon-H1 checkpoints (``model_type`` ``falcon_h1``, TII's Falcon-H1) <-> ssmkit hybrid
LanguageModels.

Every Falcon-H1 layer runs attention and a Mamba-2 mixer side by side on the same normed input and adds both
to the residual, then a SwiGLU MLP: ssmkit's parallel hybrid mixer (``F``,
:class:`ssmkit.layers.ParallelHybrid`) and MLP (``m``), so the layer pattern is ``"Fm"``. The µP multipliers
all map to settings: ``embedding_multiplier`` / ``lm_head_multiplier`` to the model's ``embedding_multiplier``
/ ``logits_multiplier``; ``attention_in/out_multiplier``, ``key_multiplier``, ``ssm_in/out_multiplier`` to the
mixer's; ``ssm_multipliers`` (z, x, B, C, dt parts of the in-projection) to ``mamba2.in_proj_multipliers``;
``mlp_multipliers`` to ``mlp.gate_multiplier`` / ``mlp.down_multiplier``.

The Mamba-2 half has ``mamba_d_ssm`` channels (``mamba2.d_inner``; ``mamba_expand * hidden_size`` when null),
an in-projection bias ``mamba_proj_bias`` and an out-projection bias ``projectors_bias``
(``mamba2.out_proj_bias``), and, with ``mamba_rms_norm``, a gated RMSNorm over ``mamba_n_groups`` groups with
eps ``rms_norm_eps`` (normalising before the gate when ``mamba_norm_before_gate``); without it the scan output
is gated by ``silu(z)`` alone (transformers' fused CUDA training kernel passes ``norm_before_gate=False``
whatever the config; its eager path, which inference runs, follows the config, as ssmkit does). Attention rotates whole heads (``head_dim``, or ``hidden_size /
num_attention_heads``) with RoPE base ``rope_theta``; transformers' default RoPE ignores
``partial_rotary_factor``, and so does ssmkit here.

Tensor names (the decoder layer holds ``self_attn``, ``mamba`` and ``feed_forward`` directly):

=============================================== ===================================
transformers                                    ssmkit
=============================================== ===================================
``model.embed_tokens.weight``                   ``embedding.weight``
``model.final_layernorm.weight``                ``norm_f.weight``
``model.layers.{i}.input_layernorm.weight``     ``layers.{i}.norm.weight``
``model.layers.{i}.self_attn.*`` / ``mamba.*``  ``layers.{i}.mixer.self_attn.*`` / ``mixer.mamba.*``
``model.layers.{i}.pre_ff_layernorm.weight``    ``layers.{i}.ff_norm.weight``
``model.layers.{i}.feed_forward.*``             ``layers.{i}.ff.*``
=============================================== ===================================

Fields that only affect training, caching or generation defaults (``attention_dropout``, ``use_cache``,
``num_logits_to_keep``, ``max_position_embeddings``, token ids) are not part of the function;
``mamba_chunk_size`` only tiles the scan.

Example::

    config, state = load_falcon_h1_checkpoint("falcon-h1-folder")   # what LanguageModel.from_pretrained does
    save_falcon_h1_checkpoint(model, "out")                         # FalconH1ForCausalLM.from_pretrained("out")
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ssmkit.models.formats.files import CheckpointError
from ssmkit.models.formats.hybrid_common import (
    Expected,
    config_field,
    config_values,
    field_error,
    read_folder,
    refuse_quantized,
    select_state,
    time_step_limit,
    write_transformers_folder,
)
from ssmkit.models.formats.native import model_tensor_shapes

if TYPE_CHECKING:
    from torch import nn

    from ssmkit.models.config import ModelConfig

MODEL_TYPE = "falcon_h1"
# transformers' FalconH1Config defaults for the fields config.json may leave out.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 128000, "tie_word_embeddings": False, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
    "initializer_range": 0.02, "rms_norm_eps": 1e-5, "mamba_d_ssm": 1024, "mamba_n_heads": 128,
    "mamba_d_head": "auto", "mamba_n_groups": 1, "mamba_d_state": 256, "mamba_d_conv": 4, "mamba_expand": 2,
    "mamba_chunk_size": 256, "mamba_conv_bias": True, "mamba_proj_bias": False, "mamba_norm_before_gate": True,
    "mamba_rms_norm": False, "time_step_limit": (0.0, math.inf), "projectors_bias": False,
    "lm_head_multiplier": 1.0, "embedding_multiplier": 1.0, "mlp_multipliers": [1.0, 1.0], "key_multiplier": 1.0,
    "attention_out_multiplier": 1.0, "attention_in_multiplier": 1.0, "ssm_multipliers": [1.0] * 5,
    "ssm_in_multiplier": 1.0, "ssm_out_multiplier": 1.0, "attention_bias": False, "mlp_bias": False,
}
_DEFAULT_ROPE_THETA = 10000.0
_SCALARS = {  # transformers' multiplier -> (ssmkit section or None for the model, field)
    "embedding_multiplier": (None, "embedding_multiplier"), "lm_head_multiplier": (None, "logits_multiplier"),
    "attention_in_multiplier": ("parallel_hybrid", "attention_in_multiplier"),
    "attention_out_multiplier": ("parallel_hybrid", "attention_out_multiplier"),
    "key_multiplier": ("parallel_hybrid", "key_multiplier"),
    "ssm_in_multiplier": ("parallel_hybrid", "ssm_in_multiplier"),
    "ssm_out_multiplier": ("parallel_hybrid", "ssm_out_multiplier"),
}


def _finite(v: Any) -> bool:
    """A JSON number that is a finite float (an integer too large for a float is not)."""
    try:
        return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(float(v))
    except OverflowError:
        return False


def _number(values: dict[str, Any], source: Path, name: str) -> float:
    v = values[name]
    if not _finite(v):
        raise field_error(source, name, v, "expected a finite number")
    return float(v)


def _numbers(values: dict[str, Any], source: Path, name: str, n: int) -> tuple[float, ...]:
    v = values[name]
    if not isinstance(v, (list, tuple)) or len(v) != n:
        raise field_error(source, name, v, f"expected a list of {n} numbers")
    return tuple(_number({name: x}, source, name) for x in v)


def _rope_theta(raw: dict[str, Any], source: Path) -> float:
    """RoPE base from ``rope_parameters`` (or the older top-level ``rope_theta``); only default RoPE."""
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
    if not _finite(theta) or not theta > 0:
        raise field_error(source, "rope_parameters.rope_theta", theta, "expected a positive number")
    return float(theta)


def falcon_h1_config_from_transformers(raw: dict[str, Any], source: Path) -> ModelConfig:
    """The :class:`ModelConfig` of a transformers Falcon-H1 config.json; unsupported values raise
    :class:`CheckpointError` naming the field."""
    from ssmkit.layers.parallel_hybrid import ParallelHybridConfig
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

    d_model, heads = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim") if "head_dim" in values else d_model // heads
    if head_dim < 1 or head_dim % 2:
        raise field_error(source, "head_dim" if "head_dim" in values else "num_attention_heads",
                          values.get("head_dim", heads), "rotary attention needs an even head_dim >= 2")
    expand = get("mamba_expand")
    # An explicit null mamba_d_ssm means expand * hidden_size (a missing one, transformers' default 1024).
    d_ssm = expand * d_model if "mamba_d_ssm" in raw and raw["mamba_d_ssm"] is None else get("mamba_d_ssm")
    ssm_heads = get("mamba_n_heads")
    ssm_head_dim = d_ssm // ssm_heads if values["mamba_d_head"] == "auto" else get("mamba_d_head")
    if ssm_head_dim < 1 or ssm_head_dim * ssm_heads != d_ssm:
        raise field_error(source, "mamba_n_heads", ssm_heads, f"mamba_n_heads * mamba_d_head ({ssm_heads} * "
                          f"{ssm_head_dim}) must equal mamba_d_ssm ({d_ssm})")
    if ssm_heads % get("mamba_n_groups"):
        raise field_error(source, "mamba_n_groups", values["mamba_n_groups"],
                          f"must divide mamba_n_heads ({ssm_heads})")
    lo, hi = time_step_limit(values, source)
    scalars = {name: _number(values, source, name) for name in _SCALARS}
    gate, down = _numbers(values, source, "mlp_multipliers", 2)
    try:
        mamba2 = Mamba2Config(
            d_state=get("mamba_d_state"), d_conv=get("mamba_d_conv"), expand=expand, headdim=ssm_head_dim,
            ngroups=get("mamba_n_groups"), chunk_size=get("mamba_chunk_size"), dt_limit=(lo, hi),
            conv_bias=get("mamba_conv_bias", bool), bias=get("mamba_proj_bias", bool),
            out_proj_bias=get("projectors_bias", bool), norm_before_gate=get("mamba_norm_before_gate", bool),
            rmsnorm=get("mamba_rms_norm", bool), D_has_hdim=False, d_inner=d_ssm,
            in_proj_multipliers=_numbers(values, source, "ssm_multipliers", 5))
        attention = AttentionConfig(num_heads=heads, num_heads_kv=get("num_key_value_heads"), head_dim=head_dim,
                                    rotary_emb_dim=head_dim, rotary_emb_base=_rope_theta(raw, source),
                                    bias=get("attention_bias", bool))
        mixer = ParallelHybridConfig(attention=attention, mamba2=mamba2, **{
            field: scalars[name] for name, (section, field) in _SCALARS.items() if section})
        return ModelConfig(
            vocab_size=get("vocab_size"), d_model=d_model, n_layer=get("num_hidden_layers"), layer_pattern="Fm",
            parallel_hybrid=mixer,
            mlp=MLPConfig(d_intermediate=get("intermediate_size"), bias=get("mlp_bias", bool), gate_multiplier=gate,
                          down_multiplier=down),
            norm_eps=get("rms_norm_eps", float), tie_embeddings=get("tie_word_embeddings", bool),
            residual_in_fp32=False, pad_vocab_size_multiple=1, initializer_range=get("initializer_range", float),
            rescale_prenorm_residual=False, embedding_multiplier=scalars["embedding_multiplier"],
            logits_multiplier=scalars["lm_head_multiplier"],
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def falcon_h1_config_to_transformers(config: ModelConfig, vocab_rows: int) -> dict[str, Any]:
    """transformers' Falcon-H1 config.json (as a dict) for ``config``; ValueError for what Falcon-H1 cannot
    express. ``vocab_rows`` (the embedding's rows) becomes ``vocab_size``."""
    p = config.parallel_hybrid
    a, m = p.attention, p.mamba2
    head_dim = a.head_dim or config.d_model // a.num_heads
    d_inner = m.inner_width(config.d_model)
    problems = []
    if any(s != ("parallel_hybrid", "mlp") for s in config.layer_specs()):
        problems.append("every layer must be a parallel hybrid mixer followed by an MLP ('Fm')")
    if a.rotary_emb_dim != head_dim:
        problems.append(f"parallel_hybrid.attention must rotate whole heads (rotary_emb_dim = head_dim = {head_dim})")
    if m.D_has_hdim:
        problems.append("parallel_hybrid.mamba2.D_has_hdim must be false")
    if problems:
        raise ValueError(f"layer_pattern {config.layer_pattern!r} cannot be saved as transformers' Falcon-H1: "
                         + "; ".join(problems))
    return {
        "architectures": ["FalconH1ForCausalLM"], "model_type": MODEL_TYPE, "vocab_size": vocab_rows,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layer,
        "intermediate_size": config.mlp.d_intermediate, "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_heads_kv or a.num_heads, "head_dim": head_dim, "attention_bias": a.bias,
        "mlp_bias": config.mlp.bias, "rope_parameters": {"rope_type": "default", "rope_theta": a.rotary_emb_base},
        "mamba_d_ssm": d_inner, "mamba_n_heads": d_inner // m.headdim, "mamba_d_head": m.headdim,
        "mamba_n_groups": m.ngroups, "mamba_d_state": m.d_state, "mamba_d_conv": m.d_conv, "mamba_expand": m.expand,
        "mamba_chunk_size": m.chunk_size, "mamba_conv_bias": m.conv_bias, "mamba_proj_bias": m.bias,
        "projectors_bias": m.bias if m.out_proj_bias is None else m.out_proj_bias,
        "mamba_norm_before_gate": m.norm_before_gate, "mamba_rms_norm": m.rmsnorm,
        "time_step_limit": [float(v) for v in m.dt_limit], "rms_norm_eps": config.norm_eps,
        "ssm_multipliers": [float(v) for v in m.in_proj_multipliers],
        "mlp_multipliers": [config.mlp.gate_multiplier, config.mlp.down_multiplier],
        **{name: float(getattr(p if section else config, field)) for name, (section, field) in _SCALARS.items()},
        "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu",
        "initializer_range": config.initializer_range,
        # ssmkit has no special tokens in its config; transformers' defaults would stop generate() early.
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }


def _name(name: str) -> str:
    """The transformers name of ssmkit tensor ``name``."""
    top = {"embedding.weight": "model.embed_tokens.weight", "norm_f.weight": "model.final_layernorm.weight",
           "lm_head.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    i, part, rest = re.fullmatch(r"layers\.(\d+)\.(norm|ff_norm|mixer|ff)\.(.+)", name).groups()
    prefix = {"norm": "input_layernorm.", "ff_norm": "pre_ff_layernorm.", "mixer": "", "ff": "feed_forward."}[part]
    return f"model.layers.{i}.{prefix}{rest}"


def _expected(config: ModelConfig) -> Expected:
    return {_name(n): (shape, n) for n, shape in model_tensor_shapes(config).items()}


def load_falcon_h1_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a transformers Falcon-H1 folder (one or sharded safetensors): ``(ModelConfig, state_dict with
    LanguageModel names)``. Raises FileNotFoundError for a missing folder or file, :class:`CheckpointError`
    for unsupported config values and missing, unexpected or mis-shaped tensors, naming the file."""
    config, tensors, source = read_folder(path, falcon_h1_config_from_transformers)
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return config, select_state(tensors, _expected(config), source)


def save_falcon_h1_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` as a transformers Falcon-H1 folder (config.json + model.safetensors), loadable by
    ``FalconH1ForCausalLM.from_pretrained``; ValueError when its layers are not Falcon-H1's (see
    :func:`falcon_h1_config_to_transformers`). Returns the folder's path."""
    config = model.config
    state = model.state_dict()
    raw = falcon_h1_config_to_transformers(config, state["embedding.weight"].shape[0])
    return write_transformers_folder(path, raw, state, _name)
