"""Settings of attention and the feed-forward kinds: MLP and mixture-of-experts (Jamba's names for MoE)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ssmkit.layers.configs._checks import _positive


@dataclass(kw_only=True)
class AttentionConfig:
    """Attention mixer settings (:class:`ssmkit.layers.Attention`), shared by ``A`` and ``W`` layers.

    ``num_heads_kv`` None = ``num_heads`` (plain multi-head); ``head_dim`` None = d_model / num_heads;
    ``window`` applies to ``W`` layers only; ``rotary_emb_dim`` 0 = no positional encoding (Jamba).
    """

    num_heads: int = 8
    """Query heads."""
    num_heads_kv: int | None = None
    """Key/value heads (grouped-query); None = num_heads."""
    head_dim: int | None = None
    """Channels per head; None = d_model / num_heads."""
    window: int = 2048
    """Window of W (sliding-window) layers."""
    rotary_emb_dim: int = 0
    """Channels per head with RoPE; 0 = no positional encoding."""
    rotary_emb_base: float = 10000.0
    """RoPE base."""
    bias: bool = False
    """Biases in the projections."""
    softmax_scale: float | None = None
    """Scale of the query-key products before the softmax; None = head_dim^-1/2 (Granite's
    ``attention_multiplier`` sets it)."""

    def validate(self, d_model: int) -> None:
        _positive("attention.num_heads", self.num_heads)
        kv = self.num_heads if self.num_heads_kv is None else self.num_heads_kv
        _positive("attention.num_heads_kv", kv)
        if self.num_heads % kv:
            raise ValueError(f"attention.num_heads={self.num_heads} must be divisible by attention.num_heads_kv={kv}")
        if self.head_dim is None and d_model % self.num_heads:
            raise ValueError(f"attention.num_heads={self.num_heads} must divide d_model={d_model} "
                             "unless attention.head_dim is set")
        head_dim = d_model // self.num_heads if self.head_dim is None else self.head_dim
        _positive("attention.head_dim", head_dim)
        _positive("attention.window", self.window)
        if not 0 <= self.rotary_emb_dim <= head_dim or self.rotary_emb_dim % 2:
            raise ValueError(f"attention.rotary_emb_dim must be even and in [0, head_dim={head_dim}], "
                             f"got {self.rotary_emb_dim}")
        _positive("attention.rotary_emb_base", self.rotary_emb_base)
        if self.softmax_scale is not None and not 0 < self.softmax_scale < math.inf:
            raise ValueError(f"attention.softmax_scale must be None or a finite number > 0, got {self.softmax_scale}")


@dataclass(kw_only=True)
class MLPConfig:
    """SwiGLU feed-forward settings (:class:`ssmkit.layers.MLP`, suffix ``m``)."""

    d_intermediate: int = 1024
    """Hidden size of the SwiGLU MLP."""
    bias: bool = False
    """Biases in the three projections (Bamba's ``mlp_bias``)."""
    gate_multiplier: float = 1.0
    """Scale of gate_proj's output before the SiLU (Falcon-H1's µP mlp_multipliers[0])."""
    down_multiplier: float = 1.0
    """Scale of down_proj's output (Falcon-H1's µP mlp_multipliers[1])."""

    def validate(self, d_model: int) -> None:
        _positive("mlp.d_intermediate", self.d_intermediate)
        for name in ("gate_multiplier", "down_multiplier"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"mlp.{name} must be finite, got {getattr(self, name)}")


@dataclass(kw_only=True)
class MoEConfig:
    """Mixture-of-experts settings (:class:`ssmkit.layers.MoE`, suffix ``e``; Jamba's defaults).

    The training loss adds ``router_aux_loss_coef`` × the load-balancing loss and ``router_z_loss_coef``
    × the router z-loss, pooled over the MoE layers (see :meth:`ssmkit.models.LanguageModel.forward`).
    """

    num_experts: int = 16
    """Experts per MoE layer."""
    top_k: int = 2
    """Experts each token is routed to."""
    d_intermediate: int = 1024
    """Hidden size of each expert."""
    renormalize: bool = False
    """Renormalise the top-k router weights to sum to 1 (Jamba does not)."""
    router_aux_loss_coef: float = 1e-3
    """Weight of the load-balancing loss in the training loss."""
    router_z_loss_coef: float = 0.0
    """Weight of the router z-loss."""
    router_softmax: Literal["all", "top_k"] = "all"
    """Where the router's softmax goes: ``"all"`` over all experts, then the top k are picked (Jamba;
    ``renormalize`` divides them by their sum); ``"top_k"`` picks the k largest logits, then the softmax
    runs over those k (Granite-4.0: the same weights as ``"all"`` with ``renormalize``, rounded
    differently)."""
    shared_d_intermediate: int = 0
    """Hidden size of a shared SwiGLU expert that every token passes through, added to the routed
    experts' output (Granite-4.0's ``shared_mlp``); 0 = none."""

    def validate(self, d_model: int) -> None:
        _positive("moe.num_experts", self.num_experts)
        _positive("moe.d_intermediate", self.d_intermediate)
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe.top_k must be in [1, moe.num_experts={self.num_experts}], got {self.top_k}")
        if self.router_softmax == "top_k" and self.renormalize:
            raise ValueError("moe.renormalize must be false with moe.router_softmax='top_k' (the softmax over the "
                             "top k already sums to 1)")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"moe.{name} must be >= 0, got {getattr(self, name)}")
