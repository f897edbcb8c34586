"""ssmkit checkpoint folders: atomic writes, errors that name the file.

An ssmkit checkpoint folder holds::

    config.json        {"format": "ssmkit", "format_version": 1, "architecture": "LanguageModel",
                        "config": {...ModelConfig.to_dict()...}}
    model.safetensors  the model's state_dict (no lm_head entry when the embeddings are tied)

Both files are written to a temporary name in the folder and renamed, so a crash never leaves a
half-written file under the final name. Tensors are only read through safetensors (no pickle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ssmkit.io import files
from ssmkit.io.files import (
    load_safetensors,
    save_safetensors_atomic,
    shown,
    write_text_atomic,
)
from ssmkit.io.hub import SAFETENSORS_WEIGHTS, is_mamba_ssm_config, mamba_ssm_hint
from ssmkit.layers.quantized import apply_quantization_record, quantization_record
from ssmkit.models.blocks import build_blocks, build_shared
from ssmkit.models.config import ModelConfig

if TYPE_CHECKING:
    from torch import nn

FORMAT = "ssmkit"
FORMAT_VERSION = 1
ARCHITECTURE = "LanguageModel"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TRANSFORMERS_MODEL_TYPES = ("mamba", "mamba2", "falcon_mamba", "jamba", "bamba", "nemotron_h", "falcon_h1", "zamba2")


def read_json(path: Path) -> dict:
    """A checkpoint's config.json, size-checked before reading (:mod:`ssmkit.io.files`); errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{shown(path)} does not exist")
    return files.read_json_object(path, "config")


def checkpoint_kind(path: Path) -> str:
    """``"ssmkit"`` or ``"transformers"`` (a format :mod:`ssmkit.models.formats.transformers` reads: transformers, or mamba_ssm's
    own with safetensors weights) from the folder's config.json; anything else raises."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (expected a folder with {CONFIG_NAME})")
    data = read_json(path / CONFIG_NAME)
    if data.get("format") == FORMAT:
        return "ssmkit"
    if is_mamba_ssm_config(data) and any((path / name).is_file() for name in SAFETENSORS_WEIGHTS):
        return "transformers"
    model_type = data.get("model_type")
    if model_type in TRANSFORMERS_MODEL_TYPES:
        return "transformers"
    if model_type is not None:
        raise ValueError(
            f"{path / CONFIG_NAME}: model_type {model_type!r} is not supported; ssmkit reads ssmkit checkpoints "
            f"and transformers checkpoints of model_type {', '.join(TRANSFORMERS_MODEL_TYPES)}"
        )
    hint = mamba_ssm_hint(data, path.name)
    if hint:
        raise ValueError(f"{shown(path / CONFIG_NAME)}: {hint}")
    raise ValueError(
        f"{path / CONFIG_NAME}: neither an ssmkit checkpoint (no \"format\": \"ssmkit\") nor a transformers one "
        "(no \"model_type\")"
    )


def model_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a :class:`ssmkit.models.LanguageModel` of ``config`` holds, in its
    state_dict order (the checkpoint's names; built on the meta device, so nothing is allocated)."""
    d, vocab = config.d_model, config.padded_vocab_size
    meta = {"device": torch.device("meta")}
    shared = build_shared(config, meta)
    blocks = build_blocks(config, meta, shared=shared)
    shapes = {"embedding.weight": (vocab, d)}
    shapes.update((f"shared.{name}", tuple(t.shape)) for name, t in shared.state_dict().items())
    shapes.update((f"layers.{name}", tuple(t.shape)) for name, t in blocks.state_dict().items())
    shapes["norm_f.weight"] = (d,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (vocab, d)
    return shapes


def save_checkpoint(model: nn.Module, path: Path) -> None:
    """Write ``model`` as an ssmkit checkpoint folder at ``path`` (created if needed)."""
    path.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(dict(model.state_dict()), path / WEIGHTS_NAME, metadata={"format": FORMAT})
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": ARCHITECTURE,
            "config": model.config.to_dict()}
    record = quantization_record(model)
    if record is not None:
        data["quantization"] = record
    write_text_atomic(path / CONFIG_NAME, json.dumps(data, indent=2) + "\n")


def apply_saved_quantization(model: nn.Module, path: Path) -> None:
    """Swap in the int8 layers the folder's config.json records under "quantization" (none: no change)."""
    data = read_json(path / CONFIG_NAME)
    if "quantization" in data:
        apply_quantization_record(model, data["quantization"], shown(path / CONFIG_NAME))


def read_config(path: Path) -> ModelConfig:
    """The :class:`ModelConfig` of an ssmkit checkpoint folder, from its config.json alone."""
    config_file = path / CONFIG_NAME
    data = read_json(config_file)
    if data.get("format") != FORMAT:
        raise ValueError(f"{shown(config_file)}: not an ssmkit checkpoint config (\"format\" is "
                         f"{data.get('format')!r})")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{shown(config_file)}: format_version {version!r} is not readable by this ssmkit "
                         f"(reads versions up to {FORMAT_VERSION})")
    if data.get("architecture") != ARCHITECTURE:
        raise ValueError(f"{shown(config_file)}: holds a {data.get('architecture')!r} checkpoint, not a {ARCHITECTURE}")
    try:
        return ModelConfig.from_dict(data.get("config"))
    except ValueError as e:
        raise ValueError(f"{shown(config_file)}: {e}") from None


def load_checkpoint(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Path]:
    """Read an ssmkit checkpoint folder: ``(config, state_dict, weights file)``."""
    from ssmkit.models.size import weights_limit

    config = read_config(path)
    weights_file = path / WEIGHTS_NAME
    if weights_file.is_file() and weights_file.stat().st_size > weights_limit(config):
        raise ValueError(f"{shown(weights_file)}: {weights_file.stat().st_size:,} bytes, more than the config's "
                         f"parameters can fill ({weights_limit(config):,} bytes at float64); the weights do not "
                         "belong to this config")
    tensors, _ = load_safetensors(weights_file)
    return config, tensors, weights_file


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    """Copy ``state_dict`` into ``model``; missing, unexpected or misshapen tensors raise, naming ``source``."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    misshapen = [
        f"{k}: {tuple(state_dict[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
        for k in sorted(expected.keys() & state_dict.keys()) if state_dict[k].shape != expected[k].shape
    ]
    problems = []
    for what, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                        ("shape mismatches", misshapen)):
        if items:
            problems.append(f"{what} ({len(items)}): " + "; ".join(items[:8]) + ("; ..." if len(items) > 8 else ""))
    if problems:
        raise ValueError(f"{source}: tensors do not match the model built from its config: " + " | ".join(problems))
    model.load_state_dict(state_dict, strict=True)
