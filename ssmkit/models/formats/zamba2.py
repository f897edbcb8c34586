"""transformers' Zamba2 checkpoints (``model_type`` ``zamba2``, Zyphra's Zamba2-1.2B / 2.7B / 7B) <-> ssmkit
LanguageModels of Mamba-2 (``2``) and shared-transformer hybrid (``Z``) layers.

A Zamba2 layer is a pre-norm Mamba-2 layer (``"mamba"`` / ``"linear_attention"`` in ``layers_block_type``)
or, at ``"hybrid"``, a call of one of ``num_mem_blocks`` shared transformer blocks (in rotation) on the
residual concatenated with the input embeddings, whose output, through the layer's own ``linear``, is
added to the Mamba-2 layer's input (:mod:`ssmkit.layers.shared_transformer_mamba2`). Each call has its own
low-rank adapters (rank ``adapter_rank``) on the block's MLP and, with ``use_shared_attention_adapter``,
on its q, k and v projections. The shared blocks are the model's (``LanguageModel.shared``), held once.

Tensor names (``F(b)``: the transformers layer of block b's first call, where transformers keeps the
block and every adapter of its calls; k: the call's index among the hybrid layers):

========================================================================== =====================================
transformers                                                               ssmkit
========================================================================== =====================================
``model.embed_tokens.weight`` / ``model.final_layernorm.weight``           ``embedding.weight`` / ``norm_f.weight``
``model.layers.{j}.input_layernorm.weight`` / ``.mamba.*`` (Mamba-2)       ``layers.{j}.norm.weight`` / ``.mixer.*``
``model.layers.{j}.mamba_decoder.input_layernorm.weight`` (hybrid)         ``layers.{j}.norm.weight``
``model.layers.{j}.mamba_decoder.mamba.*`` / ``.linear.weight``            ``layers.{j}.mixer.mamba.*`` / ``.linear.weight``
``model.layers.{F(b)}.shared_transformer.*`` (not the adapter lists)       ``shared.shared_transformer_mamba2.{b}.*``
``...feed_forward.gate_up_proj_adapter_list.{k}.{0,1}.weight``             ``layers.{j}.mixer.mlp_adapter.{0,1}.weight``
``...self_attn.linear_{q,k,v}_adapter_list.{k}.{0,1}.weight``              ``layers.{j}.mixer.{q,k,v}_adapter.{0,1}.weight``
========================================================================== =====================================

What transformers 5.25 does and ssmkit follows: the Mamba-2 gated norm's eps is 1e-5 whatever
``rms_norm_eps`` (so only ``rms_norm_eps`` 1e-5 is read: ssmkit's Mamba-2 norms share the model's eps); Δ is
clamped below at ``time_step_min`` in the parallel scan; the convolution always has a bias
(``use_conv_bias`` is ignored); attention logits are scaled by ``(head_dim / 2) ** -0.5``; RoPE
(``use_mem_rope``) rotates whole heads. transformers ties the shared blocks of later calls only when
``tie_word_embeddings`` is true (otherwise it leaves them untied and does not load them), so an untied head
with more hybrid layers than ``num_mem_blocks`` is refused both ways. Fields that only affect training,
initialisation or generation defaults (dropout, ``time_step_max/floor``, ``use_cache``, token ids,
``num_logits_to_keep``, ``use_mamba_kernels``, ``use_mem_eff_path``, ``max_position_embeddings`` and
``use_long_context``, which in 5.25 only changes it) are not part of the function.

Example::

    config, state = load_zamba2_checkpoint("zamba2-folder")     # what LanguageModel.from_pretrained does
    save_zamba2_checkpoint(model, "out")                         # Zamba2ForCausalLM.from_pretrained("out")
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
    write_transformers_folder,
)
from ssmkit.models.formats.native import model_tensor_shapes

if TYPE_CHECKING:
    from torch import nn

    from ssmkit.models.config import ModelConfig

MODEL_TYPE = "zamba2"
SHARED = "shared.shared_transformer_mamba2."
# transformers' Zamba2Config defaults for the fields config.json may leave out.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 2560, "mamba_d_state": 64, "mamba_d_conv": 4, "mamba_expand": 2,
    "mamba_ngroups": 1, "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 1e-4,
    "n_mamba_heads": 8, "chunk_size": 256, "add_bias_linear": False, "hidden_act": "gelu",
    "num_attention_heads": 32, "num_mem_blocks": 1, "use_shared_attention_adapter": False, "adapter_rank": 128,
    "use_mem_rope": False, "initializer_range": 0.02, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
}
_DEFAULT_TYPES = (["mamba"] + (["mamba"] * 5 + ["hybrid"]) * 7 + ["mamba"] * 4 + ["hybrid"] + ["mamba"] * 3
                  + ["hybrid"] + ["mamba"] * 2)  # Zamba2Config's layers_block_type when absent
_MAMBA_TYPES = ("mamba", "linear_attention")
_MAMBA_NORM_EPS = 1e-5  # Zamba2RMSNormGated's, fixed


def _layer_types(raw: dict[str, Any], source: Path) -> list[str]:
    field = "layers_block_type" if raw.get("layers_block_type") is not None else "layer_types"
    types = raw.get(field)
    if types is None:
        return list(_DEFAULT_TYPES)
    if not isinstance(types, list) or not types or any(not isinstance(t, str) for t in types):
        raise field_error(source, field, types, "expected a non-empty list of layer types")
    if len(types) > MAX_LAYERS:
        raise field_error(source, field, f"<{len(types)} layers>", f"at most {MAX_LAYERS:,} layers")
    unknown = sorted({t for t in types if t not in (*_MAMBA_TYPES, "hybrid")})
    if unknown:
        raise field_error(source, field, unknown, "unknown layer types; expected 'mamba' (or 'linear_attention') "
                          "and 'hybrid'")
    return ["hybrid" if t == "hybrid" else "mamba" for t in types]


def _rope_theta(raw: dict[str, Any], source: Path) -> float:
    rope = raw.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise field_error(source, "rope_parameters", rope, "expected an object")
    if raw.get("rope_scaling") not in (None, {}):
        raise field_error(source, "rope_scaling", raw["rope_scaling"], "only the default RoPE is implemented")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise field_error(source, "rope_parameters.rope_type", rope_type, "only 'default' RoPE is implemented")
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta < math.inf:
        raise field_error(source, "rope_parameters.rope_theta", theta, "expected a positive number")
    return float(theta)


def _derived(raw: dict[str, Any], name: str, value: Any, source: Path) -> None:
    """A field transformers derives, which config.json may repeat (and then overrides it with): only the
    derived value is the model's function here."""
    if raw.get(name) is not None and raw[name] != value:
        raise field_error(source, name, raw[name], f"expected {value!r} (derived from the other fields)")


def zamba2_config_from_transformers(raw: dict[str, Any], source: Path) -> ModelConfig:
    """The :class:`ModelConfig` of a transformers Zamba2 config.json; unsupported values raise
    :class:`CheckpointError` naming the field."""
    from ssmkit.layers.shared_transformer import ACTIVATIONS, SharedTransformerConfig
    from ssmkit.models.config import Mamba2Config, ModelConfig

    values = config_values(raw, _DEFAULTS, MODEL_TYPE, source)
    refuse_quantized(raw, source)

    def get(name: str, kind: type = int, minimum: int = 1) -> Any:
        return config_field(values, source, name, kind, minimum)

    types = _layer_types(raw, source)
    n_layer, d = len(types), get("hidden_size")
    if raw.get("num_hidden_layers") is not None and raw["num_hidden_layers"] != n_layer:
        raise field_error(source, "num_hidden_layers", raw["num_hidden_layers"],
                          f"layers_block_type lists {n_layer} layers")
    hybrid = [i for i, t in enumerate(types) if t == "hybrid"]
    _derived(raw, "hybrid_layer_ids", hybrid, source)
    _derived(raw, "attention_hidden_size", 2 * d, source)
    heads, expand, ssm_heads = get("num_attention_heads"), get("mamba_expand"), get("n_mamba_heads")
    kv_heads = heads if raw.get("num_key_value_heads") is None else get("num_key_value_heads")
    if heads % kv_heads:
        raise field_error(source, "num_key_value_heads", kv_heads, f"must divide num_attention_heads ({heads})")
    if (expand * d) % ssm_heads:
        raise field_error(source, "n_mamba_heads", ssm_heads, f"must divide mamba_expand * hidden_size ({expand * d})")
    _derived(raw, "mamba_headdim", expand * d // ssm_heads, source)
    if ssm_heads % get("mamba_ngroups"):
        raise field_error(source, "mamba_ngroups", values["mamba_ngroups"], f"must divide n_mamba_heads ({ssm_heads})")
    head_key = "attention_head_dim" if raw.get("attention_head_dim") is not None else "head_dim"
    head_dim = get(head_key) if raw.get(head_key) is not None else 2 * d // heads
    if head_dim < 1:
        raise field_error(source, "num_attention_heads", heads, f"more heads than 2 * hidden_size ({2 * d})")
    adapters = get("use_shared_attention_adapter", bool)
    if adapters and hybrid and (heads * head_dim != 2 * d or kv_heads != heads):
        raise field_error(source, "use_shared_attention_adapter", True, "transformers' attention adapters need "
                          "num_attention_heads * head_dim == 2 * hidden_size and num_key_value_heads == "
                          "num_attention_heads")
    if values["hidden_act"] not in ACTIVATIONS:
        raise field_error(source, "hidden_act", values["hidden_act"], f"expected one of {', '.join(ACTIVATIONS)}")
    eps = get("rms_norm_eps", float)
    if eps != _MAMBA_NORM_EPS:
        raise field_error(source, "rms_norm_eps", eps, "only 1e-5 is supported: transformers' Mamba-2 gated norm "
                          "keeps 1e-5, and ssmkit's Mamba-2 norms use the model's eps")
    tied, mem_blocks = get("tie_word_embeddings", bool), get("num_mem_blocks")
    if not tied and len(hybrid) > mem_blocks:
        raise field_error(source, "tie_word_embeddings", False, f"transformers ties the shared blocks of the "
                          f"{len(hybrid)} hybrid layers only with a tied head (num_mem_blocks {mem_blocks})")
    intermediate = 4 * d if raw.get("intermediate_size") is None else get("intermediate_size")
    dt_min = get("time_step_min", float)
    try:
        return ModelConfig(
            vocab_size=get("vocab_size"), d_model=d, n_layer=n_layer,
            layer_pattern="".join("Z" if t == "hybrid" else "2" for t in types),
            mamba2=Mamba2Config(d_state=get("mamba_d_state"), d_conv=get("mamba_d_conv"), expand=expand,
                                headdim=expand * d // ssm_heads, ngroups=get("mamba_ngroups"),
                                chunk_size=get("chunk_size"), dt_min=dt_min, dt_max=get("time_step_max", float),
                                dt_init_floor=get("time_step_floor", float), dt_limit=(dt_min, math.inf),
                                conv_bias=True, bias=get("add_bias_linear", bool), norm_before_gate=False,
                                rmsnorm=True, D_has_hdim=False),
            shared_transformer=SharedTransformerConfig(
                num_blocks=max(1, min(mem_blocks, len(hybrid))), num_heads=heads, num_heads_kv=kv_heads,
                head_dim=head_dim, rotary_emb_dim=head_dim if get("use_mem_rope", bool) else 0,
                rotary_emb_base=_rope_theta(raw, source), d_intermediate=intermediate,
                activation=values["hidden_act"], mlp_bias=values["add_bias_linear"],
                adapter_rank=get("adapter_rank"), attention_adapters=adapters),
            norm_eps=eps, tie_embeddings=tied, residual_in_fp32=False, pad_vocab_size_multiple=1,
            initializer_range=get("initializer_range", float), rescale_prenorm_residual=False,
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def zamba2_config_to_transformers(config: ModelConfig, vocab_rows: int) -> dict[str, Any]:
    """transformers' Zamba2 config.json (as a dict) for ``config``; ValueError for what Zamba2 cannot express.
    ``vocab_rows`` (the embedding's rows) becomes ``vocab_size``."""
    specs = config.layer_specs()
    m, s, d = config.mamba2, config.shared_transformer, config.d_model
    calls = sum(spec.mixer == "shared_transformer_mamba2" for spec in specs)
    p, problems = s.head_size(d), []
    if any(spec.mixer not in ("mamba2", "shared_transformer_mamba2") or spec.ff is not None for spec in specs):
        problems.append("every layer must be Mamba-2 ('2') or a shared-transformer hybrid ('Z'), without feed-forward")
    if not m.rmsnorm or m.norm_before_gate or m.D_has_hdim or not m.conv_bias:
        problems.append("mamba2 needs rmsnorm=true, norm_before_gate=false, D_has_hdim=false, conv_bias=true")
    if not 0 < m.dt_limit[0] or m.dt_limit[1] != math.inf:
        problems.append("mamba2.dt_limit must be (time_step_min > 0, inf)")
    if (m.expand * d) % m.headdim:
        problems.append("mamba2.headdim must divide expand * d_model")
    if config.norm_eps != _MAMBA_NORM_EPS:
        problems.append("norm_eps must be 1e-5 (transformers' Mamba-2 gated norm keeps 1e-5)")
    if calls:
        if m.bias != s.mlp_bias:
            problems.append("mamba2.bias and shared_transformer.mlp_bias are one field (add_bias_linear)")
        if s.rotary_emb_dim not in (0, p):
            problems.append("shared_transformer.rotary_emb_dim must be 0 or head_dim (use_mem_rope)")
        if s.softmax_scale is not None and s.softmax_scale != (p / 2) ** -0.5:
            problems.append("shared_transformer.softmax_scale must be null ((head_dim / 2) ** -0.5)")
        if s.attention_adapters and (s.num_heads * p != 2 * d or s.kv_heads() != s.num_heads):
            problems.append("attention adapters need num_heads * head_dim == 2 * d_model and num_heads_kv == num_heads")
        if not config.tie_embeddings and calls > s.num_blocks:
            problems.append("an untied head with more Z layers than shared_transformer.num_blocks (transformers "
                            "ties the shared blocks only with a tied head)")
    if problems:
        raise ValueError(f"layer_pattern {config.layer_pattern!r} cannot be saved as transformers' Zamba2: "
                         + "; ".join(problems))
    return {
        "architectures": ["Zamba2ForCausalLM"], "model_type": MODEL_TYPE, "vocab_size": vocab_rows,
        "hidden_size": d, "num_hidden_layers": config.n_layer,
        "layers_block_type": ["hybrid" if spec.mixer == "shared_transformer_mamba2" else "mamba" for spec in specs],
        "mamba_d_state": m.d_state, "mamba_d_conv": m.d_conv, "mamba_expand": m.expand, "mamba_ngroups": m.ngroups,
        "n_mamba_heads": m.expand * d // m.headdim, "time_step_min": float(m.dt_limit[0]),
        "time_step_max": m.dt_max, "time_step_floor": m.dt_init_floor, "use_conv_bias": True,
        "chunk_size": m.chunk_size, "add_bias_linear": m.bias, "intermediate_size": s.mlp_width(d),
        "hidden_act": s.activation, "num_attention_heads": s.num_heads, "num_key_value_heads": s.kv_heads(),
        "attention_head_dim": p, "num_mem_blocks": s.num_blocks, "use_shared_attention_adapter": s.attention_adapters,
        "adapter_rank": s.adapter_rank, "use_mem_rope": bool(s.rotary_emb_dim),
        "rope_parameters": {"rope_type": "default", "rope_theta": s.rotary_emb_base},
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.initializer_range,
        # ssmkit has no special tokens in its config; transformers' defaults would stop generate() early.
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }


def _calls(config: ModelConfig) -> tuple[list[int], dict[int, int]]:
    """(the layers of the Z calls in order, {shared block b: F(b), the layer of its first call})."""
    calls = [j for j, spec in enumerate(config.layer_specs()) if spec.mixer == "shared_transformer_mamba2"]
    return calls, {b: calls[b] for b in range(min(config.shared_transformer.num_blocks, len(calls)))}


def _names(config: ModelConfig) -> dict[str, str]:
    """ssmkit name -> transformers name of every tensor of ``config``'s model."""
    calls, first = _calls(config)
    call_of = {j: k for k, j in enumerate(calls)}
    blocks = config.shared_transformer.num_blocks
    top = {"embedding.weight": "model.embed_tokens.weight", "norm_f.weight": "model.final_layernorm.weight",
           "lm_head.weight": "lm_head.weight"}
    names = {}
    for name in model_tensor_shapes(config):
        if name in top:
            names[name] = top[name]
            continue
        if name.startswith(SHARED):
            b, rest = name[len(SHARED):].split(".", 1)
            names[name] = f"model.layers.{first[int(b)]}.shared_transformer.{rest}"
            continue
        j, part, rest = re.fullmatch(r"layers\.(\d+)\.(norm|mixer)\.(.+)", name).groups()
        j = int(j)
        if j not in call_of:  # a Mamba-2 layer
            names[name] = f"model.layers.{j}.{'input_layernorm' if part == 'norm' else 'mamba'}.{rest}"
            continue
        k = call_of[j]
        owner = f"model.layers.{first[k % blocks]}.shared_transformer"
        adapter = re.fullmatch(r"(mlp|q|k|v)_adapter\.(.+)", rest)
        if part == "norm":
            names[name] = f"model.layers.{j}.mamba_decoder.input_layernorm.{rest}"
        elif rest.startswith("mamba."):
            names[name] = f"model.layers.{j}.mamba_decoder.{rest}"
        elif adapter and adapter[1] == "mlp":
            names[name] = f"{owner}.feed_forward.gate_up_proj_adapter_list.{k}.{adapter[2]}"
        elif adapter:
            names[name] = f"{owner}.self_attn.linear_{adapter[1]}_adapter_list.{k}.{adapter[2]}"
        else:
            names[name] = f"model.layers.{j}.{rest}"  # linear.weight
    return names


def _drop_tied_copies(config: ModelConfig, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Remove the copies of a shared block at its later calls (what transformers ties to the first call's,
    ``model.layers.{j}.shared_transformer.*``), after checking each equals the tensor it is tied to."""
    calls, first = _calls(config)
    block_of = {j: k % config.shared_transformer.num_blocks for k, j in enumerate(calls)}
    for name in list(tensors):
        match = re.fullmatch(r"model\.layers\.(\d+)\.shared_transformer\.(.+)", name)
        if match is None or int(match[1]) not in block_of or int(match[1]) in first.values():
            continue
        tied = f"model.layers.{first[block_of[int(match[1])]]}.shared_transformer.{match[2]}"
        if tied in tensors:
            if tensors[name].shape != tensors[tied].shape or not torch.equal(tensors[name], tensors[tied]):
                raise CheckpointError(f"{source}: tensor {name} differs from {tied}, the shared block's tensor it "
                                      "is tied to")
            del tensors[name]


def load_zamba2_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a transformers Zamba2 folder (one or sharded safetensors): ``(ModelConfig, state_dict with
    LanguageModel names)``. Raises FileNotFoundError for a missing folder or file, :class:`CheckpointError`
    for unsupported config values and missing, unexpected or mis-shaped tensors, naming the file."""
    config, tensors, source = read_folder(path, zamba2_config_from_transformers)
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    _drop_tied_copies(config, tensors, source)
    shapes = model_tensor_shapes(config)
    return config, select_state(tensors, {t: (shapes[n], n) for n, t in _names(config).items()}, source)


def save_zamba2_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` as a transformers Zamba2 folder (config.json + model.safetensors), loadable by
    ``Zamba2ForCausalLM.from_pretrained``; ValueError when its layers are not Zamba2's (see
    :func:`zamba2_config_to_transformers`). Returns the folder's path."""
    config = model.config
    state = model.state_dict()
    raw = zamba2_config_to_transformers(config, state["embedding.weight"].shape[0])
    names = _names(config)
    return write_transformers_folder(path, raw, state, names.__getitem__)
