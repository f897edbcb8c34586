"""Drop-in ``mamba_ssm`` and ``causal_conv1d`` on ssmkit's kernels, for code written against those packages.

The modules below ``ssmkit.compat`` are laid out as those packages' import paths and expose their op
functions with their signatures (ssmkit's implementations: every device, every dtype)::

    from ssmkit.compat.mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    from ssmkit.compat.causal_conv1d import causal_conv1d_fn

so existing code runs by changing its imports, or unchanged after the opt-in one-liner::

    import ssmkit.compat; ssmkit.compat.install()
    import mamba_ssm, causal_conv1d          # now ssmkit.compat.mamba_ssm / .causal_conv1d

``install()`` also routes transformers (>= 5.25, whose SSM models look these packages up when their
modeling module is imported and otherwise fall back to slow PyTorch loops) to them on every device, CPU
included; call it before the models are imported (``from transformers import MambaForCausalLM``). It is
never done by ``import ssmkit``. Only the ops are provided: mamba_ssm's modules (``Mamba``,
``MambaLMHeadModel``, ...) are ssmkit's layers and models under their own names.
"""

from ssmkit.compat._install import install, is_installed, uninstall

__all__ = ["install", "is_installed", "uninstall"]
