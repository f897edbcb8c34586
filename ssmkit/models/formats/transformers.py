"""Checkpoints of other libraries <-> ssmkit.

Hugging Face transformers folders of model_type ``mamba``, ``falcon_mamba``, ``mamba2``, ``jamba``, ``bamba``,
``nemotron_h``, ``falcon_h1`` and ``zamba2`` (:func:`load_transformers_checkpoint`,
:func:`save_transformers_checkpoint`, which dispatch to :mod:`ssmkit.models.formats.transformers_mamba`,
:mod:`ssmkit.models.formats.jamba`, :mod:`ssmkit.models.formats.bamba`, :mod:`ssmkit.models.formats.nemotron_h`,
:mod:`ssmkit.models.formats.falcon_h1` and :mod:`ssmkit.models.formats.zamba2`), and mamba_ssm's own
format when its weights are safetensors (:mod:`ssmkit.models.formats.mamba_ssm`, read only);
``LanguageModel.from_pretrained`` / ``save_pretrained(format="transformers")`` call these.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ssmkit.io.hub import is_mamba_ssm_config
from ssmkit.models.formats import transformers_mamba
from ssmkit.models.formats.bamba import (
    bamba_config_from_transformers,
    load_bamba_checkpoint,
    save_bamba_checkpoint,
)
from ssmkit.models.formats.falcon_h1 import (
    falcon_h1_config_from_transformers,
    load_falcon_h1_checkpoint,
    save_falcon_h1_checkpoint,
)
from ssmkit.models.formats.files import CONFIG_NAME, CheckpointError, read_json
from ssmkit.models.formats.hybrid_common import falcon_h1_settings
from ssmkit.models.formats.jamba import (
    jamba_config_from_transformers,
    load_jamba_checkpoint,
    save_jamba_checkpoint,
)
from ssmkit.models.formats.mamba_ssm import (
    config_from_mamba_ssm,
    load_mamba_ssm_checkpoint,
)
from ssmkit.models.formats.nemotron_h import (
    load_nemotron_h_checkpoint,
    nemotron_h_config_from_transformers,
    save_nemotron_h_checkpoint,
)
from ssmkit.models.formats.transformers_config import MODEL_TYPES as _MAMBA_MODEL_TYPES
from ssmkit.models.formats.transformers_config import config_from_transformers
from ssmkit.models.formats.zamba2 import (
    load_zamba2_checkpoint,
    save_zamba2_checkpoint,
    zamba2_config_from_transformers,
)

if TYPE_CHECKING:
    from torch import nn

    from ssmkit.models.config import ModelConfig

TRANSFORMERS_MODEL_TYPES = (*_MAMBA_MODEL_TYPES, "jamba", "bamba", "nemotron_h", "falcon_h1", "zamba2")


def load_transformers_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a transformers folder of model_type mamba, falcon_mamba, mamba2, jamba, bamba or nemotron_h:
    ``(ModelConfig, state_dict with LanguageModel names)`` (see the per-format modules for the errors)."""
    folder = Path(path)
    raw = read_json(folder / CONFIG_NAME) if folder.is_dir() and (folder / CONFIG_NAME).is_file() else {}
    if raw.get("model_type") == "jamba":
        return load_jamba_checkpoint(folder)
    if raw.get("model_type") == "bamba":
        return load_bamba_checkpoint(folder)
    if raw.get("model_type") == "nemotron_h":
        return load_nemotron_h_checkpoint(folder)
    if raw.get("model_type") == "zamba2":
        return load_zamba2_checkpoint(folder)
    if raw.get("model_type") == "falcon_h1":
        return load_falcon_h1_checkpoint(folder)
    if is_mamba_ssm_config(raw):
        return load_mamba_ssm_checkpoint(folder)
    return transformers_mamba.load_transformers_checkpoint(folder)


def read_transformers_config(path: str | os.PathLike) -> ModelConfig:
    """The :class:`ModelConfig` of a transformers folder, from its config.json alone (no weights read)."""
    config_path = Path(path) / CONFIG_NAME
    raw = read_json(config_path)
    if raw.get("model_type") == "jamba":
        return jamba_config_from_transformers(raw, config_path)
    if raw.get("model_type") == "bamba":
        return bamba_config_from_transformers(raw, config_path)
    if raw.get("model_type") == "nemotron_h":
        return nemotron_h_config_from_transformers(raw, config_path)
    if raw.get("model_type") == "zamba2":
        return zamba2_config_from_transformers(raw, config_path)
    if raw.get("model_type") == "falcon_h1":
        return falcon_h1_config_from_transformers(raw, config_path)
    if is_mamba_ssm_config(raw):
        return config_from_mamba_ssm(raw, config_path)
    return config_from_transformers(raw, config_path)


def save_transformers_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` as a transformers folder: Zamba2 for models with shared-transformer (``Z``) layers,
    Falcon-H1 for models of parallel hybrid layers, Nemotron-H for hybrids of Mamba-2 and attention layers whose
    feed-forwards (if any) are ungated MLPs, Bamba for other hybrids of Mamba-2 layers, Jamba for other hybrids
    (attention or feed-forward layers, or Mamba with inner layer norms), mamba / falcon_mamba / mamba2 for pure
    SSM stacks. Settings only Falcon-H1 expresses (µP multipliers...) are refused in the others, naming them."""
    config = model.config
    specs = config.layer_specs()
    if any(s.mixer == "parallel_hybrid" for s in specs):
        return save_falcon_h1_checkpoint(model, path)
    extra = falcon_h1_settings(config)
    if extra:
        raise ValueError(f"{', '.join(extra)}: only transformers' Falcon-H1 (layer pattern 'Fm') expresses these "
                         "settings; the other transformers formats would drop them")
    if any(s.mixer == "shared_transformer_mamba2" for s in specs):
        return save_zamba2_checkpoint(model, path)
    hybrid = any(s.mixer == "attention" or s.ff is not None for s in specs)
    if hybrid and all(s.mixer in ("mamba2", "attention") and s.ff in (None, "ungated_mlp") for s in specs):
        return save_nemotron_h_checkpoint(model, path)
    if hybrid and any(s.mixer == "mamba2" for s in specs):
        return save_bamba_checkpoint(model, path)
    if hybrid or config.mamba.inner_layernorms:
        return save_jamba_checkpoint(model, path)
    return transformers_mamba.save_transformers_checkpoint(model, path)


__all__ = [
    "TRANSFORMERS_MODEL_TYPES",
    "CheckpointError",
    "load_bamba_checkpoint",
    "load_falcon_h1_checkpoint",
    "load_jamba_checkpoint",
    "load_nemotron_h_checkpoint",
    "load_transformers_checkpoint",
    "load_zamba2_checkpoint",
    "read_transformers_config",
    "save_bamba_checkpoint",
    "save_falcon_h1_checkpoint",
    "save_jamba_checkpoint",
    "save_nemotron_h_checkpoint",
    "save_transformers_checkpoint",
    "save_zamba2_checkpoint",
]
