"""Multi-horizon probabilistic forecaster: an SSM encoder reads the history, a linear head gives quantiles of
every future step at once.

Dimensions: ``b`` batch, ``L`` history length, ``h`` horizon, ``q`` quantiles, ``D`` d_model, ``m`` period.

The history is normalised per row (``norm="last"``: its last value subtracted, divided by its standard
deviation; ``norm="mean"``: its mean subtracted, divided by its standard deviation, the instance
normalisation of RevIN; ``norm="scale"``: only divided by its mean absolute value, DeepAR's scaling, which
keeps zero where it is for series with a floor at 0), so one model serves every level of a series, and the
forecast is mapped back by the inverse of the same affine map; each step enters as ``Linear(1, D)`` of the normalised value
plus an embedding of its position in the season (step index mod m; none when m = 1). Causal S4D, Mamba or
Mamba-2 blocks (each with a SwiGLU MLP) read the row; the last position's output, normalised, goes through
``Linear(D, h·q)``; sorting along the quantile axis keeps the quantiles in order, and the result is mapped
back to the series' scale. Trained with the pinball (quantile) loss in the normalised units; the median
is the point forecast. With ``seasonal_skip`` the head's output is added to the seasonal naive forecast
of the normalised history, so the network learns the correction to that baseline.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ssmkit.layers import S4D, Mamba, Mamba2, RMSNorm
from ssmkit.layers.block import Block
from ssmkit.layers.mlp import MLP

MIXERS = ("s4d", "mamba", "mamba2")
NORMS = ("last", "mean", "scale")


@dataclasses.dataclass
class ForecasterConfig:
    """mixer: one of :data:`MIXERS`; horizon: h; quantiles: increasing levels in (0, 1) (0.5 among them);
    period: m (1 = no season embedding); d_model, n_layer, d_state; ff_width: MLP width per block;
    seasonal_skip: the head predicts the deviation from the seasonal naive forecast (the last observed value of
    the same season) instead of the forecast itself (no change for m = 1, where that is the last value);
    norm: how each history is normalised, one of :data:`NORMS` (see the module docstring);
    zero_head: the head starts at zero, so that the untrained model forecasts the location (or, with
    seasonal_skip, the seasonal naive forecast) and training learns the departure from it;
    season_embedding: embed each step's position in the season (when period > 1); off for a quasi-periodic
    series (a cycle of varying length, as the sunspots'), where a fixed position in an 11-step season is no
    feature of the cycle and only lets a small training set be memorised."""

    mixer: str = "s4d"
    horizon: int = 12
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    period: int = 1
    d_model: int = 32
    n_layer: int = 2
    d_state: int = 16
    ff_width: int = 64
    seasonal_skip: bool = False
    norm: str = "last"
    zero_head: bool = False
    season_embedding: bool = True

    def __post_init__(self) -> None:
        if self.mixer not in MIXERS:
            raise ValueError(f"ForecasterConfig.mixer must be one of {', '.join(MIXERS)}, got {self.mixer!r}")
        if self.norm not in NORMS:
            raise ValueError(f"ForecasterConfig.norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        for name in ("horizon", "period", "d_model", "n_layer", "d_state"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ForecasterConfig.{name} must be a positive int, got {value!r}")
        self.quantiles = tuple(float(q) for q in self.quantiles)
        if 0.5 not in self.quantiles or list(self.quantiles) != sorted(set(self.quantiles)) or not all(
                0 < q < 1 for q in self.quantiles):
            raise ValueError(f"quantiles must be increasing levels in (0, 1) including 0.5, got {self.quantiles}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "quantiles": list(self.quantiles)}


def _mixer(config: ForecasterConfig) -> nn.Module:
    if config.mixer == "s4d":
        return S4D(config.d_model, d_state=config.d_state)
    if config.mixer == "mamba":
        return Mamba(config.d_model, d_state=config.d_state)
    return Mamba2(config.d_model, d_state=config.d_state, headdim=16, chunk_size=64)


def pinball_loss(pred: torch.Tensor, target: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """Mean quantile loss: pred (..., h, q), target (..., h), quantiles (q,):
    ``max(τ e, (τ - 1) e)`` with ``e = target - pred``, averaged over everything."""
    e = target[..., None] - pred
    return torch.maximum(quantiles * e, (quantiles - 1) * e).mean()


class SSMForecaster(nn.Module):
    """History (b, L) -> quantile forecasts (b, h, q) in the series' units (see the module docstring).

    ``forward(history, phase=None)``: ``phase`` (b,) int64 is the position in the season of the history's
    first step (needed when ``period`` > 1). :meth:`loss` gives the pinball loss against targets (b, h)
    in the normalised units of each row.

    Example::

        model = SSMForecaster(ForecasterConfig(mixer="s4d", horizon=12, period=12))
        q = model(torch.randn(8, 48).cumsum(1), phase=torch.zeros(8, dtype=torch.int64))   # (8, 12, 3)
    """

    def __init__(self, config: ForecasterConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.encoder = nn.Linear(1, d)
        self.season = nn.Embedding(config.period, d) if config.period > 1 and config.season_embedding else None
        self.layers = nn.ModuleList(Block(d, _mixer(config), ff=MLP(d, config.ff_width) if config.ff_width else None)
                                    for _ in range(config.n_layer))
        self.norm_f = RMSNorm(d)
        self.head = nn.Linear(d, config.horizon * len(config.quantiles))
        if config.zero_head:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.register_buffer("quantiles", torch.tensor(config.quantiles), persistent=False)

    def normalise(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) (b, 1) of each row: the last value (``norm="last"``) or the mean (``"mean"``) and the
        standard deviation, or 0 and the mean absolute value (``"scale"``); scales floored at 1e-3."""
        if self.config.norm == "scale":
            return torch.zeros_like(history[:, :1]), history.abs().mean(dim=1, keepdim=True).clamp(min=1e-3)
        loc = history.mean(dim=1, keepdim=True) if self.config.norm == "mean" else history[:, -1:]
        scale = history.std(dim=1, keepdim=True).clamp(min=1e-3) if history.shape[1] > 1 else torch.ones_like(loc)
        return loc, scale

    def _normalised_forecast(self, history: torch.Tensor, phase: torch.Tensor | None) -> torch.Tensor:
        if history.dim() != 2 or history.shape[1] < 1 or not history.is_floating_point():
            raise ValueError(f"history must be a float tensor (b, L) with L >= 1, got {tuple(history.shape)}")
        loc, scale = self.normalise(history)
        h = self.encoder(((history - loc) / scale)[..., None])
        if self.season is not None:
            if phase is None or phase.shape != history.shape[:1]:
                raise ValueError(f"period {self.config.period}: pass phase (b,), the season position of each "
                                 "history's first step")
            steps = (phase[:, None] + torch.arange(history.shape[1], device=history.device)) % self.config.period
            h = h + self.season(steps)
        for layer in self.layers:
            h = layer(h)
        out = self.head(self.norm_f(h[:, -1]).to(self.head.weight.dtype))
        out = out.view(-1, self.config.horizon, len(self.config.quantiles))
        if self.config.seasonal_skip:
            out = out + self._seasonal_naive((history - loc) / scale)[..., None]
        return out.sort(dim=-1).values

    def _seasonal_naive(self, normalised: torch.Tensor) -> torch.Tensor:
        """(b, h): step j of the forecast repeats position ``L - (m·(j // m + 1) - j)`` of the history."""
        m, length = self.config.period, normalised.shape[1]
        if length < m:
            raise ValueError(f"seasonal_skip needs a history of at least one period ({m}), got {length}")
        j = torch.arange(self.config.horizon, device=normalised.device)
        return normalised[:, length - (m * (j // m + 1) - j)]

    def forward(self, history: torch.Tensor, phase: torch.Tensor | None = None) -> torch.Tensor:
        loc, scale = self.normalise(history)
        return loc[..., None] + scale[..., None] * self._normalised_forecast(history, phase)

    def loss(self, history: torch.Tensor, target: torch.Tensor, phase: torch.Tensor | None = None) -> torch.Tensor:
        """Pinball loss of the forecasts of target (b, h), in units of each history's scale."""
        loc, scale = self.normalise(history)
        return pinball_loss(self._normalised_forecast(history, phase), (target - loc) / scale, self.quantiles)

    def median_index(self) -> int:
        return self.config.quantiles.index(0.5)
