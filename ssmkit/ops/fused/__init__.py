"""Fused layer functions of mamba_ssm, composed from ssmkit's ops: ``mamba_inner_fn`` (Mamba-1) and
``mamba_split_conv1d_scan_combined`` (Mamba-2).

They are compositions, not single kernels: each step runs on the backend the ``backend`` argument picks
("reference" gives the float64-exact sequential definition of every step, so the composition's
reference is the same function with ``backend="reference"``). The convolution's pre-activation is
recomputed in the backward pass (activation checkpointing of the cheap convolution) instead of being
kept, as mamba_ssm's fused functions do.
"""

from ssmkit.ops.fused.mamba_inner import mamba_inner_fn
from ssmkit.ops.fused.split_conv1d_scan import mamba_split_conv1d_scan_combined

__all__ = ["mamba_inner_fn", "mamba_split_conv1d_scan_combined"]
