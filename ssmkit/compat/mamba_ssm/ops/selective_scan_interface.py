"""``mamba_ssm.ops.selective_scan_interface``: the Mamba-1 scan and fused layer function.

The ``*_ref`` names are ssmkit's sequential float64-exact definitions (``backend="reference"``).
"""

import functools

from ssmkit.ops.fused import mamba_inner_fn
from ssmkit.ops.selective_scan import selective_scan_fn

selective_scan_ref = functools.partial(selective_scan_fn, backend="reference")
mamba_inner_ref = functools.partial(mamba_inner_fn, backend="reference")

__all__ = ["mamba_inner_fn", "mamba_inner_ref", "selective_scan_fn", "selective_scan_ref"]
