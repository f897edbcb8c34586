"""Building a model's residual blocks from a :class:`ModelConfig`: shared by every model head.

Dimensions: ``H`` d_model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ssmkit.layers import Block
from ssmkit.layers.registry import BuildContext, by_name
from ssmkit.models.config import ModelConfig, pattern_tokens


def build_layer(config: ModelConfig, index: int, name: str, factory: dict[str, Any], *, causal: bool = True,
                context_parallel: Any = None, shared: nn.Module | None = None, invocation: int = 0) -> nn.Module:
    """Layer ``index``'s mixer or feed-forward of kind ``name``, as its registry entry builds it;
    ``causal=False`` allows bidirectional layers (classifiers). ``shared`` is the model's shared module of
    the kind (kinds with a ``shared`` hook), ``invocation`` the number of layers of the kind before this one."""
    kind = by_name(name)
    return kind.make(BuildContext(d_model=config.d_model, settings=config.sections[kind.section], layer_idx=index,
                                  norm_eps=config.norm_eps, causal=causal, context_parallel=context_parallel,
                                  factory=factory, sections=config.sections, shared=shared, invocation=invocation))


def build_shared(config: ModelConfig, factory: dict[str, Any]) -> nn.ModuleDict:
    """The model's table of shared modules: for each kind of the pattern with a ``shared`` hook (layers
    that share weights, such as Zamba2's ``Z``), its module under the kind's name, built once; empty for
    other models (no state-dict entries)."""
    used = dict.fromkeys(name for spec in pattern_tokens(config.layer_pattern) for name in spec if name is not None)
    table = nn.ModuleDict()
    for name in used:
        kind = by_name(name)
        if kind.shared is not None:
            table[name] = kind.shared(BuildContext(d_model=config.d_model, settings=config.sections[kind.section],
                                                   layer_idx=-1, norm_eps=config.norm_eps, factory=factory,
                                                   sections=config.sections))
    return table


def build_blocks(config: ModelConfig, factory: dict[str, Any], *, causal: bool = True,
                 context_parallel: Any = None, shared: nn.ModuleDict | None = None) -> nn.ModuleList:
    """One residual :class:`Block` per entry of ``config.layer_specs()``.

    ``context_parallel`` (e.g. :class:`ssmkit.distributed.ContextParallel`) goes to every mixer, all of
    which must support it. ``shared`` is the model's table of shared modules (:func:`build_shared`), needed
    when the pattern has kinds that share weights across layers."""
    specs = config.layer_specs()
    sharing = sorted({n for s in specs for n in s if n is not None and by_name(n).shared is not None})
    if sharing and (shared is None or any(n not in shared for n in sharing)):
        raise ValueError(f"the layer pattern {config.layer_pattern!r} has layers that share weights "
                         f"({', '.join(sharing)}): this model needs their table of shared modules (build_shared)")
    invocations: dict[str, int] = {}

    def layer(i: int, name: str, **kwargs: Any) -> nn.Module:
        if name not in sharing:
            return build_layer(config, i, name, factory, **kwargs)
        invocations[name] = invocations.get(name, -1) + 1
        return build_layer(config, i, name, factory, shared=shared[name], invocation=invocations[name], **kwargs)

    if context_parallel is not None:
        other = sorted({s.mixer for s in specs if not by_name(s.mixer).context_parallel})
        if other:
            raise ValueError(f"context parallelism supports the mixers whose registry entry says so (Mamba-2) only; "
                             f"the layer pattern {config.layer_pattern!r} also has {', '.join(other)}")
    return nn.ModuleList(
        Block(config.d_model,
              layer(i, spec.mixer, causal=causal, context_parallel=context_parallel),
              ff=None if spec.ff is None else layer(i, spec.ff),
              norm_eps=config.norm_eps, residual_in_fp32=config.residual_in_fp32, **factory)
        for i, spec in enumerate(specs)
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
