"""Building a model's residual blocks from a :class:`ModelConfig`: shared by every model head.

Dimensions: ``H`` d_model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from ssmkit.layers import MLP, Attention, Block, Mamba, Mamba2, MoE
from ssmkit.layers.hyena import Hyena
from ssmkit.layers.mamba3 import Mamba3
from ssmkit.layers.s4 import S4
from ssmkit.layers.s4d import S4D
from ssmkit.models.config import LayerSpec, ModelConfig


def build_mixer(config: ModelConfig, index: int, spec: LayerSpec, factory: dict[str, Any], *,
                causal: bool = True) -> nn.Module:
    """The sequence mixer of layer ``index``; ``causal=False`` allows bidirectional S4/S4D layers."""
    if spec.mixer == "mamba":
        return Mamba(config.d_model, **dataclasses.asdict(config.mamba), layer_idx=index, **factory)
    if spec.mixer == "mamba2":
        return Mamba2(config.d_model, **dataclasses.asdict(config.mamba2), norm_eps=config.norm_eps,
                      layer_idx=index, **factory)
    if spec.mixer == "mamba3":
        # mamba_ssm's Mamba-3 keeps its norms at eps 1e-5 whatever the model's norm_eps.
        return Mamba3(config.d_model, **dataclasses.asdict(config.mamba3), layer_idx=index, **factory)
    if spec.mixer in ("s4d", "s4"):
        sub = getattr(config, spec.mixer)
        if sub.bidirectional and causal:
            raise ValueError(f"layer {index}: {spec.mixer}.bidirectional reads future tokens, which a causal "
                             "language model cannot; use ssmkit.models.SequenceClassifier for non-causal tasks")
        layer = S4D if spec.mixer == "s4d" else S4
        return layer(config.d_model, **dataclasses.asdict(sub), layer_idx=index, **factory)
    if spec.mixer == "hyena":
        return Hyena(config.d_model, **dataclasses.asdict(config.hyena), layer_idx=index, **factory)
    if spec.mixer in ("attention", "sliding_window_attention"):
        att = dataclasses.asdict(config.attention)
        att["window"] = att["window"] if spec.mixer == "sliding_window_attention" else None
        return Attention(config.d_model, **att, layer_idx=index, **factory)
    raise ValueError(f"layer {index}: mixer {spec.mixer!r} is not implemented")


def build_ff(config: ModelConfig, spec: LayerSpec, factory: dict[str, Any]) -> nn.Module | None:
    """The feed-forward of a layer (MLP, MoE) or None."""
    if spec.ff == "mlp":
        return MLP(config.d_model, config.mlp.d_intermediate, **factory)
    if spec.ff == "moe":
        m = config.moe
        return MoE(config.d_model, m.d_intermediate, m.num_experts, m.top_k, renormalize=m.renormalize, **factory)
    return None


def build_blocks(config: ModelConfig, factory: dict[str, Any], *, causal: bool = True) -> nn.ModuleList:
    """One residual :class:`Block` per entry of ``config.layer_specs()``."""
    return nn.ModuleList(
        Block(config.d_model, build_mixer(config, i, spec, factory, causal=causal), ff=build_ff(config, spec, factory),
              norm_eps=config.norm_eps, residual_in_fp32=config.residual_in_fp32, **factory)
        for i, spec in enumerate(config.layer_specs())
    )


@torch.no_grad()
def init_weights(model: nn.Module, blocks: nn.ModuleList, config: ModelConfig) -> None:
    """mamba_ssm's ``_init_weights``: zero Linear biases (except dt_proj's), N(0, initializer_range)
    embeddings, and residual output projections rescaled by 1/sqrt(number of residual branches)."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            if not getattr(module.bias, "_no_reinit", False):
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=config.initializer_range)
    if config.rescale_prenorm_residual:
        n_residuals = sum(1 + (block.ff is not None) for block in blocks)
        for block in blocks:
            for name, p in block.named_parameters():
                if name.endswith(("out_proj.weight", "fc2.weight", "o_proj.weight", "down_proj.weight")):
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                    p /= math.sqrt(n_residuals)
