"""``causal_conv1d.causal_conv1d_interface``. The ``*_ref`` names are ssmkit's sequential definitions."""

import functools

from ssmkit.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update

causal_conv1d_ref = functools.partial(causal_conv1d_fn, backend="reference")
causal_conv1d_update_ref = functools.partial(causal_conv1d_update, backend="reference")

__all__ = ["causal_conv1d_fn", "causal_conv1d_ref", "causal_conv1d_update", "causal_conv1d_update_ref"]
