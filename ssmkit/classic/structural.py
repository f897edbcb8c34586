"""Structural time-series models (Harvey's basic structural model) as :class:`LinearGaussianSSM`, fitted by
maximum likelihood through the differentiable Kalman filter, and their rolling-origin forecasts.

Components (Durbin & Koopman, section 3.2), stacked block-diagonally in the state:

- ``trend``: local linear trend, ``μ_(t+1) = μ_t + ν_t + ξ_t``, ``ν_(t+1) = ν_t + ζ_t`` (state 2), or a
  local level (``trend=False``: ``μ_(t+1) = μ_t + ξ_t``, state 1);
- ``period`` m > 1: dummy seasonal, ``γ_(t+1) = -(γ_t + ... + γ_(t-m+2)) + ω_t`` (state m - 1);
- ``cycle``: a damped stochastic cycle of period 2π/λ and damping ρ, ``ψ_(t+1) = ρ R(λ) ψ_t + κ_t``
  (state 2, both components with variance σ_κ²);

and ``y_t = μ_t + γ_t + ψ_t + ε_t``. Every variance is ``exp`` of a free parameter; ρ = sigmoid, λ = exp.
The first state is diffuse (variance 1e6, statsmodels' approximate diffuse initialisation) and the first
``state size`` steps are left out of the likelihood.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ssmkit.classic.kalman import LinearGaussianSSM, kalman_filter

_DIFFUSE = 1e6


@dataclass
class StructuralSpec:
    """Which components: ``trend`` (slope as well as level), ``period`` (1 = no seasonal), ``cycle_period``
    (the cycle's initial period in steps; None = no cycle)."""

    trend: bool = True
    period: int = 1
    cycle_period: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.period, bool) or not isinstance(self.period, int) or self.period < 1:
            raise ValueError(f"period must be an int >= 1, got {self.period!r}")
        if self.cycle_period is not None and not self.cycle_period > 2:
            raise ValueError(f"cycle_period must be > 2 steps, got {self.cycle_period}")

    def initial_params(self) -> dict[str, float]:
        """Free parameters at their starting values (log variances relative to a unit-variance series)."""
        params = {"log_obs": math.log(0.1), "log_level": math.log(0.01)}
        if self.trend:
            params["log_slope"] = math.log(1e-4)
        if self.period > 1:
            params["log_seasonal"] = math.log(1e-3)
        if self.cycle_period is not None:
            params.update(log_cycle=math.log(0.05), logit_damping=math.log(0.9 / 0.1),
                          log_frequency=math.log(2 * math.pi / self.cycle_period))
        return params


def build(spec: StructuralSpec, params: dict[str, torch.Tensor]) -> LinearGaussianSSM:
    """The :class:`LinearGaussianSSM` of ``spec`` at ``params`` (float64; gradients flow to ``params``)."""
    blocks_F, blocks_Q, obs = [], [], []
    if spec.trend:
        blocks_F.append(torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64))
        blocks_Q.append(torch.stack([params["log_level"], params["log_slope"]]).exp())
        obs += [1.0, 0.0]
    else:
        blocks_F.append(torch.ones(1, 1, dtype=torch.float64))
        blocks_Q.append(params["log_level"].exp()[None])
        obs += [1.0]
    if spec.period > 1:
        s = spec.period - 1
        F = torch.zeros(s, s, dtype=torch.float64)
        F[0] = -1.0
        F[1:, :-1] = torch.eye(s - 1, dtype=torch.float64)
        blocks_F.append(F)
        blocks_Q.append(torch.cat([params["log_seasonal"].exp()[None], torch.zeros(s - 1, dtype=torch.float64)]))
        obs += [1.0] + [0.0] * (s - 1)
    if spec.cycle_period is not None:
        rho, lam = torch.sigmoid(params["logit_damping"]), params["log_frequency"].exp()
        c, sn = torch.cos(lam), torch.sin(lam)
        blocks_F.append(rho * torch.stack([torch.stack([c, sn]), torch.stack([-sn, c])]))
        blocks_Q.append(params["log_cycle"].exp().repeat(2))
        obs += [1.0, 0.0]
    F = torch.block_diag(*blocks_F)
    k = F.shape[0]
    return LinearGaussianSSM(F=F, H=torch.tensor([obs], dtype=torch.float64), Q=torch.diag(torch.cat(blocks_Q)),
                             R=params["log_obs"].exp().reshape(1, 1), initial_mean=torch.zeros(k, dtype=torch.float64),
                             initial_cov=torch.eye(k, dtype=torch.float64) * _DIFFUSE)


@dataclass
class FittedStructural:
    """A fitted model: ``spec``, ``params`` (floats), the series' ``shift`` and ``scale`` (the model runs on
    ``(y - shift) / scale``) and the final negative log-likelihood per step."""

    spec: StructuralSpec
    params: dict[str, float]
    shift: float
    scale: float
    nll: float

    def model(self) -> LinearGaussianSSM:
        return build(self.spec, {k: torch.tensor(v, dtype=torch.float64) for k, v in self.params.items()})


def fit(y: torch.Tensor, spec: StructuralSpec, *, iterations: int = 60) -> FittedStructural:
    """Maximum likelihood on y (T,) with L-BFGS (strong Wolfe line search) from :meth:`StructuralSpec.initial_params`."""
    y = torch.as_tensor(y, dtype=torch.float64)
    if y.dim() != 1 or len(y) < 3 or not torch.isfinite(y).all():
        raise ValueError(f"fit needs a finite 1-D series of at least 3 values, got shape {tuple(y.shape)}")
    shift, scale = float(y.mean()), float(y.std()) or 1.0
    z = ((y - shift) / scale)[:, None]
    params = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in spec.initial_params().items()}
    burn = build(spec, params).state_size
    optimizer = torch.optim.LBFGS(list(params.values()), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = -kalman_filter(z, build(spec, params), burn=burn).loglik / (len(z) - burn)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        nll = float(-kalman_filter(z, build(spec, params), burn=burn).loglik / (len(z) - burn))
    return FittedStructural(spec, {k: float(v.detach()) for k, v in params.items()}, shift, scale, nll)


def rolling_forecasts(fitted: FittedStructural, y: torch.Tensor, origins: list[int],
                      horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (len(origins), horizon) of ``y[o:o + horizon]`` given ``y[:o]``, for every
    origin in one batched filter: row i sees y with every value from ``origins[i]`` on set to NaN (missing),
    so its one-step predictions there are the multi-step forecasts."""
    y = torch.as_tensor(y, dtype=torch.float64)
    end = max(origins) + horizon
    z = ((y[:end] - fitted.shift) / fitted.scale).repeat(len(origins), 1)
    for i, o in enumerate(origins):
        z[i, o:] = float("nan")
    model = fitted.model()
    with torch.no_grad():
        result = kalman_filter(z[..., None], model)
    H, R = model.H, model.R
    mean = (result.predicted_mean @ H.T)[..., 0]
    var = (H @ result.predicted_cov @ H.T + R)[..., 0, 0]
    rows = torch.arange(len(origins))[:, None]
    cols = torch.tensor(origins)[:, None] + torch.arange(horizon)
    return mean[rows, cols] * fitted.scale + fitted.shift, var[rows, cols].sqrt() * fitted.scale
