"""Checkpoints of other libraries <-> ssmkit: transformers' formats and mamba_ssm's own, kept under this name
for code that imports it. They live in :mod:`ssmkit.models.formats` (with ssmkit's own format), which
``LanguageModel.from_pretrained`` / ``save_pretrained(format="transformers")`` use; this module re-exports
exactly what :mod:`ssmkit.models.formats.transformers` exports."""

from ssmkit.models.formats import transformers as _transformers
from ssmkit.models.formats.transformers import *  # noqa: F403 - the public face of the formats, one list

__all__ = list(_transformers.__all__)
