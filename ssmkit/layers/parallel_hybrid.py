"""Parallel hybrid mixer (Falcon-H1's): attention and a Mamba-2 mixer read the same normed input side by side,
and their scaled outputs are summed.

``y = ssm_out · Mamba2(ssm_in · x) + attention_out · Attention(attention_in · x)``, where the attention's keys
are scaled by ``key_multiplier`` (folded into its softmax scale: ``q·(m k) / √p = q·k · m / √p``, biases
included) and the Mamba-2 layer carries its own µP scales (``mamba2.in_proj_multipliers``). Both layers are
ssmkit's own (:class:`ssmkit.layers.Attention`, :class:`ssmkit.layers.Mamba2`), under transformers' module
names ``self_attn`` and ``mamba``; the block around it (pre-norm, residual, feed-forward) is the usual
:class:`ssmkit.layers.Block`, so a Falcon-H1 layer is ``"Fm"`` (this mixer and a SwiGLU MLP).

The decode state holds both layers' states: the attention's KV cache (grown in blocks, as
:class:`ssmkit.layers.AttentionState`) and the Mamba-2 convolution window and scan state.

Dimensions: ``b`` batch, ``l`` length, ``H`` d_model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ssmkit.layers import sizes
from ssmkit.layers.attention import Attention, AttentionState
from ssmkit.layers.configs import AttentionConfig, Mamba2Config, layer_settings
from ssmkit.layers.mamba2 import Mamba2, Mamba2State
from ssmkit.layers.state import LayerState

_MULTIPLIERS = ("attention_in_multiplier", "attention_out_multiplier", "key_multiplier", "ssm_in_multiplier",
                "ssm_out_multiplier")


@dataclass(kw_only=True)
class ParallelHybridConfig:
    """Parallel hybrid mixer settings (letter ``F``): the attention's and the Mamba-2 layer's own settings and
    Falcon-H1's µP multipliers (all 1 by default: a plain sum of the two layers)."""

    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Settings of the attention half (full causal attention; its window is not used)."""
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    """Settings of the Mamba-2 half."""
    attention_in_multiplier: float = 1.0
    """Scale of the attention's input."""
    attention_out_multiplier: float = 1.0
    """Scale of the attention's output."""
    key_multiplier: float = 1.0
    """Scale of the attention's keys (bias included)."""
    ssm_in_multiplier: float = 1.0
    """Scale of the Mamba-2 layer's input."""
    ssm_out_multiplier: float = 1.0
    """Scale of the Mamba-2 layer's output."""

    def validate(self, d_model: int) -> None:
        for name in _MULTIPLIERS:
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"parallel_hybrid.{name} must be finite, got {getattr(self, name)}")
        for part in (self.attention, self.mamba2):
            try:
                part.validate(d_model)
            except ValueError as e:
                raise ValueError(f"parallel_hybrid.{e}") from None


@dataclasses.dataclass(eq=False)
class ParallelHybridState(AttentionState):
    """Decode state of one :class:`ParallelHybrid` layer: the attention's (k, v, length; see
    :class:`ssmkit.layers.AttentionState`, whose growth and copies it shares) and the Mamba-2 layer's
    (conv (b, conv_dim, w), ssm (b, h, p, N); see :class:`ssmkit.layers.Mamba2State`)."""

    kind = "parallel_hybrid"
    conv: torch.Tensor
    ssm: torch.Tensor

    def mamba2_state(self) -> Mamba2State:
        """The Mamba-2 half, sharing this state's tensors (a layer updating it updates this state)."""
        return Mamba2State(self.conv, self.ssm)

    def copy_(self, other: LayerState) -> ParallelHybridState:
        """Overwrite with ``other``'s values; the KV cache as :meth:`AttentionState.copy_` does."""
        super().copy_(other)
        self.mamba2_state().copy_(other.mamba2_state())
        return self


class ParallelHybrid(nn.Module):
    """Attention and Mamba-2 side by side on the same input, outputs scaled and summed (Falcon-H1's mixer).

    Args:
        d_model: model width H.
        config: a :class:`ParallelHybridConfig` (its fields may also be given as keywords).
        norm_eps: eps of the Mamba-2 layer's gated RMSNorm (the model's, as transformers' Falcon-H1).
        layer_idx: only for error messages.

    ``forward(x, *, seq_idx=None, initial_state=None, cache=None)``: x (b, l, H) -> (b, l, H), with a
    :class:`ParallelHybridState` as ``initial_state`` (read only) or ``cache`` (updated in place).

    Example::

        mixer = ParallelHybrid(64, attention=AttentionConfig(num_heads=4, rotary_emb_dim=16),
                               mamba2=Mamba2Config(d_state=16, headdim=16))
        state = mixer.allocate_state(2)
        y = mixer(torch.randn(2, 10, 64), cache=state)
    """

    def __init__(self, d_model: int, config: ParallelHybridConfig | None = None, *, norm_eps: float = 1e-5,
                 layer_idx: int | None = None, device: torch.device | None = None, dtype: torch.dtype | None = None,
                 **settings: Any) -> None:
        super().__init__()
        self.config = config = layer_settings(ParallelHybridConfig, config, settings, "ParallelHybrid")
        config.validate(d_model)
        a = config.attention
        head_dim = d_model // a.num_heads if a.head_dim is None else a.head_dim
        factory = {"device": device, "dtype": dtype}
        self.self_attn = Attention(d_model, a, softmax_scale=head_dim**-0.5 * config.key_multiplier,
                                   layer_idx=layer_idx, **factory)
        self.mamba = Mamba2(d_model, config.mamba2, norm_eps=norm_eps, layer_idx=layer_idx, **factory)
        self.layer_idx = layer_idx

    @property
    def decode_graph_blocker(self) -> str | None:
        return self.self_attn.decode_graph_blocker

    def allocate_state(self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None,
                       max_length: int | None = None) -> ParallelHybridState:
        """A zero state; ``max_length`` preallocates the KV cache for that many tokens."""
        kv = self.self_attn.allocate_state(batch_size, dtype=dtype, device=device, max_length=max_length)
        ssm = self.mamba.allocate_state(batch_size, dtype=dtype, device=device)
        return ParallelHybridState(kv.k, kv.v, kv.length, ssm.conv, ssm.ssm)

    def forward(self, x: torch.Tensor, *, seq_idx: torch.Tensor | None = None,
                initial_state: ParallelHybridState | None = None,
                cache: ParallelHybridState | None = None) -> torch.Tensor:
        """x (b, l, H) -> (b, l, H); seq_idx (b, l) int restarts both halves where it changes."""
        if cache is not None and initial_state is not None:
            raise ValueError(f"{self._name()}: pass either cache (updated) or initial_state (read only), not both")
        state = cache if cache is not None else initial_state
        if state is not None and not isinstance(state, ParallelHybridState):
            raise TypeError(f"{self._name()}: state must be a ParallelHybridState, got {type(state).__name__}")
        key = "cache" if cache is not None else "initial_state"
        c = self.config
        ssm = self.mamba(_scaled(x, c.ssm_in_multiplier), seq_idx=seq_idx,
                         **({} if state is None else {key: state.mamba2_state()}))
        attn = self.self_attn(_scaled(x, c.attention_in_multiplier), seq_idx=seq_idx,
                              **({} if state is None else {key: state}))
        return _scaled(ssm, c.ssm_out_multiplier) + _scaled(attn, c.attention_out_multiplier)

    def _name(self) -> str:
        return "ParallelHybrid" if self.layer_idx is None else f"ParallelHybrid (layer {self.layer_idx})"


def _scaled(t: torch.Tensor, multiplier: float) -> torch.Tensor:
    return t if multiplier == 1.0 else t * multiplier


def size(config: ParallelHybridConfig, d_model: int) -> tuple[int, int]:
    """(parameters, buffer elements) of the layer ``(config, d_model)`` builds: its two halves'."""
    a, m = sizes.attention(config.attention, d_model), sizes.mamba2(config.mamba2, d_model)
    return a[0] + m[0], a[1] + m[1]
