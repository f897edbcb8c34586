"""The layer kinds that models are built from, each declared once.

A :class:`LayerKind` ties together everything the rest of ssmkit needs to know about one kind: its letter
in ``ModelConfig.layer_pattern``, its settings dataclass (the only place its defaults live; the layer
takes it), its layer class and how a model builds it, its recurrent state type, its names in transformers
checkpoints, and its FLOP formula. :class:`ssmkit.models.ModelConfig` (its ``<section>`` fields and JSON),
the model's blocks, the transformers converters, ``ssmkit info`` and the CLI's ``--model.<section>.*``
options all read this registry; ``docs/adding-a-mixer.md`` says how to add a kind.

Mixer letters are uppercase letters or digits, feed-forward letters lowercase. Kinds may share a settings
section (``A`` and ``W`` both read ``attention``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from ssmkit.layers import sizes
from ssmkit.layers.attention import Attention, AttentionState
from ssmkit.layers.configs import (
    AttentionConfig,
    HyenaConfig,
    Mamba2Config,
    Mamba3Config,
    MambaConfig,
    MLPConfig,
    MoEConfig,
    S4Config,
    S4DConfig,
)
from ssmkit.layers.hyena import Hyena, HyenaState
from ssmkit.layers.mamba import Mamba, MambaState
from ssmkit.layers.mamba2 import Mamba2, Mamba2State
from ssmkit.layers.mamba3 import Mamba3, Mamba3State
from ssmkit.layers.mlp import MLP
from ssmkit.layers.moe import MoE
from ssmkit.layers.parallel_hybrid import (
    ParallelHybrid,
    ParallelHybridConfig,
    ParallelHybridState,
)
from ssmkit.layers.parallel_hybrid import size as parallel_hybrid_size
from ssmkit.layers.s4 import S4, S4State
from ssmkit.layers.s4d import S4D, S4DState
from ssmkit.layers.shared_transformer import (
    SharedTransformerConfig,
    build_shared_blocks,
)
from ssmkit.layers.shared_transformer_mamba2 import (
    SharedTransformerMamba2,
    SharedTransformerMamba2State,
)
from ssmkit.layers.state import LayerState
from ssmkit.layers.ungated_mlp import UngatedMLP, UngatedMLPConfig
from ssmkit.layers.ungated_mlp import size as ungated_mlp_size


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """What a model passes when it builds one layer: its width, the kind's settings, the layer's index, the
    model's norm eps, whether the model is causal (language models) or may read the future (classifiers),
    the context-parallel process group of the layers that split a sequence across ranks (or None), and
    the ``device``/``dtype`` factory arguments; for kinds that read other kinds' settings, every section
    of the model (``sections``); for kinds with a ``shared`` hook, the model's module of the kind
    (``shared``) and how many layers of the kind come before this one (``invocation``)."""

    d_model: int
    settings: Any
    layer_idx: int
    norm_eps: float = 1e-5
    causal: bool = True
    context_parallel: Any = None
    factory: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    sections: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    shared: Any = None
    invocation: int = 0


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """One kind of layer.

    letter: its letter in a layer pattern (mixers: uppercase or digit; feed-forwards: lowercase).
    name: the kind's name (``LayerSpec.mixer`` / ``LayerSpec.ff``). section: the ModelConfig field (and JSON
    key, and ``--model.<section>.*`` option prefix) that holds its settings. config: the settings dataclass;
    it may define ``validate(d_model)``. layer: the module class. build: makes the layer from a
    :class:`BuildContext` (default: ``layer(d_model, settings, layer_idx=..., **factory)``). state: the
    :class:`LayerState` type of its decode cache (None for stateless feed-forwards). size: ``(settings,
    d_model) -> (parameters, buffer elements)`` of the layer without building it (None: counted on a copy
    built on the meta device; :mod:`ssmkit.layers.sizes` holds the built-in kinds'). flops: forward FLOPs
    per token of a built layer when it reads sequences of ``length`` tokens (matrix products, convolutions,
    scans; elementwise work is not counted). transformers: transformers ``model_type`` -> the name of this
    layer's module inside that model's decoder layers. context_parallel: whether its build takes
    ``BuildContext.context_parallel`` (a sequence split across ranks). shared: for kinds whose layers share
    weights, builds from a :class:`BuildContext` (``layer_idx`` -1) the module the model holds once, in its
    table of shared modules under the kind's name, and passes to every layer's build as
    ``BuildContext.shared``. doc: one line for listings.
    """

    letter: str
    name: str
    section: str
    config: type
    layer: type[nn.Module]
    flops: Callable[[nn.Module, int], float]
    state: type[LayerState] | None = None
    size: Callable[[Any, int], tuple[int, int]] | None = None
    build: Callable[[BuildContext], nn.Module] | None = None
    transformers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    context_parallel: bool = False
    doc: str = ""
    shared: Callable[[BuildContext], nn.Module] | None = None

    @property
    def feed_forward(self) -> bool:
        return self.letter.islower()

    def make(self, context: BuildContext) -> nn.Module:
        """The layer for ``context``."""
        if self.build is not None:
            return self.build(context)
        return self.layer(context.d_model, context.settings, layer_idx=context.layer_idx, **context.factory)


_KINDS: dict[str, LayerKind] = {}


def register(kind: LayerKind) -> LayerKind:
    """Add ``kind``; its letter and name must be new, and a section shared with another kind must hold
    the same settings class."""
    if len(kind.letter) != 1 or not (kind.letter.isalnum() and kind.letter.isascii()):
        raise ValueError(f"layer kind {kind.name!r}: letter must be one ASCII letter or digit, got {kind.letter!r}")
    for other in _KINDS.values():
        if kind.letter == other.letter or kind.name == other.name:
            raise ValueError(f"layer kind {kind.name!r} ({kind.letter}) clashes with {other.name!r} ({other.letter})")
        if kind.section == other.section and kind.config is not other.config:
            raise ValueError(f"layer kind {kind.name!r}: section {kind.section!r} already holds "
                             f"{other.config.__name__}")
    if not dataclasses.is_dataclass(kind.config):
        raise TypeError(f"layer kind {kind.name!r}: config must be a dataclass, got {kind.config!r}")
    _KINDS[kind.letter] = kind
    return kind


def unregister(letter: str) -> None:
    """Remove the kind of ``letter`` (for kinds registered by tests or plugins)."""
    _KINDS.pop(letter)


def kinds() -> list[LayerKind]:
    """Every registered kind, mixers first, in registration order."""
    return sorted(_KINDS.values(), key=lambda k: k.feed_forward)


def by_letter(letter: str) -> LayerKind | None:
    return _KINDS.get(letter)


def by_name(name: str) -> LayerKind:
    for kind in _KINDS.values():
        if kind.name == name:
            return kind
    raise ValueError(f"no layer kind is named {name!r}; known: {', '.join(k.name for k in kinds())}")


def sections() -> dict[str, type]:
    """``{section: settings class}`` of every registered kind (one entry per shared section)."""
    return {k.section: k.config for k in kinds()}


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind whose layer class ``module`` is (None for other modules)."""
    return next((k for k in kinds() if type(module) is k.layer), None)


# FLOPs per token: 2 per multiply-add of the matrix products, plus each kind's sequence mixing.

def linear_flops(module: nn.Module) -> float:
    """2 x the weights of every ``nn.Linear`` inside ``module``."""
    return 2.0 * sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _fft_conv_flops(channels: int, length: int) -> float:
    # Three FFTs of 2L points (input, kernel, inverse), ~5 n log2 n real FLOPs each, spread over L tokens.
    n = 2 * max(length, 1)
    return channels * 3 * 5 * n * math.log2(n) / max(length, 1)


def _mamba_flops(layer: nn.Module, length: int) -> float:
    inner, n = layer.d_inner, layer.d_state
    # Depthwise convolution, then per (channel, state): discretise, update, read out.
    return linear_flops(layer) + 2 * inner * layer.d_conv + 8 * inner * n


def _ssd_flops(heads: int, headdim: int, groups: int, d_state: int, chunk: int, length: int) -> float:
    q = min(chunk, max(length, 1))
    # Within a chunk: C·Bᵀ scores per group and their product with x per head; across chunks: the states
    # written (Bᵀx) and read (C·state).
    return 2 * q * (groups * d_state + heads * headdim) + 4 * heads * headdim * d_state


def _mamba2_flops(layer: nn.Module, length: int) -> float:
    return (linear_flops(layer) + 2 * layer.conv_dim * layer.d_conv
            + _ssd_flops(layer.nheads, layer.headdim, layer.ngroups, layer.d_state, layer.chunk_size, length))


def _mamba3_flops(layer: nn.Module, length: int) -> float:
    c = layer.config
    rank = c.mimo_rank if c.is_mimo else 1
    heads = c.expand * layer.d_model // c.headdim
    return linear_flops(layer) + rank * _ssd_flops(heads, c.headdim, c.ngroups, c.d_state, c.chunk_size, length)


def _lti_flops(layer: nn.Module, length: int) -> float:
    h = layer.d_model
    directions = 2 if layer.config.bidirectional else 1
    # The kernel (a Vandermonde / Cauchy product per position and state) and the FFT convolution.
    return linear_flops(layer) + directions * (8 * h * layer.config.d_state + _fft_conv_flops(h, length))


def _hyena_flops(layer: nn.Module, length: int) -> float:
    c, h = layer.config, layer.d_model
    filter_mlp = linear_flops(layer.filter_fn) * min(length, c.l_max) / max(length, 1)
    return (linear_flops(layer) - linear_flops(layer.filter_fn) + filter_mlp
            + 2 * (c.order + 1) * h * c.short_filter_order + (c.order - 1) * _fft_conv_flops(h, length))


def _attention_flops(layer: nn.Module, length: int) -> float:
    length = max(length, 1)
    window = layer.window or length
    # Mean number of keys a query sees over a sequence of ``length`` tokens (causal, windowed).
    keys = sum(min(t + 1, window) for t in range(min(length, window))) + max(length - window, 0) * window
    return linear_flops(layer) + 4 * layer.num_heads * layer.head_dim * keys / length


def _moe_flops(layer: nn.Module, length: int) -> float:
    one_expert = linear_flops(layer.experts[0])
    return linear_flops(layer.router) + layer.top_k * one_expert


def _parallel_hybrid_flops(layer: nn.Module, length: int) -> float:
    return _attention_flops(layer.self_attn, length) + _mamba2_flops(layer.mamba, length)


def _bidirectional_check(ctx: BuildContext, section: str) -> None:
    if ctx.settings.bidirectional and ctx.causal:
        raise ValueError(f"layer {ctx.layer_idx}: {section}.bidirectional reads future tokens, which a causal "
                         "language model cannot; use ssmkit.models.SequenceClassifier for non-causal tasks")


def _build_lti(layer: type[nn.Module], section: str) -> Callable[[BuildContext], nn.Module]:
    def build(ctx: BuildContext) -> nn.Module:
        _bidirectional_check(ctx, section)
        return layer(ctx.d_model, ctx.settings, layer_idx=ctx.layer_idx, **ctx.factory)

    return build


def _build_mamba2(ctx: BuildContext) -> nn.Module:
    return Mamba2(ctx.d_model, ctx.settings, norm_eps=ctx.norm_eps, layer_idx=ctx.layer_idx,
                  context_parallel=ctx.context_parallel, **ctx.factory)


def _build_attention(window: bool) -> Callable[[BuildContext], nn.Module]:
    def build(ctx: BuildContext) -> nn.Module:
        return Attention(ctx.d_model, ctx.settings, window=ctx.settings.window if window else None,
                         layer_idx=ctx.layer_idx, **ctx.factory)

    return build


def _build_parallel_hybrid(ctx: BuildContext) -> nn.Module:
    return ParallelHybrid(ctx.d_model, ctx.settings, norm_eps=ctx.norm_eps, layer_idx=ctx.layer_idx, **ctx.factory)


def _build_mlp(ctx: BuildContext) -> nn.Module:
    return MLP(ctx.d_model, ctx.settings.d_intermediate, bias=ctx.settings.bias,
               gate_multiplier=ctx.settings.gate_multiplier, down_multiplier=ctx.settings.down_multiplier,
               **ctx.factory)


def _build_moe(ctx: BuildContext) -> nn.Module:
    return MoE(ctx.d_model, ctx.settings, **ctx.factory)


for _kind in (
    LayerKind("M", "mamba", "mamba", MambaConfig, Mamba, _mamba_flops, MambaState, size=sizes.mamba,
              transformers={"mamba": "mixer", "falcon_mamba": "mixer", "jamba": "mamba"},
              doc="Mamba-1 (selective scan)"),
    # mamba_ssm's Mamba-3 keeps its norms at eps 1e-5 whatever the model's norm_eps: the default build.
    LayerKind("2", "mamba2", "mamba2", Mamba2Config, Mamba2, _mamba2_flops, Mamba2State, size=sizes.mamba2,
              build=_build_mamba2,
              transformers={"mamba2": "mixer", "bamba": "mamba", "nemotron_h": "mixer"}, context_parallel=True,
              doc="Mamba-2 (SSD)"),
    LayerKind("3", "mamba3", "mamba3", Mamba3Config, Mamba3, _mamba3_flops, Mamba3State, size=sizes.mamba3,
              doc="Mamba-3"),
    LayerKind("A", "attention", "attention", AttentionConfig, Attention, _attention_flops, AttentionState,
              size=sizes.attention, build=_build_attention(window=False),
              transformers={"jamba": "self_attn", "bamba": "self_attn", "nemotron_h": "mixer"},
              doc="full causal attention"),
    LayerKind("W", "sliding_window_attention", "attention", AttentionConfig, Attention, _attention_flops,
              AttentionState, size=sizes.attention, build=_build_attention(window=True),
              doc="sliding-window attention (window attention.window)"),
    LayerKind("S", "s4d", "s4d", S4DConfig, S4D, _lti_flops, S4DState, size=sizes.s4d, build=_build_lti(S4D, "s4d"),
              doc="S4D (diagonal LTI)"),
    LayerKind("4", "s4", "s4", S4Config, S4, _lti_flops, S4State, size=sizes.s4, build=_build_lti(S4, "s4"),
              doc="S4 (DPLR LTI)"),
    LayerKind("H", "hyena", "hyena", HyenaConfig, Hyena, _hyena_flops, HyenaState, size=sizes.hyena, doc="Hyena"),
    LayerKind("m", "mlp", "mlp", MLPConfig, MLP, lambda layer, length: linear_flops(layer), size=sizes.mlp,
              build=_build_mlp,
              transformers={"jamba": "feed_forward", "bamba": "feed_forward"}, doc="SwiGLU MLP"),
    LayerKind("e", "moe", "moe", MoEConfig, MoE, _moe_flops, size=sizes.moe, build=_build_moe,
              transformers={"jamba": "feed_forward"},
              doc="mixture of SwiGLU experts"),
    LayerKind("u", "ungated_mlp", "ungated_mlp", UngatedMLPConfig, UngatedMLP,
              lambda layer, length: linear_flops(layer), size=ungated_mlp_size, transformers={"nemotron_h": "mixer"},
              doc="ungated MLP (squared ReLU by default, Nemotron-H)"),
    LayerKind("F", "parallel_hybrid", "parallel_hybrid", ParallelHybridConfig, ParallelHybrid, _parallel_hybrid_flops,
              ParallelHybridState, size=parallel_hybrid_size, build=_build_parallel_hybrid,
              doc="attention and Mamba-2 side by side, outputs summed (Falcon-H1)"),
):
    register(_kind)


def _shared_transformer_mamba2_flops(layer: nn.Module, length: int) -> float:
    # Its own matrices (linear, adapters) and Mamba-2, plus its call of the shared block.
    shared = layer.shared
    return (linear_flops(layer) - linear_flops(layer.mamba) + _mamba2_flops(layer.mamba, length)
            + _attention_flops(shared.self_attn, length) + linear_flops(shared.feed_forward))


def _build_shared_transformers(ctx: BuildContext) -> nn.Module:
    return build_shared_blocks(ctx.d_model, ctx.settings, norm_eps=ctx.norm_eps, **ctx.factory)


def _build_shared_transformer_mamba2(ctx: BuildContext) -> nn.Module:
    if ctx.shared is None:
        raise ValueError(f"layer {ctx.layer_idx}: a Z layer calls the model's shared transformer blocks; build it "
                         "with the model's table of shared modules (ssmkit.models.blocks.build_shared)")
    return SharedTransformerMamba2(ctx.d_model, ctx.settings, ctx.sections.get("mamba2") or Mamba2Config(),
                                   ctx.shared, ctx.invocation, norm_eps=ctx.norm_eps, layer_idx=ctx.layer_idx,
                                   **ctx.factory)


register(LayerKind("Z", "shared_transformer_mamba2", "shared_transformer", SharedTransformerConfig,
                   SharedTransformerMamba2, _shared_transformer_mamba2_flops, SharedTransformerMamba2State,
                   build=_build_shared_transformer_mamba2, shared=_build_shared_transformers,
                   doc="Zamba2 hybrid: a call of the model's shared transformer blocks, then Mamba-2 (mamba2)"))


def flops_per_token(blocks: Iterable[nn.Module], length: int) -> float:
    """Forward FLOPs per token of the mixers and feed-forwards of ``blocks`` (:class:`ssmkit.layers.Block`)
    at sequence length ``length``; layers of unregistered classes raise ``ValueError``."""
    total = 0.0
    for block in blocks:
        for layer in (block.mixer, block.ff):
            if layer is None:
                continue
            kind = kind_of(layer)
            if kind is None:
                raise ValueError(f"{type(layer).__name__} is not a registered layer kind: no FLOP formula")
            total += kind.flops(layer, length)
    return total


__all__ = ["BuildContext", "LayerKind", "by_letter", "by_name", "flops_per_token", "kind_of", "kinds",
           "linear_flops", "register", "sections", "unregister"]
