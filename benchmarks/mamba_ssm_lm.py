"""A language model built from mamba_ssm's own modules, for side-by-side training benchmarks.

mamba_ssm 2.3.2's ``MambaLMHeadModel`` takes only Mamba-1 and Mamba-2 layers, and its module imports the
compiled selective scan (through ``mamba_simple``), which is not built here. :class:`MambaSsmLM` is the same
model written out from the pieces ``mamba_ssm/models/mixer_seq_simple.py`` puts together, imported from
mamba_ssm's source (:mod:`mamba_ssm_source`): an embedding, ``mamba_ssm.modules.block.Block`` around each
mixer (``mamba_ssm.modules.mamba2.Mamba2`` or ``mamba_ssm.modules.mamba3.Mamba3``) with its Triton RMSNorm
and fused add + norm, the residual stream in float32, the final fused add + norm, the head tied to the
embedding, and a float32 cross-entropy.

Its parameter names are ssmkit's :class:`~ssmkit.models.LanguageModel`'s (``embedding.weight``,
``layers.{i}.norm.weight``, ``layers.{i}.mixer.*``, ``norm_f.weight``, which are mamba_ssm's without the
``backbone.`` prefix), so ``peer.load_state_dict(ours.state_dict())`` gives both the same weights.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import sys
import types
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from mamba_ssm_source import DECAY_ACTIVATION, import_from_source, import_mamba3
from torch import nn

from ssmkit.models import ModelConfig

# ssmkit's mixer kinds that have a mamba_ssm counterpart here (their settings sections have the same names).
MIXERS = ("mamba2", "mamba3")


def stub_hub_mixin() -> bool:
    """Put an empty ``huggingface_hub.PyTorchModelHubMixin`` in place where huggingface_hub is not installed.

    mamba_ssm's ``Mamba2`` derives from it for saving to and loading from the Hub only (nothing of it runs in
    a forward or backward), and its module imports it unconditionally. True when the stand-in was installed.
    """
    if "huggingface_hub" in sys.modules or importlib.util.find_spec("huggingface_hub") is not None:
        return False
    hub = types.ModuleType("huggingface_hub")
    hub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
    sys.modules["huggingface_hub"] = hub
    return True


def causal_conv1d_available() -> bool:
    """Whether causal_conv1d's CUDA extension imports: mamba_ssm's fused Mamba-2 path
    (``use_mem_eff_path=True``, ``mamba_split_conv1d_scan_combined``) calls it and fails without it."""
    try:
        from causal_conv1d.cpp_functions import causal_conv1d_fwd_function  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or its extension does not load: either way unusable
        return False
    return True


def mixer_class(config: ModelConfig) -> tuple[type, dict[str, Any]] | str:
    """mamba_ssm's mixer class for ``config``'s layers and the settings to build it with, or why there is none.

    The settings are the fields of ssmkit's section that mamba_ssm's constructor takes (ssmkit's sections use
    mamba_ssm's argument names); a Mamba-3 model gets mamba_ssm's Mamba3 computing ssmkit's decay activation
    (``mamba_ssm_source.import_mamba3``). Mamba-2 takes the fused path only where causal_conv1d can run it.
    """
    mixers = {spec.mixer for spec in config.layer_specs()}
    if len(mixers) != 1 or not mixers <= set(MIXERS) or {spec.ff for spec in config.layer_specs()} != {None}:
        return f"layer pattern {config.layer_pattern!r}: only pure Mamba-2 or pure Mamba-3 stacks are built"
    section = mixers.pop()
    settings = getattr(config, section)
    if section == "mamba2" and stub_hub_mixin():
        print("mamba_ssm Mamba2: huggingface_hub is not installed; an empty PyTorchModelHubMixin stands in "
              "(it only saves to / loads from the Hub)")
    reason = io.StringIO()  # what the importers print when the module does not import
    with contextlib.redirect_stdout(reason):
        if section == "mamba3":
            upstream = {f: name for name, f in DECAY_ACTIVATION.items()}[settings.decay_activation]
            cls = import_mamba3(upstream)
        else:
            cls = import_from_source("mamba_ssm.modules.mamba2", "Mamba2")
    if cls is None:
        return reason.getvalue().strip() or f"mamba_ssm's {section} module does not import"
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in vars(settings).items() if k in accepted}
    if section == "mamba2":
        kwargs["use_mem_eff_path"] = causal_conv1d_available()
    return cls, kwargs


class MambaSsmLM(nn.Module):
    """mamba_ssm's ``MambaLMHeadModel`` (tied head, RMSNorm, fused add + norm, float32 residual) around
    ``mixer_cls`` layers; :meth:`forward` returns the mean next-token cross-entropy, as ssmkit's model does
    with ``targets``.

    Args:
        config: ssmkit's config: vocabulary, width, depth and norm eps are taken from it.
        mixer_cls: mamba_ssm's mixer class; mixer_kwargs its settings (:func:`mixer_class`).
    """

    def __init__(self, config: ModelConfig, mixer_cls: type, mixer_kwargs: dict[str, Any], *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        Block = import_from_source("mamba_ssm.modules.block", "Block")
        RMSNorm = import_from_source("mamba_ssm.ops.triton.layer_norm", "RMSNorm")
        self.layer_norm_fn = import_from_source("mamba_ssm.ops.triton.layer_norm", "layer_norm_fn")
        if Block is None or RMSNorm is None or self.layer_norm_fn is None:
            raise ImportError("mamba_ssm's Block or Triton RMSNorm does not import (reason above)")
        factory = {"device": device, "dtype": dtype}
        d = config.d_model
        self.embedding = nn.Embedding(config.padded_vocab_size, d, **factory)
        norm_cls = partial(RMSNorm, eps=config.norm_eps, **factory)
        self.layers = nn.ModuleList(
            Block(d, partial(mixer_cls, layer_idx=i, **mixer_kwargs, **factory), nn.Identity, norm_cls=norm_cls,
                  fused_add_norm=True, residual_in_fp32=True)
            for i in range(config.n_layer)
        )
        self.norm_f = RMSNorm(d, eps=config.norm_eps, **factory)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(b, l) token ids and (b, l) next tokens -> () mean cross-entropy (float32)."""
        hidden, residual = self.embedding(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        hidden = self.layer_norm_fn(hidden, self.norm_f.weight, self.norm_f.bias, eps=self.norm_f.eps,
                                    residual=residual, prenorm=False, residual_in_fp32=True, is_rms_norm=True)
        logits = F.linear(hidden, self.embedding.weight)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def build_peer(config: ModelConfig, *, device: torch.device | str | None = None) -> tuple[MambaSsmLM, str] | str:
    """(mamba_ssm's model of ``config``, a note on how its mixer runs), or why it cannot be built."""
    found = mixer_class(config)
    if isinstance(found, str):
        return found
    cls, kwargs = found
    try:
        model = MambaSsmLM(config, cls, kwargs, device=device)
    except Exception as e:  # noqa: BLE001 - a peer that cannot be built is reported, never fatal
        return f"mamba_ssm's model does not build ({type(e).__name__}: {e})"
    if "use_mem_eff_path" in kwargs:
        note = ("fused use_mem_eff_path=True" if kwargs["use_mem_eff_path"]
                else "use_mem_eff_path=False (no causal_conv1d extension: nn.Conv1d + SSD kernels + gated norm)")
    else:
        upstream = "2.3.2's" if config.mamba3.decay_activation == "softplus" else "main's (#962, patched into 2.3.2's)"
        note = f"Mamba3 SISO Triton kernels, decay {config.mamba3.decay_activation} as mamba_ssm {upstream}"
    return model, note
