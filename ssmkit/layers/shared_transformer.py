"""A transformer block shared by several layers of a model (Zamba2's), and its attention.

:class:`SharedTransformer` reads the concatenation of the residual stream and the model's input embeddings
(2d features) and returns d features: ``RMSNorm(2d) -> attention -> RMSNorm(d) -> gated MLP``, without
residual adds inside (transformers' ``Zamba2AttentionDecoderLayer``). A model builds ``num_blocks`` of them
once (its table of shared modules, ``LanguageModel.shared``) and its ``Z`` layers
(:mod:`ssmkit.layers.shared_transformer_mamba2`) call them in rotation, each call adding its own low-rank
adapters to the projections.

Dimensions: b batch, l length, d model width, h query heads, hk key/value heads, p head dim, f MLP width,
r adapter rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssmkit.layers.attention import (
    Attention,
    AttentionState,
    _causal_attention,
    _rotary,
)
from ssmkit.layers.configs import AttentionConfig
from ssmkit.layers.norm import RMSNorm
from ssmkit.layers.ungated_mlp import _FUNCTIONS, ACTIVATIONS, Activation


@dataclass(kw_only=True)
class SharedTransformerConfig:
    """Settings of the shared transformer blocks and the ``Z`` layers that call them (transformers' Zamba2
    names in brackets). The ``Z`` layers' Mamba-2 mixers take the model's ``mamba2`` settings."""

    num_blocks: int = 1
    """Distinct shared blocks, called in rotation by the Z layers (num_mem_blocks)."""
    num_heads: int = 32
    """Query heads of the shared attention (num_attention_heads)."""
    num_heads_kv: int | None = None
    """Key/value heads (num_key_value_heads); default num_heads."""
    head_dim: int | None = None
    """Channels per head (attention_head_dim); default 2 * d_model / num_heads (the block reads 2d features)."""
    softmax_scale: float | None = None
    """Attention logit scale; default (head_dim / 2) ** -0.5, Zamba2's."""
    rotary_emb_dim: int = 0
    """Leading dims of each head rotated by RoPE; 0 = no positional encoding (use_mem_rope: head_dim)."""
    rotary_emb_base: float = 10000.0
    """RoPE base theta (rope_parameters.rope_theta)."""
    d_intermediate: int | None = None
    """Hidden size of the gated MLP (intermediate_size); default 4 * d_model."""
    activation: Activation = "gelu"
    """Activation of the MLP's gate (hidden_act): gelu (erf), gelu_pytorch_tanh, silu, relu or relu2."""
    mlp_bias: bool = False
    """Biases in the MLP's projections (add_bias_linear)."""
    adapter_rank: int = 128
    """Rank of each call's low-rank adapters (adapter_rank)."""
    attention_adapters: bool = False
    """Each call also adds adapters to the q, k and v projections (use_shared_attention_adapter)."""

    def validate(self, d_model: int) -> None:
        for name in ("num_blocks", "num_heads", "adapter_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"shared_transformer.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_heads_kv", "head_dim", "d_intermediate"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"shared_transformer.{name} must be null or >= 1, got {getattr(self, name)}")
        if self.num_heads % self.kv_heads():
            raise ValueError(f"shared_transformer.num_heads ({self.num_heads}) must be divisible by num_heads_kv "
                             f"({self.kv_heads()})")
        if self.head_dim is None and (2 * d_model) % self.num_heads:
            raise ValueError(f"shared_transformer.num_heads ({self.num_heads}) must divide 2 * d_model "
                             f"({2 * d_model}) unless head_dim is given")
        p = self.head_size(d_model)
        if not 0 <= self.rotary_emb_dim <= p or self.rotary_emb_dim % 2:
            raise ValueError(f"shared_transformer.rotary_emb_dim must be even and in [0, head_dim={p}], "
                             f"got {self.rotary_emb_dim}")
        if not self.rotary_emb_base > 0:
            raise ValueError(f"shared_transformer.rotary_emb_base must be > 0, got {self.rotary_emb_base}")
        if self.softmax_scale is not None and not self.softmax_scale > 0:
            raise ValueError(f"shared_transformer.softmax_scale must be null or > 0, got {self.softmax_scale}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"shared_transformer.activation must be one of {', '.join(ACTIVATIONS)}, "
                             f"got {self.activation!r}")

    def kv_heads(self) -> int:
        return self.num_heads if self.num_heads_kv is None else self.num_heads_kv

    def head_size(self, d_model: int) -> int:
        return self.head_dim if self.head_dim is not None else 2 * d_model // self.num_heads

    def mlp_width(self, d_model: int) -> int:
        return self.d_intermediate if self.d_intermediate is not None else 4 * d_model


class SharedAttention(Attention):
    """Causal attention over 2d input features with d output features, whose q, k and v projections may
    take additive per-call terms (the calling layer's adapters). Parameters ``q_proj`` [h·p, 2d],
    ``k_proj``/``v_proj`` [hk·p, 2d], ``o_proj`` [d, h·p], no biases (transformers' ``Zamba2Attention``).

    The KV cache, its growth and the masked paths are :class:`ssmkit.layers.Attention`'s (full attention).
    """

    def __init__(self, d_model: int, config: SharedTransformerConfig, *, layer_idx: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)  # Attention's own projections are d -> d; these are 2d -> h·p -> d
        h, hk, p = config.num_heads, config.kv_heads(), config.head_size(d_model)
        self.config = AttentionConfig(num_heads=h, num_heads_kv=hk, head_dim=p, rotary_emb_dim=config.rotary_emb_dim,
                                      rotary_emb_base=config.rotary_emb_base, bias=False)
        self.d_model, self.num_heads, self.num_heads_kv, self.head_dim = 2 * d_model, h, hk, p
        self.window, self.rotary_emb_dim, self.rotary_emb_base = None, config.rotary_emb_dim, config.rotary_emb_base
        self.softmax_scale = (p / 2) ** -0.5 if config.softmax_scale is None else config.softmax_scale
        self.layer_idx = layer_idx
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.q_proj = nn.Linear(2 * d_model, h * p, **kw)
        self.k_proj = nn.Linear(2 * d_model, hk * p, **kw)
        self.v_proj = nn.Linear(2 * d_model, hk * p, **kw)
        self.o_proj = nn.Linear(h * p, d_model, **kw)

    def _name(self) -> str:
        return "SharedAttention" if self.layer_idx is None else f"SharedAttention (layer {self.layer_idx})"

    def forward(self, x: Tensor, *, deltas: tuple[Tensor, Tensor, Tensor] | None = None,
                seq_idx: Tensor | None = None, initial_state: AttentionState | None = None,
                cache: AttentionState | None = None) -> Tensor:
        """x (b, l, 2d) -> (b, l, d); ``deltas`` (q, k, v terms, (b, l, h·p) and (b, l, hk·p)) are added to the
        projections. ``seq_idx``, ``initial_state`` and ``cache`` as :meth:`ssmkit.layers.Attention.forward`."""
        b, l, segments, within, state = self._prepare(x, seq_idx, initial_state, cache)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if deltas is not None:
            q, k, v = q + deltas[0], k + deltas[1], v + deltas[2]
        q = q.view(b, l, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, l, self.num_heads_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, l, self.num_heads_kv, self.head_dim).transpose(1, 2)
        positions = torch.arange(l, device=x.device) if within is None else within
        if state is not None:
            continued = state.length[:, None] + torch.arange(l, device=x.device)
            positions = continued if segments is None else torch.where(segments == 1, continued, within)
        if self.rotary_emb_dim:
            q = _rotary(q, positions, self.rotary_emb_dim, self.rotary_emb_base)
            k = _rotary(k, positions, self.rotary_emb_dim, self.rotary_emb_base)
        if state is None:
            y = _causal_attention(q, k, v, window=None, segments=segments, scale=self.softmax_scale)
        else:
            y = self._attend_state(q, k, v, positions, segments, state)
        return self.o_proj(y.transpose(1, 2).reshape(b, l, self.num_heads * self.head_dim))


class GatedMLP(nn.Module):
    """``down_proj(act(g) * u)`` with ``[g, u] = gate_up_proj(x) + delta``: parameters ``gate_up_proj`` [2f, d]
    and ``down_proj`` [d, f] (transformers' ``Zamba2MLP``; biases with ``bias``)."""

    def __init__(self, d_model: int, d_intermediate: int, activation: str, bias: bool, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.act = _FUNCTIONS[activation]
        self.gate_up_proj = nn.Linear(d_model, 2 * d_intermediate, bias=bias, device=device, dtype=dtype)
        self.down_proj = nn.Linear(d_intermediate, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor, delta: Tensor | None = None) -> Tensor:
        """x (..., d) -> (..., d); ``delta`` (..., 2f) is added to the gate and up projections."""
        gate_up = self.gate_up_proj(x)
        if delta is not None:
            gate_up = gate_up + delta
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class SharedTransformer(nn.Module):
    """One shared block: ``gated_mlp(RMSNorm_d(attention(RMSNorm_2d(x))))``, x (b, l, 2d) -> (b, l, d).

    Parameters (transformers' names): ``input_layernorm`` [2d], ``self_attn`` (:class:`SharedAttention`),
    ``pre_ff_layernorm`` [d], ``feed_forward`` (:class:`GatedMLP`). Norms use the model's ``norm_eps``.

    Example::

        block = SharedTransformer(64, SharedTransformerConfig(num_heads=4, d_intermediate=128))
        y = block(torch.randn(2, 10, 128))          # (2, 10, 64)
    """

    def __init__(self, d_model: int, config: SharedTransformerConfig, *, norm_eps: float = 1e-5,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        config.validate(d_model)
        factory = {"device": device, "dtype": dtype}
        self.config, self.d_model = config, d_model
        self.input_layernorm = RMSNorm(2 * d_model, eps=norm_eps, **factory)
        self.self_attn = SharedAttention(d_model, config, **factory)
        self.pre_ff_layernorm = RMSNorm(d_model, eps=norm_eps, **factory)
        self.feed_forward = GatedMLP(d_model, config.mlp_width(d_model), config.activation, config.mlp_bias,
                                     **factory)

    def forward(self, x: Tensor, *, adapters: nn.Module | None = None, seq_idx: Tensor | None = None,
                initial_state: AttentionState | None = None, cache: AttentionState | None = None) -> Tensor:
        """x (b, l, 2d) -> (b, l, d). ``adapters`` (the calling layer) supplies its per-call terms through
        ``attention_deltas(h)`` (None without attention adapters) and ``mlp_delta(h)``."""
        h = self.input_layernorm(x)
        deltas = None if adapters is None else adapters.attention_deltas(h)
        a = self.self_attn(h, deltas=deltas, seq_idx=seq_idx, initial_state=initial_state, cache=cache)
        h = self.pre_ff_layernorm(a)
        return self.feed_forward(h, None if adapters is None else adapters.mlp_delta(h))


def build_shared_blocks(d_model: int, config: SharedTransformerConfig, *, norm_eps: float,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> nn.ModuleList:
    """The ``num_blocks`` shared blocks of one model, the entry of its shared-modules table."""
    return nn.ModuleList(SharedTransformer(d_model, config, norm_eps=norm_eps, device=device, dtype=dtype)
                         for _ in range(config.num_blocks))


__all__ = ["GatedMLP", "SharedAttention", "SharedTransformer", "SharedTransformerConfig", "build_shared_blocks"]
