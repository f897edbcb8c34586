"""transformers' Granite-4.0 hybrid checkpoints (``model_type`` ``granitemoehybrid``, IBM's Granite-4.0-H)
<-> ssmkit hybrid LanguageModels.

Every layer is a pre-norm block of one mixer — Mamba-2 (``2``, ``layer_types`` ``mamba`` /
``linear_attention``) or attention (``A``, ``attention`` / ``full_attention``) — then a pre-norm
feed-forward: with ``num_local_experts > 0`` a mixture of experts plus a shared SwiGLU MLP that every
token passes through (``e``, ssmkit's :class:`ssmkit.layers.MoE` with ``moe.shared_d_intermediate`` and
``moe.router_softmax="top_k"``: the top-k router logits, softmax over those k), with 0 experts the shared
MLP alone (``m``). The model's multipliers map to :class:`ModelConfig` fields: ``embedding_multiplier``,
``residual_multiplier`` (on every mixer and feed-forward output), ``1 / logits_scaling`` as
``logits_multiplier``; ``attention_multiplier`` is the attention's softmax scale (1.0 when the config
leaves it out, not head_dim^-1/2). Attention has rotary embeddings over whole heads when
``position_embedding_type`` is ``"rope"`` and none otherwise (``null`` or ``"nope"``). The Mamba-2 gated
RMSNorm has ``mamba_n_groups`` groups and the model's ``rms_norm_eps``, as Bamba's. In float32 the logits
match transformers' to rounding; in bfloat16 they differ a little more, as ssmkit's MoE sums the weighted
experts in float32 where transformers rounds each expert's share to bfloat16.

Tensor names (transformers -> ssmkit), ``model.layers.{i}.`` before the layer's:

========================================================= =================================================
``model.embed_tokens.weight`` / ``model.norm.weight``     ``embedding.weight`` / ``norm_f.weight``
``input_layernorm`` / ``post_attention_layernorm``        ``layers.{i}.norm`` / ``layers.{i}.ff_norm``
``mamba.*`` / ``self_attn.*``                             ``layers.{i}.mixer.*``
``shared_mlp.input_linear.weight`` [2S, H]                ``ff.[shared_mlp.]gate_proj`` and ``up_proj``
``shared_mlp.output_linear.weight`` [H, S]                ``ff.[shared_mlp.]down_proj``
``block_sparse_moe.router.layer.weight`` [E, H]           ``ff.router.weight``
``block_sparse_moe.input_linear.weight`` [E, 2F, H]       ``ff.experts.{e}.gate_proj`` and ``up_proj``
``block_sparse_moe.output_linear.weight`` [E, H, F]       ``ff.experts.{e}.down_proj``
========================================================= =================================================

The MoE tensors are read under their module names too (``router.weight``, ``experts.gate_up_proj``,
``experts.down_proj``). Fields that only affect training or generation defaults (dropouts,
``router_aux_loss_coef`` beyond ssmkit's own loss, ``output_router_logits``, ``init_method``, token ids,
``use_cache``) are not part of the function, nor are ``max_position_embeddings`` (default RoPE does not
read it) and ``normalization_function`` (transformers ignores it); ``mamba_chunk_size`` only tiles the scan.

Example::

    config, state = load_granite_checkpoint("granite-folder")  # what LanguageModel.from_pretrained does
    save_granite_checkpoint(model, "out")                      # GraniteMoeHybridForCausalLM.from_pretrained
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ssmkit.models.formats.files import CheckpointError, write_folder
from ssmkit.models.formats.hybrid_common import (
    check_tensors,
    config_field,
    config_values,
    falcon_h1_settings,
    field_error,
    read_folder,
    refuse_quantized,
    time_step_limit,
)
from ssmkit.models.formats.native import model_tensor_shapes

if TYPE_CHECKING:
    from torch import nn

    from ssmkit.models.config import ModelConfig

MODEL_TYPE = "granitemoehybrid"
# transformers' GraniteMoeHybridConfig defaults for the fields config.json may leave out.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "hidden_act": "silu", "initializer_range": 0.02, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "attention_bias": False, "embedding_multiplier": 1.0, "logits_scaling": 1.0,
    "residual_multiplier": 1.0, "attention_multiplier": 1.0, "num_local_experts": 8, "num_experts_per_tok": 2,
    "router_aux_loss_coef": 0.001, "shared_intermediate_size": 1024, "mamba_n_heads": 128, "mamba_n_groups": 1,
    "mamba_d_state": 256, "mamba_d_head": "auto", "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 256,
    "mamba_conv_bias": True, "mamba_proj_bias": False, "time_step_limit": (0.0, math.inf),
}
_DEFAULT_ROPE_THETA = 10000.0
_LAYER_TYPES = {"mamba": "2", "linear_attention": "2", "attention": "A", "full_attention": "A"}
# The fused MoE tensors under transformers' module names -> the names its save_pretrained writes.
_MODULE_NAMES = {"block_sparse_moe.experts.gate_up_proj": "block_sparse_moe.input_linear.weight",
                 "block_sparse_moe.experts.down_proj": "block_sparse_moe.output_linear.weight",
                 "block_sparse_moe.router.weight": "block_sparse_moe.router.layer.weight"}
_TOP = {"embedding.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}


def _number(values: dict[str, Any], name: str, source: Path, *, zero: bool = False) -> float:
    """values[name] as a finite number > 0 (>= 0 with ``zero``)."""
    v = values[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v if zero else 0 < v) or v == math.inf:
        raise field_error(source, name, v, f"expected a finite number {'>=' if zero else '>'} 0")
    return float(v)


def _layer_types(raw: dict[str, Any], n_layer: int, source: Path) -> str:
    """The mixer letter of every layer from ``layer_types`` (or its other name ``layers_block_type``)."""
    field = "layer_types" if raw.get("layer_types") is not None else "layers_block_type"
    types = raw.get(field)
    if types is None:
        return "2" * n_layer  # GraniteMoeHybridConfig's default: every layer Mamba-2
    if not isinstance(types, list) or any(not isinstance(t, str) for t in types):
        raise field_error(source, field, types, "expected a list of layer types")
    if len(types) != n_layer:
        raise field_error(source, field, f"<{len(types)} layer types>",
                          f"expected one per layer (num_hidden_layers = {n_layer})")
    unknown = sorted({t for t in types if t not in _LAYER_TYPES})
    if unknown:
        raise field_error(source, field, unknown, "unknown layer types; expected mamba / linear_attention or "
                          "attention / full_attention")
    return "".join(_LAYER_TYPES[t] for t in types)


def _rope(raw: dict[str, Any], head_dim: int, source: Path) -> tuple[int, float]:
    """(rotary dims per head, base): whole heads with ``position_embedding_type`` "rope", else none."""
    kind = raw.get("position_embedding_type")
    if kind in (None, "nope"):
        return 0, _DEFAULT_ROPE_THETA
    if kind != "rope":
        raise field_error(source, "position_embedding_type", kind, "expected null, 'nope' or 'rope'")
    rope = raw.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise field_error(source, "rope_parameters", rope, "expected an object")
    if raw.get("rope_scaling") not in (None, {}):
        raise field_error(source, "rope_scaling", raw["rope_scaling"], "only the default RoPE is implemented")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise field_error(source, "rope_parameters.rope_type", rope_type, "only 'default' RoPE is implemented")
    theta = rope.get("rope_theta", raw.get("rope_theta", _DEFAULT_ROPE_THETA))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta < math.inf:
        raise field_error(source, "rope_parameters.rope_theta", theta, "expected a positive number")
    if head_dim % 2:
        raise field_error(source, "position_embedding_type", kind, f"RoPE needs an even head_dim, got {head_dim}")
    return head_dim, float(theta)  # Granite's rotary embedding ignores partial_rotary_factor


def granite_config_from_transformers(raw: dict[str, Any], source: Path) -> ModelConfig:
    """The :class:`ModelConfig` of a transformers Granite-4.0 hybrid config.json; unsupported values raise
    :class:`CheckpointError` naming the field."""
    from ssmkit.models.config import (
        AttentionConfig,
        Mamba2Config,
        MLPConfig,
        ModelConfig,
        MoEConfig,
    )

    values = config_values(raw, _DEFAULTS, MODEL_TYPE, source)
    refuse_quantized(raw, source)
    if values["hidden_act"] != "silu":
        raise field_error(source, "hidden_act", values["hidden_act"], "only 'silu' is implemented")

    def get(name: str, kind: type = int, minimum: int = 1) -> Any:
        return config_field(values, source, name, kind, minimum)

    d_model, n_layer, heads = get("hidden_size"), get("num_hidden_layers"), get("num_attention_heads")
    kv_heads = heads if raw.get("num_key_value_heads") is None else get("num_key_value_heads")
    if heads % kv_heads:
        raise field_error(source, "num_key_value_heads", kv_heads, f"must divide num_attention_heads ({heads})")
    head_dim = get("head_dim") if raw.get("head_dim") is not None else d_model // heads
    if head_dim < 1:
        raise field_error(source, "num_attention_heads", heads, f"more heads than hidden_size ({d_model})")
    expand, ssm_heads = get("mamba_expand"), get("mamba_n_heads")
    ssm_head_dim = expand * d_model // ssm_heads if values["mamba_d_head"] == "auto" else get("mamba_d_head")
    if ssm_head_dim * ssm_heads != expand * d_model:
        raise field_error(source, "mamba_n_heads", ssm_heads, f"mamba_n_heads * mamba_d_head ({ssm_heads} * "
                          f"{ssm_head_dim}) must equal mamba_expand * hidden_size ({expand} * {d_model})")
    if ssm_heads % get("mamba_n_groups"):
        raise field_error(source, "mamba_n_groups", values["mamba_n_groups"],
                          f"must divide mamba_n_heads ({ssm_heads})")
    lo, hi = time_step_limit(values, source)
    rotary, theta = _rope(raw, head_dim, source)
    mixers = _layer_types(raw, n_layer, source)
    experts = get("num_local_experts", minimum=0)
    shared = get("shared_intermediate_size")
    if experts:
        top_k = get("num_experts_per_tok")
        if top_k > experts:
            raise field_error(source, "num_experts_per_tok", top_k, f"must be at most num_local_experts ({experts})")
        moe = MoEConfig(num_experts=experts, top_k=top_k, d_intermediate=get("intermediate_size"),
                        router_softmax="top_k", shared_d_intermediate=shared,
                        router_aux_loss_coef=_number(values, "router_aux_loss_coef", source, zero=True))
    else:
        moe = MoEConfig()
    try:
        return ModelConfig(
            vocab_size=get("vocab_size"), d_model=d_model, n_layer=n_layer,
            layer_pattern="".join(m + ("e" if experts else "m") for m in mixers),
            mamba2=Mamba2Config(d_state=get("mamba_d_state"), d_conv=get("mamba_d_conv"), expand=expand,
                                headdim=ssm_head_dim, ngroups=get("mamba_n_groups"),
                                chunk_size=get("mamba_chunk_size"), dt_limit=(lo, hi),
                                conv_bias=get("mamba_conv_bias", bool), bias=get("mamba_proj_bias", bool),
                                norm_before_gate=False, rmsnorm=True, D_has_hdim=False),
            attention=AttentionConfig(num_heads=heads, num_heads_kv=kv_heads, head_dim=head_dim,
                                      rotary_emb_dim=rotary, rotary_emb_base=theta,
                                      bias=get("attention_bias", bool),
                                      softmax_scale=_number(values, "attention_multiplier", source)),
            mlp=MLPConfig(d_intermediate=shared), moe=moe,
            norm_eps=get("rms_norm_eps", float), tie_embeddings=get("tie_word_embeddings", bool),
            residual_in_fp32=False, pad_vocab_size_multiple=1, initializer_range=get("initializer_range", float),
            rescale_prenorm_residual=False,
            embedding_multiplier=_number(values, "embedding_multiplier", source),
            residual_multiplier=_number(values, "residual_multiplier", source),
            logits_multiplier=1.0 / _number(values, "logits_scaling", source),
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def granite_settings(config: ModelConfig) -> list[str]:
    """The settings of ``config`` that of transformers' formats only Granite-4.0's expresses (the residual
    multiplier, an attention softmax scale, a shared expert, top-k softmax routing), where they differ from
    their neutral values in the layers the pattern uses: a writer of another format refuses them."""
    specs = config.layer_specs()
    mixers, ffs = {s.mixer for s in specs}, {s.ff for s in specs}
    found = ["residual_multiplier"] if config.residual_multiplier != 1 else []
    if mixers & {"attention", "sliding_window_attention"} and config.attention.softmax_scale is not None:
        found.append("attention.softmax_scale")
    if "moe" in ffs:
        found += ["moe.shared_d_intermediate"] if config.moe.shared_d_intermediate else []
        found += ["moe.router_softmax"] if config.moe.router_softmax != "all" else []
    return found


def wants_granite(config: ModelConfig) -> bool:
    """Whether ``config`` is written as Granite-4.0's: it has settings only that format expresses
    (:func:`granite_settings`), or it is made of Granite's layers with embedding / logits multipliers or with
    attention without RoPE beside Mamba-2 (which Bamba's format cannot say)."""
    if granite_settings(config):
        return True
    specs = config.layer_specs()
    mixers, ffs = {s.mixer for s in specs}, {s.ff for s in specs}
    if not (mixers <= {"mamba2", "attention"} and len(ffs) == 1 and ffs <= {"mlp", "moe"}):
        return False
    return (config.embedding_multiplier != 1 or config.logits_multiplier != 1
            or (mixers == {"mamba2", "attention"} and not config.attention.rotary_emb_dim))


def granite_config_to_transformers(config: ModelConfig, vocab_rows: int) -> dict[str, Any]:
    """transformers' Granite-4.0 hybrid config.json (as a dict) for ``config``; ValueError for what it cannot
    express. ``vocab_rows`` (the embedding's rows) becomes ``vocab_size``. The router z-loss coefficient is
    not part of Granite's config (it only affects training) and is dropped."""
    specs = config.layer_specs()
    m, a, moe = config.mamba2, config.attention, config.moe
    head_dim = a.head_dim or config.d_model // a.num_heads
    ffs = {s.ff for s in specs}
    problems = []
    if any(s.mixer not in ("mamba2", "attention") for s in specs) or len(ffs) != 1 or not ffs <= {"mlp", "moe"}:
        problems.append("every layer must be Mamba-2 ('2') or full attention ('A'), all followed by SwiGLU MLPs "
                        "('m') or all by mixtures of experts ('e')")
    if any(s.mixer == "mamba2" for s in specs) and (not m.rmsnorm or m.norm_before_gate or m.D_has_hdim):
        problems.append("mamba2 needs rmsnorm=true, norm_before_gate=false, D_has_hdim=false")
    if any(s.mixer == "attention" for s in specs) and a.rotary_emb_dim not in (0, head_dim):
        problems.append(f"attention.rotary_emb_dim must be 0 or head_dim ({head_dim}): Granite rotates whole heads")
    if ffs == {"moe"}:
        if moe.shared_d_intermediate < 1:
            problems.append("moe.shared_d_intermediate must be > 0 (Granite's MoE layers have a shared expert)")
        if moe.router_softmax != "top_k" and not moe.renormalize:
            problems.append("moe needs router_softmax='top_k' (or renormalize=true, the same weights)")
    if ffs == {"mlp"} and config.mlp.bias:
        problems.append("mlp.bias must be false")
    if config.logits_multiplier == 0:
        problems.append("logits_multiplier must not be 0 (Granite divides the logits by its inverse)")
    others = [n for n in falcon_h1_settings(config) if n not in ("embedding_multiplier", "logits_multiplier")]
    if others:
        problems.append(f"{', '.join(others)}: only transformers' Falcon-H1 expresses these settings")
    if problems:
        raise ValueError(f"layer_pattern {config.layer_pattern!r} cannot be saved as transformers' Granite-4.0 "
                         "hybrid (granitemoehybrid): " + "; ".join(problems))
    experts = ffs == {"moe"}
    raw = {
        "architectures": ["GraniteMoeHybridForCausalLM"], "model_type": MODEL_TYPE, "vocab_size": vocab_rows,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layer,
        "layer_types": ["mamba" if s.mixer == "mamba2" else "attention" for s in specs],
        "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_heads_kv or a.num_heads,
        "attention_bias": a.bias, "attention_multiplier": head_dim**-0.5 if a.softmax_scale is None else a.softmax_scale,
        "position_embedding_type": "rope" if a.rotary_emb_dim else "nope",
        "rope_parameters": {"rope_type": "default", "rope_theta": a.rotary_emb_base},
        "num_local_experts": moe.num_experts if experts else 0, "num_experts_per_tok": moe.top_k if experts else 0,
        "intermediate_size": moe.d_intermediate if experts else config.mlp.d_intermediate,
        "shared_intermediate_size": moe.shared_d_intermediate if experts else config.mlp.d_intermediate,
        "router_aux_loss_coef": moe.router_aux_loss_coef,
        "mamba_n_heads": m.expand * config.d_model // m.headdim, "mamba_d_head": m.headdim,
        "mamba_n_groups": m.ngroups, "mamba_d_state": m.d_state, "mamba_d_conv": m.d_conv, "mamba_expand": m.expand,
        "mamba_chunk_size": m.chunk_size, "mamba_conv_bias": m.conv_bias, "mamba_proj_bias": m.bias,
        "time_step_limit": [float(v) for v in m.dt_limit], "rms_norm_eps": config.norm_eps,
        "embedding_multiplier": config.embedding_multiplier, "residual_multiplier": config.residual_multiplier,
        "logits_scaling": 1.0 / config.logits_multiplier, "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu", "initializer_range": config.initializer_range,
        # ssmkit has no special tokens in its config; transformers' defaults would stop generate() early.
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }
    if head_dim != config.d_model // a.num_heads:
        raw["head_dim"] = head_dim  # read by transformers' attention and rotary embedding
    return raw


def _to_transformers(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """ssmkit tensors -> transformers' (the gate and up projections fused, the experts stacked)."""
    specs = config.layer_specs()
    out = {}
    for name, t in state.items():
        if name in _TOP:
            out[_TOP[name]] = t
            continue
        i, part, rest = re.fullmatch(r"layers\.(\d+)\.(norm|ff_norm|mixer|ff)\.(.+)", name).groups()
        if part == "mixer":
            out[f"model.layers.{i}.{'mamba' if specs[int(i)].mixer == 'mamba2' else 'self_attn'}.{rest}"] = t
        elif part != "ff":
            out[f"model.layers.{i}.{'input_layernorm' if part == 'norm' else 'post_attention_layernorm'}.{rest}"] = t
    for i, spec in enumerate(specs):
        ff, hf = f"layers.{i}.ff.", f"model.layers.{i}."
        shared = ff if spec.ff == "mlp" else ff + "shared_mlp."
        out[hf + "shared_mlp.input_linear.weight"] = torch.cat(
            [state[shared + "gate_proj.weight"], state[shared + "up_proj.weight"]])
        out[hf + "shared_mlp.output_linear.weight"] = state[shared + "down_proj.weight"]
        if spec.ff == "moe":
            experts = range(config.moe.num_experts)
            out[hf + "block_sparse_moe.router.layer.weight"] = state[ff + "router.weight"]
            out[hf + "block_sparse_moe.input_linear.weight"] = torch.stack([torch.cat(
                [state[f"{ff}experts.{e}.gate_proj.weight"], state[f"{ff}experts.{e}.up_proj.weight"]])
                for e in experts])
            out[hf + "block_sparse_moe.output_linear.weight"] = torch.stack(
                [state[f"{ff}experts.{e}.down_proj.weight"] for e in experts])
    return out


def _from_transformers(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_to_transformers` (views of ``tensors``)."""
    specs = config.layer_specs()
    state = {}
    for name in model_tensor_shapes(config):
        if name in _TOP:
            state[name] = tensors[_TOP[name]]
            continue
        i, part, rest = re.fullmatch(r"layers\.(\d+)\.(norm|ff_norm|mixer|ff)\.(.+)", name).groups()
        hf = f"model.layers.{i}."
        if part == "mixer":
            state[name] = tensors[f"{hf}{'mamba' if specs[int(i)].mixer == 'mamba2' else 'self_attn'}.{rest}"]
        elif part != "ff":
            state[name] = tensors[f"{hf}{'input_layernorm' if part == 'norm' else 'post_attention_layernorm'}.{rest}"]
        elif rest == "router.weight":
            state[name] = tensors[hf + "block_sparse_moe.router.layer.weight"]
        else:
            expert, proj = re.fullmatch(r"(?:experts\.(\d+)\.|shared_mlp\.)?(gate|up|down)_proj\.weight", rest).groups()
            module = "shared_mlp" if expert is None else "block_sparse_moe"
            which = "output_linear" if proj == "down" else "input_linear"
            t = tensors[f"{hf}{module}.{which}.weight"]
            t = t if expert is None else t[int(expert)]
            state[name] = t if proj == "down" else t.chunk(2)[proj == "up"]
    return state


def load_granite_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a transformers Granite-4.0 hybrid folder (one or sharded safetensors): ``(ModelConfig,
    state_dict with LanguageModel names)``. Raises FileNotFoundError for a missing folder or file,
    :class:`CheckpointError` for unsupported config values and missing, unexpected or mis-shaped tensors,
    naming the file."""
    config, tensors, source = read_folder(path, granite_config_from_transformers)
    for name in list(tensors):
        for module_name, saved_name in _MODULE_NAMES.items():
            if name.endswith(module_name):
                tensors[name.removesuffix(module_name) + saved_name] = tensors.pop(name)
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    meta = {n: torch.empty(shape, device="meta") for n, shape in model_tensor_shapes(config).items()}
    expected = {n: (tuple(t.shape), n) for n, t in _to_transformers(meta, config).items()}
    check_tensors(tensors, expected, source)
    return config, _from_transformers(tensors, config)


def save_granite_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` as a transformers Granite-4.0 hybrid folder (config.json + model.safetensors),
    loadable by ``GraniteMoeHybridForCausalLM.from_pretrained``; ValueError when it is not Granite's (see
    :func:`granite_config_to_transformers`). Returns the folder's path."""
    config = model.config
    state = model.state_dict()
    raw = granite_config_to_transformers(config, state["embedding.weight"].shape[0])
    raw["dtype"] = str(state["embedding.weight"].dtype).removeprefix("torch.")
    tensors = _to_transformers({n: t.detach().to("cpu") for n, t in state.items()}, config)
    return write_folder(path, raw, {n: t.contiguous().clone() for n, t in tensors.items()})


__all__ = [
    "MODEL_TYPE",
    "granite_config_from_transformers",
    "granite_config_to_transformers",
    "granite_settings",
    "load_granite_checkpoint",
    "save_granite_checkpoint",
    "wants_granite",
]
