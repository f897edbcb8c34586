"""``causal_conv1d`` on ssmkit's kernels: ``causal_conv1d_fn``, ``causal_conv1d_update`` (with
``cache_seqlens`` and ``conv_state_indices``) and ``causal_conv1d_varlen_states``, any device and width."""

from ssmkit.compat.causal_conv1d.causal_conv1d_interface import (
    causal_conv1d_fn,
    causal_conv1d_update,
)
from ssmkit.compat.causal_conv1d.causal_conv1d_varlen import causal_conv1d_varlen_states

# causal_conv1d's version whose signatures these follow, marked as ssmkit's (a PEP 440 local version).
__version__ = "1.5.0+ssmkit"

__all__ = ["causal_conv1d_fn", "causal_conv1d_update", "causal_conv1d_varlen_states"]
