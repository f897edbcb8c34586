"""Forecast metrics against hand computations, the naive forecasts, and no model seeing past its origin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssmkit.classic.structural import StructuralSpec
from ssmkit.data.timeseries import rolling_origins
from ssmkit.evals import _forecast_baselines as classic
from ssmkit.evals.forecasting import ssm_forecast

SETTINGS = {"d_model": 8, "n_layer": 1, "d_state": 4, "steps": 12, "batch_size": 8, "lr": 3e-3,
            "weight_decay": 0.01, "val_fraction": 0.15, "seed": 0}


def test_metrics_by_hand():
    history = np.array([1.0, 2.0, 4.0, 3.0, 5.0])
    assert classic.mase_scale(history, 1) == pytest.approx((1 + 2 + 1 + 2) / 4)
    assert classic.mase_scale(history, 2) == pytest.approx((3 + 1 + 1) / 3)
    values = np.concatenate([history, [6.0, 4.0]])
    # One origin at 5, forecasts 5 and 5 for actual 6 and 4: errors 1 and 1, scale 1.5.
    assert classic.mase(np.array([[6.0, 4.0]]), np.array([[5.0, 5.0]]), values, [5], 1) == pytest.approx(1 / 1.5)
    # sMAPE: 200 |a - f| / (|a| + |f|): 200/11 and 200/9, and 0 for a = f = 0.
    assert classic.smape(np.array([[6.0, 4.0, 0.0]]), np.array([[5.0, 5.0, 0.0]])) == pytest.approx(
        (200 / 11 + 200 / 9) / 3)
    assert classic.coverage(np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.5, 2.0]), np.array([2.0, 3.0, 3.0])) == \
        pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="all 0"):
        classic.mase_scale(np.ones(5), 1)


def test_seasonal_naive_repeats_the_last_season():
    values = np.arange(30.0)
    out = classic.seasonal_naive(values, [20, 24], 5, 4)["point"]
    assert out.tolist() == [[16, 17, 18, 19, 16], [20, 21, 22, 23, 20]]
    assert classic.seasonal_naive(values, [20], 3, 1)["point"].tolist() == [[19, 19, 19]]


def _series(n=132, period=12):
    t = np.arange(n)
    rng = np.random.default_rng(0)
    return 10 + 0.05 * t + 2 * np.sin(2 * np.pi * t / period) + 0.3 * rng.standard_normal(n)


def _forecasters():
    yield "ssm", lambda v, o: ssm_forecast("s4d", v, o, 6, 12, 24, SETTINGS, torch.device("cpu"))
    yield "kalman", lambda v, o: classic.kalman(v, o, 6, StructuralSpec(trend=True, period=12), iterations=3)
    if _has_statsmodels():
        yield "arima", lambda v, o: classic.arima(v, o, 6, d=1, seasonal=None, period=12, trend="n", max_p=1,
                                                  max_q=0)
        yield "ets", lambda v, o: classic.ets(v, o, 6, trend=True, damped=False, period=12)


def _has_statsmodels():
    try:
        import statsmodels  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("name,forecaster", list(_forecasters()), ids=[n for n, _ in _forecasters()])
def test_no_forecast_depends_on_values_from_its_origin_on(name, forecaster):
    values = _series()
    origins = rolling_origins(len(values), 6, 4, 6)
    clean = forecaster(values, origins)
    corrupted_from = origins[2]
    spoiled = values.copy()
    spoiled[corrupted_from:] = 1e6  # everything from the third origin on
    dirty = forecaster(spoiled, origins)
    # Origins 0-2 see only values before their origin: unchanged. Origin 3 sees the spoiled values: changed.
    np.testing.assert_allclose(dirty["point"][:3], clean["point"][:3], rtol=1e-6, atol=1e-6)
    assert not np.allclose(dirty["point"][3], clean["point"][3])
    assert clean["point"].shape == (4, 6) and np.isfinite(clean["point"]).all()
    if clean["lower"] is not None:
        assert (clean["lower"] <= clean["point"] + 1e-9).all() and (clean["point"] <= clean["upper"] + 1e-9).all()


def _mase(values, origins, horizon, period, forecast):
    actual = np.stack([values[o:o + horizon] for o in origins])
    return classic.mase(actual, forecast["point"], values, origins, period)


@pytest.mark.parametrize("options", [{}, {"norm": "scale", "transform": "sqrt", "ensemble": 2}],
                         ids=["defaults", "scale-sqrt-ensemble"])
def test_a_short_training_run_beats_the_naive_forecast_on_a_seasonal_series(options):
    values = _series(n=240) + 5.0  # positive, so that sqrt applies
    origins = rolling_origins(len(values), 6, 6, 6)
    settings = {**SETTINGS, "d_model": 16, "steps": 150, "batch_size": 16, **options}
    ssm = _mase(values, origins, 6, 12, ssm_forecast("s4d", values, origins, 6, 12, 24, settings, torch.device("cpu")))
    naive = _mase(values, origins, 6, 12, classic.seasonal_naive(values, origins, 6, 1))
    assert ssm < 0.7 * naive, (ssm, naive)


def test_ensemble_and_sqrt_transform():
    values = _series() + 5.0
    origins = rolling_origins(len(values), 6, 3, 6)
    run = lambda **o: ssm_forecast("s4d", values, origins, 6, 12, 24, {**SETTINGS, **o}, torch.device("cpu"))
    one, two = run(), run(ensemble=2)
    assert one["details"]["members"] == 1 and two["details"]["members"] == 2
    # The ensemble's first member is the single model (same seed): the average moves away from it.
    assert not np.allclose(one["point"], two["point"])
    assert (two["lower"] <= two["point"]).all() and (two["point"] <= two["upper"]).all()
    squared = run(transform="sqrt")
    assert squared["details"]["transform"] == "sqrt" and (squared["lower"] >= 0).all()
    with pytest.raises(ValueError, match="negative"):
        ssm_forecast("s4d", values - 100, origins, 6, 12, 24, {**SETTINGS, "transform": "sqrt"}, torch.device("cpu"))
