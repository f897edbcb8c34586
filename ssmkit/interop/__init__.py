"""Checkpoints of other libraries <-> ssmkit: transformers' formats and mamba_ssm's own, kept under this name
for code that imports it. They live in :mod:`ssmkit.models.formats` (with ssmkit's own format), which
``LanguageModel.from_pretrained`` / ``save_pretrained(format="transformers")`` use."""

from ssmkit.models.formats.bamba import load_bamba_checkpoint, save_bamba_checkpoint
from ssmkit.models.formats.files import CheckpointError
from ssmkit.models.formats.jamba import load_jamba_checkpoint, save_jamba_checkpoint
from ssmkit.models.formats.nemotron_h import (
    load_nemotron_h_checkpoint,
    save_nemotron_h_checkpoint,
)
from ssmkit.models.formats.transformers import (
    TRANSFORMERS_MODEL_TYPES,
    load_transformers_checkpoint,
    read_transformers_config,
    save_transformers_checkpoint,
)

__all__ = [
    "TRANSFORMERS_MODEL_TYPES",
    "CheckpointError",
    "load_bamba_checkpoint",
    "load_jamba_checkpoint",
    "load_nemotron_h_checkpoint",
    "load_transformers_checkpoint",
    "read_transformers_config",
    "save_bamba_checkpoint",
    "save_jamba_checkpoint",
    "save_nemotron_h_checkpoint",
    "save_transformers_checkpoint",
]
