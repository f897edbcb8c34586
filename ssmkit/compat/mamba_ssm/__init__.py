"""``mamba_ssm`` on ssmkit's kernels: the ops of mamba_ssm 2.3 under its import paths.

Provided: ``selective_scan_fn`` and ``mamba_inner_fn`` here and in ``ops.selective_scan_interface``,
``ops.triton.ssd_combined`` (``mamba_chunk_scan_combined``, ``mamba_split_conv1d_scan_combined``),
``ops.triton.selective_state_update`` and ``ops.triton.layernorm_gated`` (``rmsnorm_fn``,
``layernorm_fn``, ``RMSNorm``, ``LayerNorm``). mamba_ssm's modules and models (``Mamba``, ``Mamba2``,
``MambaLMHeadModel``, ...) are not: ssmkit's layers and models replace them under their own names.
"""

from ssmkit.compat.mamba_ssm.ops.selective_scan_interface import (
    mamba_inner_fn,
    selective_scan_fn,
)

# mamba_ssm's version whose op signatures these follow, marked as ssmkit's (a PEP 440 local version).
__version__ = "2.3.2+ssmkit"

__all__ = ["mamba_inner_fn", "selective_scan_fn"]

_MODULES = ("Mamba", "Mamba2", "Mamba3", "MambaLMHeadModel")


def __getattr__(name: str):
    if name in _MODULES:
        raise AttributeError(
            f"ssmkit.compat.mamba_ssm provides mamba_ssm's ops, not its module {name!r}: use ssmkit.layers "
            "(MambaLayer, Mamba2Layer, ...) or ssmkit.models.LanguageModel"
        )
    raise AttributeError(f"module 'mamba_ssm' (ssmkit.compat) has no attribute {name!r}")
