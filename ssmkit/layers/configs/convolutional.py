"""Settings of the convolutional (time-invariant) mixers: S4D, S4 (safari's names) and Hyena."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ssmkit.layers.configs._checks import _dt_range, _even_state, _positive


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
