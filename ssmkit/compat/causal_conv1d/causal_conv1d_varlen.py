"""``causal_conv1d.causal_conv1d_varlen``."""

from ssmkit.ops.causal_conv1d import causal_conv1d_varlen_states
from ssmkit.ops.causal_conv1d.reference import causal_conv1d_varlen_states_ref

__all__ = ["causal_conv1d_varlen_states", "causal_conv1d_varlen_states_ref"]
