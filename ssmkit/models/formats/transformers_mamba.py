"""Hugging Face transformers checkpoints of Mamba, Falcon-Mamba and Mamba-2 <-> ssmkit.

transformers names the tensors ``backbone.embeddings.weight``, ``backbone.layers.{i}.norm.weight``,
``backbone.layers.{i}.mixer.*``, ``backbone.norm_f.weight`` and ``lm_head.weight`` (absent when tied);
ssmkit's :class:`~ssmkit.models.LanguageModel` uses the same mixer names, so conversion renames
prefixes (``backbone.`` dropped, ``embeddings`` -> ``embedding``) after checking every tensor against
the shapes the config implies.

Example::

    config, state = load_transformers_checkpoint("mamba-130m-hf")   # what LanguageModel.from_pretrained does
    save_transformers_checkpoint(model, "out")                        # AutoModelForCausalLM.from_pretrained("out")
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ssmkit.models.formats.files import CONFIG_NAME, CheckpointError, read_json, read_weights, write_folder
from ssmkit.models.formats.transformers_config import config_from_transformers, config_to_transformers
from ssmkit.models.size import weights_limit

if TYPE_CHECKING:
    from torch import nn

    from ssmkit.models.config import ModelConfig


def _mixer_shapes(raw: dict[str, Any], config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """transformers' tensor shapes for one mixer, keyed by name under ``mixer.``."""
    d = config.d_model
    if raw["model_type"] == "mamba2":
        m = config.mamba2
        inner = int(m.expand * d)
        heads, conv_dim = inner // m.headdim, inner + 2 * m.ngroups * m.d_state
        shapes = {
            "in_proj.weight": (inner + conv_dim + heads, d),
            "conv1d.weight": (conv_dim, 1, m.d_conv),
            "dt_bias": (heads,),
            "A_log": (heads,),
            "D": (heads,),
            "norm.weight": (inner,),
            "out_proj.weight": (d, inner),
        }
        if m.conv_bias:
            shapes["conv1d.bias"] = (conv_dim,)
        if m.bias:
            shapes.update({"in_proj.bias": (inner + conv_dim + heads,), "out_proj.bias": (d,)})
        return shapes
    m = config.mamba
    inner = int(m.expand * d)
    rank = math.ceil(d / 16) if m.dt_rank == "auto" else m.dt_rank
    shapes = {
        "in_proj.weight": (2 * inner, d),
        "conv1d.weight": (inner, 1, m.d_conv),
        "x_proj.weight": (rank + 2 * m.d_state, inner),
        "dt_proj.weight": (inner, rank),
        "dt_proj.bias": (inner,),
        "A_log": (inner, m.d_state),
        "D": (inner,),
        "out_proj.weight": (d, inner),
    }
    if m.conv_bias:
        shapes["conv1d.bias"] = (inner,)
    if m.bias:
        shapes.update({"in_proj.bias": (2 * inner,), "out_proj.bias": (d,)})
    return shapes


def _expected_shapes(raw: dict[str, Any], config: ModelConfig, vocab_rows: int) -> dict[str, tuple[int, ...]]:
    """Every transformers tensor name of the checkpoint with its shape."""
    d = config.d_model
    shapes = {"backbone.embeddings.weight": (vocab_rows, d), "backbone.norm_f.weight": (d,)}
    mixer = _mixer_shapes(raw, config)
    for i in range(config.n_layer):
        shapes[f"backbone.layers.{i}.norm.weight"] = (d,)
        shapes.update({f"backbone.layers.{i}.mixer.{k}": v for k, v in mixer.items()})
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (vocab_rows, d)
    return shapes


def _to_ssmkit_name(name: str) -> str:
    if name == "lm_head.weight":
        return name
    name = name.removeprefix("backbone.")
    return "embedding.weight" if name == "embeddings.weight" else name


def _to_transformers_name(name: str) -> str:
    if name == "lm_head.weight":
        return name
    return "backbone." + ("embeddings.weight" if name == "embedding.weight" else name)


def _check_mamba2_mlp_prefix(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                             source: Path) -> None:
    """mamba_ssm's Mamba2 may put a gated MLP's [z0, x0] (2 * d_mlp rows) in front of in_proj."""
    for name, want in expected.items():
        if name.endswith("mixer.in_proj.weight") and name in tensors:
            extra = tensors[name].shape[0] - want[0]
            if extra > 0 and extra % 2 == 0 and tuple(tensors[name].shape[1:]) == want[1:]:
                raise CheckpointError(
                    f"{source}: {name} has {tensors[name].shape[0]} rows, {extra} more than "
                    f"2*intermediate + 2*n_groups*state_size + num_heads = {want[0]}: a gated-MLP prefix "
                    f"(d_mlp = {extra // 2}) from mamba_ssm, which neither transformers' Mamba2 nor ssmkit implements"
                )


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: Path) -> None:
    missing = [n for n in expected if n not in tensors]
    unexpected = sorted(n for n in tensors if n not in expected)
    if missing:
        raise CheckpointError(f"{source}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                              f"({len(missing)} in all) that the config implies")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors {unexpected[:8]}"
                              f"{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)} in all)")
    for name, want in expected.items():
        t = tensors[name]
        if tuple(t.shape) != want:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(t.shape)}, the config implies {want}")
        if not t.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name} has dtype {t.dtype}, expected a floating-point dtype")


def load_transformers_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a transformers checkpoint folder of model_type mamba, falcon_mamba or mamba2.

    Args:
        path: a folder with ``config.json`` and ``model.safetensors`` (or sharded safetensors with
            ``model.safetensors.index.json``; or ``pytorch_model.bin``, read only with
            ``torch.load(weights_only=True)``).

    Returns:
        ``(config, state_dict)``: the equivalent :class:`ModelConfig` and a state dict with
        :class:`LanguageModel` names (CPU tensors in the stored dtype; no ``lm_head.weight`` when tied).

    Raises:
        FileNotFoundError: the folder, its config.json or its weights are missing.
        CheckpointError: (a ValueError) another model type, a config field ssmkit does not implement, a
            missing, unexpected or mis-shaped tensor, or a corrupt or truncated file; the message names
            the file.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a checkpoint folder")
    config_path = folder / CONFIG_NAME
    raw = read_json(config_path)
    config = config_from_transformers(raw, config_path)
    tensors, source = read_weights(folder, max_bytes=weights_limit(config))
    if config.tie_embeddings:
        # Tied checkpoints sometimes store the head too; transformers ties it to the embedding anyway.
        tensors.pop("lm_head.weight", None)
    if "backbone.embedding.weight" in tensors and "backbone.embeddings.weight" not in tensors:
        # The name mamba_ssm uses, which transformers' own load hook also accepts.
        tensors["backbone.embeddings.weight"] = tensors.pop("backbone.embedding.weight")
    expected = _expected_shapes(raw, config, config.vocab_size)
    if raw["model_type"] == "mamba2":
        _check_mamba2_mlp_prefix(tensors, expected, source)
    _check_tensors(tensors, expected, source)
    return config, {_to_ssmkit_name(n): t for n, t in tensors.items()}


def save_transformers_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` as a transformers checkpoint folder (config.json + model.safetensors).

    Pure Mamba-1 models become model_type ``mamba`` (``falcon_mamba`` when ``mamba.mixer_rms_eps`` is
    set), pure Mamba-2 models ``mamba2``; ``transformers.AutoModelForCausalLM.from_pretrained(path)``
    loads the result and computes the same logits. Tensors are saved in the model's dtype. The folder is
    written atomically (see :func:`ssmkit.models.formats.files.write_folder`). Returns the folder's path.

    Raises:
        ValueError: the model has layers or settings transformers' classes cannot express (attention,
            feed-forward layers, mixed layer kinds, norm_before_gate, ...).
    """
    config = model.config
    state = {n: t for n, t in model.state_dict().items() if not (config.tie_embeddings and n == "lm_head.weight")}
    if "embedding.weight" not in state:
        raise ValueError("model has no 'embedding.weight'; expected an ssmkit LanguageModel")
    vocab_rows = state["embedding.weight"].shape[0]
    raw = config_to_transformers(config, vocab_rows)
    # The main dtype (ssmkit keeps A_log, D and dt_bias in float32 under bf16 weights; transformers
    # casts them to this dtype when it loads).
    raw["dtype"] = str(state["embedding.weight"].dtype).removeprefix("torch.")
    tensors = {_to_transformers_name(n): t.detach().to("cpu").contiguous().clone() for n, t in state.items()}
    expected = _expected_shapes(raw, config, vocab_rows)
    try:
        _check_tensors(tensors, expected, Path(type(model).__name__))
    except CheckpointError as e:
        raise ValueError(f"model does not fit transformers' {raw['architectures'][0]} layout: {e}") from None
    return write_folder(path, raw, tensors)
