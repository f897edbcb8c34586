"""Pure tensor functions: the SSM ops, each with a sequential reference and fast backends.

Signatures follow ``mamba_ssm`` / ``causal_conv1d`` so that users can switch by changing an import;
ssmkit adds keyword-only arguments (``initial_state``, ``seq_idx``, ``backend``).
"""

from ssmkit.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from ssmkit.ops.norm import gated_rms_norm_fn, rms_norm_fn
from ssmkit.ops.selective_scan import selective_scan_fn
from ssmkit.ops.ssd import mamba_chunk_scan_combined
from ssmkit.ops.state_update import selective_state_update

__all__ = [
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "gated_rms_norm_fn",
    "mamba_chunk_scan_combined",
    "rms_norm_fn",
    "selective_scan_fn",
    "selective_state_update",
]
