"""How transformers finds mamba_ssm / causal_conv1d, and how ``install()`` routes it to ssmkit.

transformers >= 5.25 wraps each of its torch fallbacks (``selective_scan_fn``, ``mamba_inner_fn``,
``selective_state_update``, ``mamba_chunk_scan_combined``, ``mamba_split_conv1d_scan_combined``,
``causal_conv1d_fn``, ``causal_conv1d_update``) in ``use_kernel_func_from_hub_with_fallback``: when the
modeling module is imported it imports the package (``mamba_ssm.ops...``, ``causal_conv1d``) and, if
that works, calls it, but only for inputs on the devices listed in
``transformers.integrations.hub_kernels._PACKAGE_SUPPORTED_DEVICES`` (CUDA for both). With the
aliases of ``install()`` the imports find ssmkit.compat; :func:`route` removes those two device
entries (ssmkit's ops run on every device), so CPU inputs take the kernels too.

Older transformers (4.4x to 5.2x) gate their fast path differently: ``is_mamba_ssm_available()`` /
``lazy_load_kernel("mamba-ssm")`` need CUDA, and the mixers' ``forward`` takes ``cuda_kernels_forward``
only for CUDA weights. There ``install()`` gives ssmkit's ops on CUDA (the imports resolve to them), not
on CPU.
"""

from __future__ import annotations

import importlib
import sys
import warnings

_PACKAGES = ("mamba_ssm", "causal_conv1d")
_saved: dict[str, object] = {}
_routed = [False]


def route() -> None:
    """Let transformers' fallback wrappers call the compat packages for inputs on any device."""
    if _routed[0]:
        return
    try:
        hub = importlib.import_module("transformers.integrations.hub_kernels")
    except ImportError:
        return
    devices = getattr(hub, "_PACKAGE_SUPPORTED_DEVICES", None)
    if isinstance(devices, dict):
        for name in _PACKAGES:
            if name in devices:
                _saved[name] = devices.pop(name)
    _routed[0] = True
    stale = _modules_imported_too_early()
    if stale:
        warnings.warn(
            "ssmkit.compat.install(): these transformers modules were imported before it and keep their "
            f"PyTorch fallbacks: {', '.join(stale)}. Call install() before importing the models.",
            stacklevel=3,
        )


def unroute() -> None:
    """Restore the device lists :func:`route` removed."""
    hub = sys.modules.get("transformers.integrations.hub_kernels")
    devices = getattr(hub, "_PACKAGE_SUPPORTED_DEVICES", None)
    if isinstance(devices, dict):
        devices.update(_saved)
    _saved.clear()
    _routed[0] = False


def _modules_imported_too_early() -> list[str]:
    """Imported transformers modeling modules that bound one of the two packages (or its fallback)."""
    stale = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("transformers.models.") or ".modeling_" not in name:
            continue
        path = getattr(module, "__file__", None)
        try:
            with open(path, encoding="utf-8") as source:
                text = source.read()
        except (OSError, TypeError):
            continue
        if any(f'"{package}")' in text for package in _PACKAGES):
            stale.append(name)
    return sorted(stale)
