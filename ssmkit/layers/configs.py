"""Settings of each mixer and feed-forward kind: the nested dataclasses of :class:`ModelConfig`.

Argument names and defaults are mamba_ssm's (safari's for Hyena, Jamba's for MoE). Each has
``validate(d_model)``, which raises ``ValueError`` naming the bad field; field docstrings are the help
texts of ``ssmkit train --model.<kind>.<field>``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args

DecayActivation = Literal["softplus", "heavy_tail"]
"""How Mamba-3 maps dd_A to its decay rate (see ssmkit.layers.mamba3.decay_rate)."""
DECAY_ACTIVATIONS: tuple[str, ...] = get_args(DecayActivation)

__all__ = [
    "AttentionConfig",
    "HyenaConfig",
    "MLPConfig",
    "Mamba2Config",
    "Mamba3Config",
    "MambaConfig",
    "MoEConfig",
    "S4Config",
    "S4DConfig",
    "layer_settings",
]


@dataclass(kw_only=True)
class MambaConfig:
    """Mamba-1 mixer settings (mamba_ssm's ``Mamba`` arguments).

    ``mixer_rms_eps`` set (falcon_mamba) adds weightless RMSNorms with that eps on dt, B and C;
    ``inner_layernorms`` (Jamba) adds learned RMSNorms ``dt_layernorm``, ``b_layernorm``, ``c_layernorm``
    there instead, with eps ``mixer_rms_eps`` (1e-6 when None, as Jamba's ``rms_norm_eps``).
    """

    d_state: int = 16
    """State size N per channel."""
    d_conv: int = 4
    """Width of the causal depthwise convolution."""
    expand: int = 2
    """d_inner = expand * d_model."""
    dt_rank: Union[int, Literal["auto"]] = "auto"
    """Rank of the Δ projection; "auto" = ceil(d_model / 16)."""
    dt_min: float = 1e-3
    """Smallest Δ at initialisation."""
    dt_max: float = 0.1
    """Largest Δ at initialisation."""
    dt_init: Literal["random", "constant"] = "random"
    """Initialisation of the Δ projection's weights: random or constant."""
    dt_scale: float = 1.0
    """Scale of that initialisation."""
    dt_init_floor: float = 1e-4
    """Lower bound of the initial Δ."""
    conv_bias: bool = True
    """Bias in the convolution."""
    bias: bool = False
    """Biases in the in/out projections."""
    mixer_rms_eps: float | None = None
    """falcon_mamba's weightless RMSNorm eps on Δ, B, C (None = none)."""
    inner_layernorms: bool = False
    """Jamba's learned RMSNorms on Δ, B and C."""
    fused: bool = True
    """Run a whole-sequence call without a state through ``mamba_inner_fn`` (the convolution, Δ, B, C and the
    gated output recomputed in the backward instead of kept); False: the separate ops, every intermediate kept.
    Same function either way."""

    def validate(self, d_model: int) -> None:
        _positive("mamba.d_state", self.d_state)
        _positive("mamba.d_conv", self.d_conv)
        _positive("mamba.expand", self.expand)
        if self.dt_rank != "auto":
            _positive("mamba.dt_rank", self.dt_rank)
        _dt_range("mamba", self.dt_min, self.dt_max, self.dt_init_floor)
        _positive("mamba.dt_scale", self.dt_scale)
        if self.mixer_rms_eps is not None:
            _positive("mamba.mixer_rms_eps", self.mixer_rms_eps)


@dataclass(kw_only=True)
class Mamba2Config:
    """Mamba-2 mixer settings (mamba_ssm's ``Mamba2`` arguments).

    ``d_inner = expand * d_model`` (or ``d_inner`` when set) is split into ``d_inner // headdim`` heads; B and
    C have ``ngroups`` groups (each shared by ``nheads // ngroups`` heads). ``dt_limit`` clamps Δ after the
    softplus. ``in_proj_multipliers`` and ``out_proj_bias`` are Falcon-H1's (µP scales of the projection's
    parts, an out-projection bias of its own); their defaults leave mamba_ssm's layer unchanged.
    """

    d_state: int = 128
    """State size N per head."""
    d_conv: int = 4
    """Width of the causal depthwise convolution."""
    expand: int = 2
    """d_inner = expand * d_model (unless d_inner is set)."""
    headdim: int = 64
    """Channels per head (d_inner / headdim heads)."""
    ngroups: int = 1
    """B/C groups, each shared by nheads / ngroups heads."""
    chunk_size: int = 256
    """Chunk length of the SSD algorithm."""
    dt_min: float = 1e-3
    """Smallest Δ at initialisation."""
    dt_max: float = 0.1
    """Largest Δ at initialisation."""
    dt_init_floor: float = 1e-4
    """Lower bound of the initial Δ."""
    dt_limit: tuple[float, float] = (0.0, math.inf)
    """(lo, hi) clamp of Δ after the softplus."""
    A_init_range: tuple[float, float] = (1.0, 16.0)
    """Range of the initial decay rates -A."""
    conv_bias: bool = True
    """Bias in the convolution."""
    bias: bool = False
    """Biases in the in/out projections."""
    norm_before_gate: bool = False
    """Gated RMSNorm normalises before multiplying by silu(z)."""
    rmsnorm: bool = True
    """Gated RMSNorm before out_proj."""
    D_has_hdim: bool = False
    """Skip D per channel (h, p) instead of per head."""
    d_inner: int | None = None
    """Channels of the SSM (in/out projection width); None = expand * d_model (Falcon-H1's mamba_d_ssm)."""
    in_proj_multipliers: tuple[float, float, float, float, float] = (1.0, 1.0, 1.0, 1.0, 1.0)
    """Scales of in_proj's z, x, B, C and dt outputs, bias included (Falcon-H1's µP ssm_multipliers)."""
    out_proj_bias: bool | None = None
    """Bias in out_proj; None = bias (Falcon-H1 sets it apart: projectors_bias)."""
    fused: bool = True
    """Run a whole-sequence call without a state through ``mamba_split_conv1d_scan_combined`` (the convolution
    and the norm's output recomputed in the backward instead of kept); False: the separate ops. Same function."""

    def inner_width(self, d_model: int) -> int:
        """d_inner: the field when set, else expand * d_model."""
        return self.expand * d_model if self.d_inner is None else self.d_inner

    def validate(self, d_model: int) -> None:
        for name in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
            _positive(f"mamba2.{name}", getattr(self, name))
        _dt_range("mamba2", self.dt_min, self.dt_max, self.dt_init_floor)
        if self.d_inner is not None:
            _positive("mamba2.d_inner", self.d_inner)
        if not all(math.isfinite(m) for m in self.in_proj_multipliers):
            raise ValueError(f"mamba2.in_proj_multipliers must be finite, got {self.in_proj_multipliers}")
        d_inner = self.inner_width(d_model)
        if d_inner % self.headdim:
            raise ValueError(
                f"mamba2.headdim={self.headdim} must divide d_inner = "
                + (f"expand * d_model = {self.expand} * {d_model} = {d_inner}" if self.d_inner is None
                   else f"mamba2.d_inner = {d_inner}")
            )
        nheads = d_inner // self.headdim
        if nheads % self.ngroups:
            raise ValueError(
                f"mamba2.ngroups={self.ngroups} must divide the number of heads {nheads} (d_inner / headdim)"
            )
        lo, hi = self.dt_limit
        if not 0 <= lo <= hi:
            raise ValueError(f"mamba2.dt_limit must be (lo, hi) with 0 <= lo <= hi, got {self.dt_limit}")
        lo, hi = self.A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"mamba2.A_init_range must be (lo, hi) with 0 < lo <= hi, got {self.A_init_range}")


@dataclass(kw_only=True)
class Mamba3Config:
    """Mamba-3 mixer settings (mamba_ssm's ``Mamba3`` arguments; no short convolution).

    ``rope_fraction`` (0.5 or 1.0) of the ``d_state`` entries rotate; ``is_mimo`` gives B and C rank
    ``mimo_rank``; ``decay_activation`` maps dd_A to the decay rate, ``A_floor`` bounds it; ``is_outproj_norm``
    adds a gated RMSNorm before out_proj.

    A saved config whose ``mamba3`` section has no ``decay_activation`` was written before the option
    existed, when Mamba-3 used softplus: it loads as ``"softplus"`` (``LEGACY_DEFAULTS``), so old
    checkpoints keep their function; new configs default to ``"heavy_tail"``.
    """

    LEGACY_DEFAULTS: ClassVar[dict[str, object]] = {"decay_activation": "softplus"}
    """Values of fields that a saved config lacks because it predates them (not the defaults of new ones)."""

    d_state: int = 128
    """State size N per head."""
    expand: int = 2
    """d_inner = expand * d_model."""
    headdim: int = 64
    """Channels per head."""
    ngroups: int = 1
    """B/C groups."""
    rope_fraction: float = 0.5
    """Fraction of the state pairs that rotate: 0.5 or 1.0."""
    dt_min: float = 1e-3
    """Smallest Δ at initialisation."""
    dt_max: float = 0.1
    """Largest Δ at initialisation."""
    dt_init_floor: float = 1e-4
    """Lower bound of the initial Δ."""
    decay_activation: DecayActivation = "heavy_tail"
    """f in A = -max(f(dd_A), A_floor): "heavy_tail" (mamba_ssm after 2.3.2, state-spaces/mamba #962: 1 + x
    for x >= 0, 1 / (1 - x) below) or "softplus" (mamba_ssm 2.3.2)."""
    A_floor: float = 1e-4
    """Smallest decay rate: A = -max(f(dd_A), A_floor)."""
    is_outproj_norm: bool = False
    """Gated RMSNorm before out_proj."""
    is_mimo: bool = False
    """Multi-input multi-output: B and C of rank mimo_rank."""
    mimo_rank: int = 4
    """Rank R of MIMO."""
    chunk_size: int = 64
    """Chunk length of the chunked scan."""

    def validate(self, d_model: int) -> None:
        for name in ("d_state", "expand", "headdim", "ngroups", "mimo_rank", "chunk_size", "A_floor"):
            _positive(f"mamba3.{name}", getattr(self, name))
        _dt_range("mamba3", self.dt_min, self.dt_max, self.dt_init_floor)
        if self.decay_activation not in DECAY_ACTIVATIONS:
            raise ValueError(f"mamba3.decay_activation must be one of {DECAY_ACTIVATIONS}, got {self.decay_activation!r}")
        if self.rope_fraction not in (0.5, 1.0) or int(self.d_state * self.rope_fraction) < 2:
            raise ValueError(
                f"mamba3.rope_fraction must be 0.5 or 1.0 and leave at least one rotary pair of the "
                f"d_state={self.d_state} entries, got {self.rope_fraction}"
            )
        d_inner = self.expand * d_model
        if d_inner % self.headdim or (d_inner // self.headdim) % self.ngroups:
            raise ValueError(
                f"mamba3.headdim={self.headdim} must divide d_inner = expand * d_model = {d_inner}, and "
                f"mamba3.ngroups={self.ngroups} the number of heads"
            )


@dataclass(kw_only=True)
class S4DConfig:
    """S4D mixer settings (:class:`ssmkit.layers.s4d.S4D`): diagonal complex SSM, ``d_state`` even.

    ``init`` "lin" / "inv" / "legs" (S4D-Lin, S4D-Inv, diagonal HiPPO-LegS); ``bidirectional`` adds a
    kernel over the future (for :class:`ssmkit.models.SequenceClassifier`; a LanguageModel refuses it).
    """

    d_state: int = 64
    """State size N (even: conjugate pairs)."""
    init: Literal["lin", "inv", "legs"] = "lin"
    """Initial A: S4D-Lin, S4D-Inv or diagonal HiPPO-LegS."""
    discretization: Literal["zoh", "bilinear"] = "zoh"
    """Zero-order hold or bilinear."""
    dt_min: float = 1e-3
    """Smallest Δ at initialisation."""
    dt_max: float = 0.1
    """Largest Δ at initialisation."""
    bidirectional: bool = False
    """Add a kernel over the future (classifiers only)."""

    def validate(self, d_model: int) -> None:
        _even_state("s4d", self.d_state)
        _dt_range("s4d", self.dt_min, self.dt_max, 0.0)


@dataclass(kw_only=True)
class S4Config:
    """S4 mixer settings (:class:`ssmkit.layers.s4.S4`): DPLR SSM from a HiPPO ``measure``.

    ``l_max`` is the kernel length: parallel calls take at most that many positions (decode steps
    have no limit). ``bidirectional`` as for :class:`S4DConfig`.
    """

    d_state: int = 64
    """State size N (even)."""
    measure: Literal["legs", "legt", "fourier"] = "legs"
    """HiPPO measure of the initial A."""
    l_max: int = 2048
    """Kernel length: the longest parallel input."""
    dt_min: float = 1e-3
    """Smallest Δ at initialisation."""
    dt_max: float = 0.1
    """Largest Δ at initialisation."""
    bidirectional: bool = False
    """Add a kernel over the future (classifiers only)."""

    def validate(self, d_model: int) -> None:
        _even_state("s4", self.d_state)
        _positive("s4.l_max", self.l_max)
        _dt_range("s4", self.dt_min, self.dt_max, 0.0)


@dataclass(kw_only=True)
class HyenaConfig:
    """Hyena mixer settings (:class:`ssmkit.layers.hyena.Hyena`, safari's ``HyenaOperator`` arguments).

    ``l_max`` is the length of the implicit filters (the longest dependency; inputs may be longer and
    the decode cache keeps ``l_max - 1`` positions per long convolution).
    """

    order: int = 2
    """Recurrence depth (number of long convolutions + 1)."""
    l_max: int = 2048
    """Length of the implicit filters."""
    filter_order: int = 64
    """Width of the filter MLP."""
    emb_dim: int = 3
    """Positional embedding size of the filter MLP (odd, >= 3)."""
    short_filter_order: int = 3
    """Width of the short depthwise convolution."""
    num_inner_mlps: int = 2
    """Hidden layers of the filter MLP."""
    w: float = 1.0
    """Frequency of the filter MLP's sine activation."""
    modulate: bool = True
    """Multiply filters by an exponential decay window."""
    fast_decay_pct: float = 0.3
    """Fastest decay of that window."""
    slow_decay_pct: float = 1.5
    """Slowest decay of that window."""
    target: float = 1e-2
    """Value the window decays to."""
    shift: float = 0.0
    """Added to the window."""

    def validate(self, d_model: int) -> None:
        for name in ("filter_order", "short_filter_order", "fast_decay_pct", "slow_decay_pct", "target"):
            _positive(f"hyena.{name}", getattr(self, name))
        if self.order < 2 or self.l_max < 2:
            raise ValueError(f"hyena.order and hyena.l_max must be >= 2, got {self.order} and {self.l_max}")
        if self.emb_dim < 3 or self.emb_dim % 2 == 0:
            raise ValueError(f"hyena.emb_dim must be odd and >= 3, got {self.emb_dim}")
        if self.num_inner_mlps < 0:
            raise ValueError(f"hyena.num_inner_mlps must be >= 0, got {self.num_inner_mlps}")


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

    def validate(self, d_model: int) -> None:
        _positive("moe.num_experts", self.num_experts)
        _positive("moe.d_intermediate", self.d_intermediate)
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe.top_k must be in [1, moe.num_experts={self.num_experts}], got {self.top_k}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"moe.{name} must be >= 0, got {getattr(self, name)}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


# S4 and S4D initialise from a HiPPO matrix whose eigendecomposition costs O(d_state^3) time and
# O(d_state^2) memory; the papers use 64 to 256.
MAX_HIPPO_STATE = 4096


def _even_state(prefix: str, d_state: int) -> None:
    if d_state < 2 or d_state % 2:
        raise ValueError(f"{prefix}.d_state must be even and >= 2 (states come in conjugate pairs), got {d_state}")
    if d_state > MAX_HIPPO_STATE:
        raise ValueError(f"{prefix}.d_state must be at most {MAX_HIPPO_STATE} (its HiPPO initialisation is an "
                         f"O(d_state^3) eigendecomposition), got {d_state}")


def _dt_range(prefix: str, dt_min: float, dt_max: float, floor: float) -> None:
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"{prefix}.dt_min / dt_max must satisfy 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    if floor < 0:
        raise ValueError(f"{prefix}.dt_init_floor must be >= 0, got {floor}")


_Settings = TypeVar("_Settings")


def layer_settings(cls: type[_Settings], config: _Settings | None, overrides: dict[str, Any], owner: str) -> _Settings:
    """What a layer runs with: ``config`` (default ``cls()``: the defaults live only in the config class)
    with keyword ``overrides`` of its fields, so ``Mamba2(64, d_state=32)`` is
    ``Mamba2(64, Mamba2Config(d_state=32))``."""
    if config is not None and not isinstance(config, cls):
        raise TypeError(f"{owner}: config must be a {cls.__name__}, got {type(config).__name__}")
    try:
        return dataclasses.replace(cls() if config is None else config, **overrides)
    except TypeError as e:
        raise TypeError(f"{owner}: {e} (the settings are the fields of {cls.__name__})") from None
