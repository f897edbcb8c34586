"""``mamba_ssm.ops.triton.ssd_combined``: Mamba-2's SSD scan and fused layer function."""

import functools

from ssmkit.ops.fused import mamba_split_conv1d_scan_combined
from ssmkit.ops.ssd import mamba_chunk_scan_combined

mamba_split_conv1d_scan_ref = functools.partial(mamba_split_conv1d_scan_combined, backend="reference")

__all__ = ["mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined", "mamba_split_conv1d_scan_ref"]
