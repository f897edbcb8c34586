"""Settings of each mixer and feed-forward kind: the nested dataclasses of :class:`ModelConfig`, their
defaults in one place (this package: ``selective.py``, ``convolutional.py``, ``attention.py``).

Argument names and defaults are mamba_ssm's (safari's for Hyena, Jamba's for MoE). Each has
``validate(d_model)``, which raises ``ValueError`` naming the bad field; field docstrings are the help
texts of ``ssmkit train --model.<kind>.<field>``.
"""

from ssmkit.layers.configs._checks import MAX_HIPPO_STATE, layer_settings
from ssmkit.layers.configs.attention import AttentionConfig, MLPConfig, MoEConfig
from ssmkit.layers.configs.convolutional import HyenaConfig, S4Config, S4DConfig
from ssmkit.layers.configs.selective import (
    DECAY_ACTIVATIONS,
    DecayActivation,
    Mamba2Config,
    Mamba3Config,
    MambaConfig,
)

__all__ = [
    "DECAY_ACTIVATIONS",
    "MAX_HIPPO_STATE",
    "DecayActivation",
    "AttentionConfig",
    "HyenaConfig",
    "MLPConfig",
    "Mamba2Config",
    "Mamba3Config",
    "MambaConfig",
    "MoEConfig",
    "S4Config",
    "S4DConfig",
    "layer_settings",
]
