"""Models: :class:`ModelConfig` (typed dataclasses <-> JSON), :class:`LanguageModel`, named presets,
and ssmkit checkpoint folders (``save_pretrained`` / ``from_pretrained``)."""

from ssmkit.layers.parallel_hybrid import ParallelHybridConfig
from ssmkit.models.cache import ModelCache
from ssmkit.models.config import (
    AttentionConfig,
    HyenaConfig,
    LayerSpec,
    Mamba2Config,
    Mamba3Config,
    MambaConfig,
    MLPConfig,
    ModelConfig,
    MoEConfig,
    S4Config,
    S4DConfig,
    parse_layer_pattern,
)
from ssmkit.models.language_model import (
    LanguageModel,
    LanguageModelOutput,
    no_weight_decay_param_names,
    param_groups,
)
from ssmkit.models.presets import get_preset, list_presets

__all__ = [
    "AttentionConfig",
    "HyenaConfig",
    "LanguageModel",
    "LanguageModelOutput",
    "LayerSpec",
    "MLPConfig",
    "ModelCache",
    "Mamba2Config",
    "Mamba3Config",
    "MambaConfig",
    "ModelConfig",
    "MoEConfig",
    "ParallelHybridConfig",
    "S4Config",
    "S4DConfig",
    "get_preset",
    "list_presets",
    "no_weight_decay_param_names",
    "param_groups",
    "parse_layer_pattern",
]
