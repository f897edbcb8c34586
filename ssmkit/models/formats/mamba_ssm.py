"""mamba_ssm's own checkpoint format (``MambaLMHeadModel.save_pretrained``) -> ssmkit, when it comes as
safetensors.

mamba_ssm writes ``config.json`` as its ``MambaConfig`` (``d_model``, ``d_intermediate``, ``n_layer``,
``vocab_size``, ``ssm_cfg`` with the mixer's arguments and ``"layer": "Mamba1" | "Mamba2"``,
``attn_layer_idx``, ``rms_norm``, ``residual_in_fp32``, ``pad_vocab_size_multiple``, ``tie_embeddings``)
and its weights as a pickle (``pytorch_model.bin``), which ssmkit never reads from the hub (see
:mod:`ssmkit.io.hub`). Converted copies with ``model.safetensors`` are read here. Tensor names are
``backbone.embedding.weight``, ``backbone.layers.{i}.norm.weight``, ``backbone.layers.{i}.mixer.*`` (the
names ssmkit's mixers share with mamba_ssm), with ``d_intermediate > 0`` also ``backbone.layers.{i}.norm2``
and the gated MLP ``mlp.fc1`` (value half, then gate half: ``fc2(fc1_v(x) * silu(fc1_g(x)))``) and
``mlp.fc2``; ``backbone.norm_f.weight``; ``lm_head.weight``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ssmkit.models.formats.files import CONFIG_NAME, CheckpointError, read_json, read_weights
from ssmkit.models.config import Mamba2Config, MambaConfig, MLPConfig, ModelConfig
from ssmkit.models.size import weights_limit

# mamba_ssm's MambaConfig fields and defaults (mamba_ssm/models/config_mamba.py).
_DEFAULTS: dict[str, Any] = {"d_intermediate": 0, "ssm_cfg": {}, "attn_layer_idx": [], "attn_cfg": {},
                             "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
                             "pad_vocab_size_multiple": 8, "tie_embeddings": True}
# ssm_cfg keys that only choose mamba_ssm's kernels, not the math.
_KERNEL_ONLY = {"layer", "use_fast_path", "use_mem_eff_path"}


def config_from_mamba_ssm(raw: dict[str, Any], source: Path) -> ModelConfig:
    """The :class:`ModelConfig` of a mamba_ssm ``config.json``; what ssmkit cannot represent raises
    :class:`CheckpointError` naming the field."""
    values = {**_DEFAULTS, **raw}
    if values["attn_layer_idx"]:
        raise CheckpointError(f"{source}: attn_layer_idx: mamba_ssm's attention layers are not supported")
    if values["rms_norm"] is not True:
        raise CheckpointError(f"{source}: rms_norm: only RMSNorm models are supported (LayerNorm is not)")
    ssm_cfg = values["ssm_cfg"]
    if not isinstance(ssm_cfg, dict):
        raise CheckpointError(f"{source}: ssm_cfg must be an object, got {type(ssm_cfg).__name__}")
    layer = ssm_cfg.get("layer", "Mamba1")
    mixer_args = {k: v for k, v in ssm_cfg.items() if k not in _KERNEL_ONLY}
    if "dt_limit" in mixer_args or "A_init_range" in mixer_args:
        mixer_args.update({k: tuple(mixer_args[k]) for k in ("dt_limit", "A_init_range") if k in mixer_args})
    d_intermediate = values["d_intermediate"]
    try:
        if layer == "Mamba1":
            mixer = {"layer_pattern": "M", "mamba": MambaConfig(**mixer_args)}
        elif layer == "Mamba2":
            if mixer_args.pop("d_ssm", None) is not None:
                raise CheckpointError(f"{source}: ssm_cfg.d_ssm: a partial SSM width is not supported")
            mixer = {"layer_pattern": "2", "mamba2": Mamba2Config(**mixer_args)}
        else:
            raise CheckpointError(f"{source}: ssm_cfg.layer {layer!r}: expected 'Mamba1' or 'Mamba2'")
        if d_intermediate:
            mixer["layer_pattern"] += "m"
            mixer["mlp"] = MLPConfig(d_intermediate=d_intermediate)
        return ModelConfig(vocab_size=values["vocab_size"], d_model=values["d_model"], n_layer=values["n_layer"],
                           tie_embeddings=values["tie_embeddings"], residual_in_fp32=values["residual_in_fp32"],
                           pad_vocab_size_multiple=values["pad_vocab_size_multiple"], **mixer)
    except (TypeError, KeyError) as e:  # an unknown ssm_cfg argument, a missing field
        raise CheckpointError(f"{source}: not a mamba_ssm config ssmkit can read ({e})") from None
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def load_mamba_ssm_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """``(config, state_dict with LanguageModel names)`` of a mamba_ssm folder with safetensors weights."""
    folder = Path(path)
    config = config_from_mamba_ssm(read_json(folder / CONFIG_NAME), folder / CONFIG_NAME)
    tensors, _ = read_weights(folder, max_bytes=weights_limit(config))
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name == "lm_head.weight":
            if not config.tie_embeddings:
                state[name] = tensor
            continue
        new = name.removeprefix("backbone.").replace(".norm2.", ".ff_norm.")
        match = re.fullmatch(r"(layers\.\d+)\.mlp\.(fc1|fc2)\.weight", new)
        if match and match[2] == "fc1":
            value, gate = tensor.chunk(2, dim=0)
            state[f"{match[1]}.ff.up_proj.weight"], state[f"{match[1]}.ff.gate_proj.weight"] = value, gate
        elif match:
            state[f"{match[1]}.ff.down_proj.weight"] = tensor
        else:
            state[new] = tensor
    return config, state
