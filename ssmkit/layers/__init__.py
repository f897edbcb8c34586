"""Neural network layers built on :mod:`ssmkit.ops`: sequence mixers, norms and the residual block.

Each mixer kind has its own recurrent state class (``MambaState``, ``Mamba2State``), registered by
kind in ``STATE_TYPES`` so that saved caches can be read back.
"""

from ssmkit.layers.block import Block
from ssmkit.layers.mamba import Mamba, MambaState
from ssmkit.layers.mamba2 import Mamba2, Mamba2State
from ssmkit.layers.norm import RMSNorm, RMSNormGated, no_weight_decay
from ssmkit.layers.state import STATE_TYPES, LayerState

__all__ = [
    "STATE_TYPES",
    "Block",
    "LayerState",
    "Mamba",
    "Mamba2",
    "Mamba2State",
    "MambaState",
    "RMSNorm",
    "RMSNormGated",
    "no_weight_decay",
]
