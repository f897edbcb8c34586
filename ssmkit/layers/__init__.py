"""Neural network layers built on :mod:`ssmkit.ops`: sequence mixers, feed-forwards, norms and the residual
block.

Each mixer kind has its own recurrent state class (``MambaState``, ``Mamba2State``, ``AttentionState``, ...),
registered by kind in ``STATE_TYPES`` (importing this package registers them all) so that saved caches can be
read back.
"""

from ssmkit.layers.attention import Attention, AttentionState
from ssmkit.layers.block import Block
from ssmkit.layers.hyena import Hyena, HyenaState
from ssmkit.layers.mamba import Mamba, MambaState
from ssmkit.layers.mamba2 import Mamba2, Mamba2State
from ssmkit.layers.mamba3 import Mamba3, Mamba3State
from ssmkit.layers.mlp import MLP
from ssmkit.layers.moe import MoE, RouterStats, load_balancing_loss, router_z_loss
from ssmkit.layers.norm import RMSNorm, RMSNormGated, no_weight_decay
from ssmkit.layers.parallel_hybrid import ParallelHybrid, ParallelHybridState
from ssmkit.layers.s4 import S4, S4State
from ssmkit.layers.s4d import S4D, S4DState
from ssmkit.layers.state import STATE_TYPES, LayerState

__all__ = [
    "MLP",
    "S4",
    "S4D",
    "STATE_TYPES",
    "Attention",
    "AttentionState",
    "Block",
    "Hyena",
    "HyenaState",
    "LayerState",
    "Mamba",
    "Mamba2",
    "Mamba2State",
    "Mamba3",
    "Mamba3State",
    "MambaState",
    "MoE",
    "ParallelHybrid",
    "ParallelHybridState",
    "RMSNorm",
    "RMSNormGated",
    "RouterStats",
    "S4DState",
    "S4State",
    "load_balancing_loss",
    "no_weight_decay",
    "router_z_loss",
]
