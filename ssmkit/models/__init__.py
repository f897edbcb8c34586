"""Models: :class:`ModelConfig` (typed dataclasses <-> JSON), :class:`LanguageModel`, named presets,
and ssmkit checkpoint folders (``save_pretrained`` / ``from_pretrained``)."""

from ssmkit.models.config import LayerSpec, Mamba2Config, MambaConfig, ModelConfig, parse_layer_pattern
from ssmkit.models.language_model import (
    LanguageModel,
    LanguageModelOutput,
    no_weight_decay_param_names,
    param_groups,
)
from ssmkit.models.presets import get_preset, list_presets

__all__ = [
    "LanguageModel",
    "LanguageModelOutput",
    "LayerSpec",
    "Mamba2Config",
    "MambaConfig",
    "ModelConfig",
    "get_preset",
    "list_presets",
    "no_weight_decay_param_names",
    "param_groups",
    "parse_layer_pattern",
]
