"""Settings of the selective SSM mixers: Mamba, Mamba-2 and Mamba-3 (mamba_ssm's names and defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Union

from ssmkit.layers.configs._checks import _dt_range, _positive
from ssmkit.ops.mamba3.step_sizes import DECAY_ACTIVATIONS, DecayActivation


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
