"""Checkpoints of other libraries <-> ssmkit.

Hugging Face transformers folders of model_type ``mamba``, ``falcon_mamba`` and ``mamba2``
(:func:`load_transformers_checkpoint`, :func:`save_transformers_checkpoint`);
``LanguageModel.from_pretrained`` / ``save_pretrained(format="transformers")`` call these.
"""

from ssmkit.interop.files import CheckpointError
from ssmkit.interop.transformers_config import MODEL_TYPES as TRANSFORMERS_MODEL_TYPES
from ssmkit.interop.transformers_mamba import load_transformers_checkpoint, save_transformers_checkpoint

__all__ = [
    "CheckpointError",
    "TRANSFORMERS_MODEL_TYPES",
    "load_transformers_checkpoint",
    "save_transformers_checkpoint",
]
