"""Pure tensor functions: the SSM ops, each with a sequential reference and fast backends.

Signatures follow ``mamba_ssm`` / ``causal_conv1d`` so that users can switch by changing an import;
ssmkit adds keyword-only arguments (``initial_state``, ``seq_idx``, ``backend``). Mamba-3's scan and step
are here too; the time-invariant (S4-family) ops live in :mod:`ssmkit.ops.lti`.
"""

from ssmkit.ops.causal_conv1d import (
    causal_conv1d_fn,
    causal_conv1d_update,
    causal_conv1d_varlen_states,
)
from ssmkit.ops.decode_step import conv1d_selective_state_update, mamba_inner_step
from ssmkit.ops.fused import mamba_inner_fn, mamba_split_conv1d_scan_combined
from ssmkit.ops.mamba3 import mamba3_scan, mamba3_step
from ssmkit.ops.norm import gated_rms_norm_fn, layernorm_fn, rms_norm_fn, rmsnorm_fn
from ssmkit.ops.norm_linear import rms_norm_linear
from ssmkit.ops.selective_scan import selective_scan_fn
from ssmkit.ops.ssd import mamba_chunk_scan_combined
from ssmkit.ops.state_update import selective_state_update

__all__ = [
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "causal_conv1d_varlen_states",
    "conv1d_selective_state_update",
    "gated_rms_norm_fn",
    "layernorm_fn",
    "mamba3_scan",
    "mamba3_step",
    "mamba_chunk_scan_combined",
    "mamba_inner_step",
    "mamba_inner_fn",
    "mamba_split_conv1d_scan_combined",
    "rms_norm_fn",
    "rms_norm_linear",
    "rmsnorm_fn",
    "selective_scan_fn",
    "selective_state_update",
]
