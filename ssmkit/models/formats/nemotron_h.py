"""transformers' Nemotron-H checkpoints (``model_type`` ``nemotron_h``, NVIDIA's Nemotron-H) <-> ssmkit
hybrid LanguageModels.

Every Nemotron-H layer is ``x + mixer(norm(x))`` with one mixer, by ``layers_block_type`` (or the older
``hybrid_override_pattern``): Mamba-2 (``M`` / ``linear_attention``), attention without positional encoding
(``*`` / ``full_attention``) or an ungated MLP, squared ReLU by default (``-`` / ``mlp``). An MLP layer
after a Mamba-2 or attention layer is the same function as ssmkit's feed-forward of that layer (pre-norm,
residual), so each mixer layer with the MLP layers after it becomes one ssmkit layer: ``M-`` is ``2u``,
``*-`` is ``Au``, ``M`` alone is ``2``. ssmkit's layers always begin with a mixer: an MLP layer first or
right after another MLP layer, and the MoE layers (``E``) of Nemotron-3, are refused.

The Mamba-2 mixer is ssmkit's ``Mamba2`` with ``d_inner = mamba_num_heads * mamba_head_dim`` (a multiple of
``hidden_size``), ``n_groups`` groups in the gated RMSNorm (``norm_before_gate=False``, eps
``layer_norm_epsilon``) and ``use_bias`` on its projections. Attention has no bias (transformers ignores
``attention_bias``) and ``head_dim`` channels per head. The head is never tied to the embedding (transformers'
``NemotronHForCausalLM`` ties nothing, whatever ``tie_word_embeddings`` says).

Tensor names: ``backbone.`` (what ``save_pretrained`` writes) or ``model.`` (the module names) prefix,
``{prefix}embeddings.weight``, ``{prefix}norm_f.weight``, ``lm_head.weight`` and, for transformers layer
``j``, ``{prefix}layers.{j}.norm.weight`` and ``{prefix}layers.{j}.mixer.*`` (ssmkit's ``norm``/``mixer``
or ``ff_norm``/``ff`` of the layer it joins). Multi-token-prediction tensors (``mtp.*``) are not read, as
transformers does not read them.

Fields that only affect training or initialisation (dropouts, ``time_step_min/max/floor``,
``rescale_prenorm_residual``, ``initializer_range``), generation defaults, ``sliding_window`` and
``expand`` (unused by transformers' model) are not part of the function; ``chunk_size`` only tiles the scan;
``mamba_ssm_cache_dtype`` is ignored because ssmkit keeps the scan state in float32 (or wider).

Example::

    config, state = load_nemotron_h_checkpoint("nemotron-folder")   # what LanguageModel.from_pretrained does
    save_nemotron_h_checkpoint(model, "out")                        # NemotronHForCausalLM.from_pretrained("out")
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ssmkit.models.config import MAX_LAYERS
from ssmkit.models.formats.files import CheckpointError
from ssmkit.models.formats.hybrid_common import (
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

MODEL_TYPE = "nemotron_h"
SAVE_PREFIX = "backbone."
# transformers' NemotronHConfig defaults for the fields config.json may leave out.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 131072, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "intermediate_size": 21504, "mlp_hidden_act": "relu2", "mlp_bias": False,
    "ssm_state_size": 128, "mamba_num_heads": 128, "mamba_head_dim": 64, "mamba_hidden_act": "silu",
    "n_groups": 8, "conv_kernel": 4, "time_step_min": 0.001, "time_step_max": 0.1,
    "time_step_limit": (0.0, math.inf), "time_step_floor": 1e-4, "use_conv_bias": True, "chunk_size": 128,
    "use_bias": False, "initializer_range": 0.02, "layer_norm_epsilon": 1e-5,
}
# Older config.json names of the same fields (transformers still reads them).
_LEGACY_NAMES = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_dt_min": "time_step_min",
                 "mamba_dt_max": "time_step_max", "mamba_dt_limit": "time_step_limit",
                 "mamba_dt_init_floor": "time_step_floor", "mamba_conv_bias": "use_conv_bias",
                 "mamba_chunk_size": "chunk_size"}
_PATTERN_LETTERS = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
_LEGACY_TYPES = {"mamba": "linear_attention", "attention": "full_attention"}
_MIXER_LETTERS = {"linear_attention": "2", "full_attention": "A"}


def _layer_types(raw: dict[str, Any], source: Path) -> tuple[list[str], str]:
    """Each transformers layer's type, and the field it came from."""
    types, field = raw.get("layers_block_type"), "layers_block_type"
    if types is None and raw.get("layer_types") is not None:
        types, field = raw["layer_types"], "layer_types"
    if types is None and raw.get("hybrid_override_pattern") is not None:
        pattern, field = raw["hybrid_override_pattern"], "hybrid_override_pattern"
        if not isinstance(pattern, str) or not pattern or any(c not in _PATTERN_LETTERS for c in pattern):
            raise field_error(source, field, pattern, f"expected a string of {', '.join(_PATTERN_LETTERS)}")
        types = [_PATTERN_LETTERS[c] for c in pattern]
    if types is None:
        types = ["linear_attention", "moe", "full_attention", "mlp"]  # NemotronHConfig's default
    if not isinstance(types, list) or not types or any(not isinstance(t, str) for t in types):
        raise field_error(source, field, types, "expected a non-empty list of layer types")
    if len(types) > MAX_LAYERS:
        raise field_error(source, field, f"<{len(types)} layers>", f"at most {MAX_LAYERS:,} layers")
    types = [_LEGACY_TYPES.get(t, t) for t in types]
    unknown = sorted({t for t in types if t not in _PATTERN_LETTERS.values()})
    if unknown:
        raise field_error(source, field, unknown, "unknown layer types; expected linear_attention, full_attention, mlp")
    if "moe" in types:
        raise field_error(source, field, [i for i, t in enumerate(types) if t == "moe"],
                          "MoE layers ('moe' / 'E') are not implemented")
    return types, field


def layer_pattern_from_types(types: list[str], source: Path, field: str) -> str:
    """ssmkit's layer pattern for transformers' layer types: each mixer with the MLP layer after it."""
    tokens: list[str] = []
    for i, t in enumerate(types):
        if t in _MIXER_LETTERS:
            tokens.append(_MIXER_LETTERS[t])
        elif not tokens or tokens[-1].endswith("u"):
            raise field_error(source, field, "".join({v: k for k, v in _PATTERN_LETTERS.items()}[t] for t in types),
                              f"layer {i} is an MLP layer that does not follow a Mamba-2 or attention layer; ssmkit "
                              "joins each MLP layer to the mixer layer before it")
        else:
            tokens[-1] += "u"
    return "".join(tokens)


def nemotron_h_config_from_transformers(raw: dict[str, Any], source: Path) -> ModelConfig:
    """The :class:`ModelConfig` of a transformers Nemotron-H config.json; unsupported values raise
    :class:`CheckpointError` naming the field."""
    from ssmkit.layers.ungated_mlp import ACTIVATIONS, UngatedMLPConfig
    from ssmkit.models.config import AttentionConfig, Mamba2Config, ModelConfig

    values = config_values(raw, _DEFAULTS, MODEL_TYPE, source)
    for old, new in _LEGACY_NAMES.items():
        if raw.get(old) is not None:
            values[new] = raw[old]
    if raw.get("num_key_value_heads", 0) is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    refuse_quantized(raw, source)
    if values["mamba_hidden_act"] != "silu":
        raise field_error(source, "mamba_hidden_act", values["mamba_hidden_act"], "only 'silu' is implemented")
    if values["mlp_hidden_act"] not in ACTIVATIONS:
        raise field_error(source, "mlp_hidden_act", values["mlp_hidden_act"],
                          f"expected one of {', '.join(ACTIVATIONS)}")

    def get(name: str, kind: type = int, minimum: int = 1) -> Any:
        return config_field(values, source, name, kind, minimum)

    types, field = _layer_types(raw, source)
    pattern = layer_pattern_from_types(types, source, field)
    d_model, heads, head_dim = get("hidden_size"), get("mamba_num_heads"), get("mamba_head_dim")
    if heads * head_dim % d_model:
        raise field_error(source, "mamba_num_heads", heads, f"mamba_num_heads * mamba_head_dim ({heads} * {head_dim}) "
                          f"must be a multiple of hidden_size ({d_model})")
    if heads % get("n_groups"):
        raise field_error(source, "n_groups", values["n_groups"], f"must divide mamba_num_heads ({heads})")
    lo, hi = time_step_limit(values, source)
    try:
        return ModelConfig(
            vocab_size=get("vocab_size"), d_model=d_model, n_layer=len(re.findall(r"[2A]", pattern)),
            layer_pattern=pattern,
            mamba2=Mamba2Config(d_state=get("ssm_state_size"), d_conv=get("conv_kernel"),
                                expand=heads * head_dim // d_model, headdim=head_dim, ngroups=get("n_groups"),
                                chunk_size=get("chunk_size"), dt_min=get("time_step_min", float),
                                dt_max=get("time_step_max", float), dt_init_floor=get("time_step_floor", float),
                                dt_limit=(lo, hi), conv_bias=get("use_conv_bias", bool), bias=get("use_bias", bool),
                                norm_before_gate=False, rmsnorm=True, D_has_hdim=False),
            attention=AttentionConfig(num_heads=get("num_attention_heads"), num_heads_kv=get("num_key_value_heads"),
                                      head_dim=get("head_dim"), rotary_emb_dim=0, bias=False),
            ungated_mlp=UngatedMLPConfig(d_intermediate=get("intermediate_size"),
                                         activation=values["mlp_hidden_act"], bias=get("mlp_bias", bool)),
            norm_eps=get("layer_norm_epsilon", float), tie_embeddings=False, residual_in_fp32=False,
            pad_vocab_size_multiple=1, initializer_range=get("initializer_range", float),
            rescale_prenorm_residual=False,
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _layer_map(config: ModelConfig) -> tuple[list[str], dict[tuple[int, str], int]]:
    """(transformers layer types, {(ssmkit layer, "mixer" or "ff"): transformers layer})."""
    types: list[str] = []
    where: dict[tuple[int, str], int] = {}
    for i, spec in enumerate(config.layer_specs()):
        where[i, "mixer"] = len(types)
        types.append("linear_attention" if spec.mixer == "mamba2" else "full_attention")
        if spec.ff is not None:
            where[i, "ff"] = len(types)
            types.append("mlp")
    return types, where


def nemotron_h_config_to_transformers(config: ModelConfig, vocab_rows: int) -> dict[str, Any]:
    """transformers' Nemotron-H config.json (as a dict) for ``config``; ValueError for what Nemotron-H cannot
    express. ``vocab_rows`` (the embedding's rows) becomes ``vocab_size``."""
    specs = config.layer_specs()
    m, a, f = config.mamba2, config.attention, config.ungated_mlp
    problems = []
    if any(s.mixer not in ("mamba2", "attention") or s.ff not in (None, "ungated_mlp") for s in specs):
        problems.append("every layer must be Mamba-2 ('2') or full attention ('A'), optionally followed by an "
                        "ungated MLP ('u')")
    if any(s.mixer == "mamba2" for s in specs) and (not m.rmsnorm or m.norm_before_gate or m.D_has_hdim):
        problems.append("mamba2 needs rmsnorm=true, norm_before_gate=false, D_has_hdim=false")
    if any(s.mixer == "attention" for s in specs) and (a.rotary_emb_dim or a.bias):
        problems.append("attention must have no rotary embedding and no bias")
    if problems:
        raise ValueError(f"layer_pattern {config.layer_pattern!r} cannot be saved as transformers' Nemotron-H: "
                         + "; ".join(problems))
    types, _ = _layer_map(config)
    return {
        "architectures": ["NemotronHForCausalLM"], "model_type": MODEL_TYPE, "vocab_size": vocab_rows,
        "hidden_size": config.d_model, "layers_block_type": types, "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_heads_kv or a.num_heads, "head_dim": a.head_dim or config.d_model // a.num_heads,
        "attention_bias": False, "intermediate_size": f.d_intermediate, "mlp_hidden_act": f.activation,
        "mlp_bias": f.bias, "ssm_state_size": m.d_state, "mamba_num_heads": m.expand * config.d_model // m.headdim,
        "mamba_head_dim": m.headdim, "mamba_hidden_act": "silu", "n_groups": m.ngroups, "conv_kernel": m.d_conv,
        "expand": m.expand, "time_step_min": m.dt_min, "time_step_max": m.dt_max,
        "time_step_limit": [float(v) for v in m.dt_limit], "time_step_floor": m.dt_init_floor,
        "use_conv_bias": m.conv_bias, "use_bias": m.bias, "chunk_size": m.chunk_size,
        "layer_norm_epsilon": config.norm_eps, "initializer_range": config.initializer_range,
        "tie_word_embeddings": False, "residual_in_fp32": False, "num_nextn_predict_layers": 0,
        # ssmkit has no special tokens in its config; transformers' defaults would stop generate() early.
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }


def _names(config: ModelConfig) -> dict[str, str]:
    """ssmkit name -> transformers name (without the prefix for the backbone's tensors)."""
    _, where = _layer_map(config)
    names = {}
    for name in model_tensor_shapes(config):
        top = {"embedding.weight": "embeddings.weight", "norm_f.weight": "norm_f.weight",
               "lm_head.weight": "lm_head.weight"}
        if name in top:
            names[name] = top[name]
            continue
        i, part, rest = re.fullmatch(r"layers\.(\d+)\.(norm|ff_norm|mixer|ff)\.(.+)", name).groups()
        j = where[int(i), "ff" if part in ("ff", "ff_norm") else "mixer"]
        names[name] = f"layers.{j}.{'norm' if part.endswith('norm') else 'mixer'}.{rest}"
    return names


def _expected(config: ModelConfig, prefix: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """transformers name -> (shape, ssmkit name) for every tensor of ``config``'s model."""
    shapes = model_tensor_shapes(config)
    return {(t if t == "lm_head.weight" else prefix + t): (shapes[n], n) for n, t in _names(config).items()}


def load_nemotron_h_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a transformers Nemotron-H folder (one or sharded safetensors): ``(ModelConfig, state_dict with
    LanguageModel names)``. Raises FileNotFoundError for a missing folder or file, :class:`CheckpointError`
    for unsupported config values and missing, unexpected or mis-shaped tensors, naming the file."""
    config, tensors, source = read_folder(path, nemotron_h_config_from_transformers)
    for name in [n for n in tensors if n.startswith("mtp.")]:
        del tensors[name]
    prefix = "model." if any(n.startswith("model.") for n in tensors) else SAVE_PREFIX
    return config, select_state(tensors, _expected(config, prefix), source)


def save_nemotron_h_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` as a transformers Nemotron-H folder (config.json + model.safetensors), loadable by
    ``NemotronHForCausalLM.from_pretrained``; ValueError when its layers are not Nemotron-H's (see
    :func:`nemotron_h_config_to_transformers`). A tied head is written as its own tensor. Returns the
    folder's path."""
    config = model.config
    state = dict(model.state_dict())
    raw = nemotron_h_config_to_transformers(config, state["embedding.weight"].shape[0])
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embedding.weight"]
    names = _names(config)
    return write_transformers_folder(path, raw, state,
                                     lambda n: n if n == "lm_head.weight" else SAVE_PREFIX + names[n])
