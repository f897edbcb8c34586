"""Structural models: the matrices of each component, batched rolling forecasts equal to filtering each
history alone, and a fit that finds the variances of a simulated local level."""

from __future__ import annotations

import math

import pytest
import torch

from ssmkit.classic import forecast, kalman_filter
from ssmkit.classic.structural import StructuralSpec, build, fit, rolling_forecasts


def _params(spec):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in spec.initial_params().items()}


def test_component_matrices():
    spec = StructuralSpec(trend=True, period=4, cycle_period=8.0)
    model = build(spec, _params(spec))
    assert model.state_size == 2 + 3 + 2
    assert model.H.tolist() == [[1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]]
    assert model.F[2:5, 2:5].tolist() == [[-1.0, -1.0, -1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    cycle = model.F[5:, 5:]
    rho = 0.9
    lam = 2 * math.pi / 8
    expected = rho * torch.tensor([[math.cos(lam), math.sin(lam)], [-math.sin(lam), math.cos(lam)]],
                                  dtype=torch.float64)
    assert torch.allclose(cycle, expected)
    # A dummy seasonal of period m sums to zero over any m consecutive steps (without noise).
    state = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    seasons = [state[0].item()]
    for _ in range(7):
        state = model.F[2:5, 2:5] @ state
        seasons.append(state[0].item())
    assert sum(seasons[:4]) == pytest.approx(0.0, abs=1e-12) and sum(seasons[3:7]) == pytest.approx(0.0, abs=1e-12)


def test_rolling_forecasts_match_filtering_each_history():
    torch.manual_seed(0)
    y = torch.randn(60, dtype=torch.float64).cumsum(0) + torch.sin(torch.arange(60.0) * math.pi / 2)
    spec = StructuralSpec(trend=True, period=4)
    fitted = fit(y[:40], spec, iterations=5)
    mean, std = rolling_forecasts(fitted, y, [40, 47, 52], 5)
    model = fitted.model()
    for i, o in enumerate([40, 47, 52]):
        z = ((y[:o] - fitted.shift) / fitted.scale)[:, None]
        m, cov = forecast(model, kalman_filter(z, model), 5)
        assert torch.allclose(mean[i], m[:, 0] * fitted.scale + fitted.shift, atol=1e-8)
        assert torch.allclose(std[i], cov[:, 0, 0].sqrt() * fitted.scale, atol=1e-8)


def test_fit_finds_the_variances_of_a_local_level():
    g = torch.Generator().manual_seed(0)
    level = (0.5 * torch.randn(250, generator=g, dtype=torch.float64)).cumsum(0)
    y = level + 1.0 * torch.randn(250, generator=g, dtype=torch.float64)
    fitted = fit(y, StructuralSpec(trend=False), iterations=25)
    scale2 = fitted.scale**2
    assert math.exp(fitted.params["log_level"]) * scale2 == pytest.approx(0.25, rel=0.5)
    assert math.exp(fitted.params["log_obs"]) * scale2 == pytest.approx(1.0, rel=0.3)


def test_spec_checks():
    with pytest.raises(ValueError):
        StructuralSpec(period=0)
    with pytest.raises(ValueError):
        StructuralSpec(cycle_period=1.5)
    with pytest.raises(ValueError, match="finite"):
        fit(torch.tensor([1.0, float("nan"), 2.0, 3.0]), StructuralSpec())
