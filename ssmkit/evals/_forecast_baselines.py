"""Forecast metrics and the classical forecasters of ``ssmkit eval forecasting``: naive and seasonal naive,
statsmodels' ARIMA (order chosen by AIC) and ETS, and ssmkit's structural Kalman-filter model.

Dimensions: ``k`` origins, ``h`` horizon. Every classical model here is fitted once on ``y[:origins[0]]``
and then conditions on ``y[:o]`` at each origin with its parameters fixed (statsmodels' ``apply``,
the Kalman filter run on): the same information the SSM forecasters get.

Private to :mod:`ssmkit.evals` (its name starts with ``_`` so :func:`ssmkit.evals.discover` skips it).
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import numpy as np
import torch

from ssmkit.classic.structural import StructuralSpec, fit, rolling_forecasts

Forecast = dict[str, Any]  # point (k, h), lower / upper (k, h) of the 80% interval or None, plus details


def mase_scale(history: np.ndarray, period: int) -> float:
    """Mean absolute seasonal difference ``mean |y_t - y_(t-m)|`` of the in-sample history (Hyndman & Koehler
    2006; m = 1 is the naive one-step error). Raises ValueError when the history is too short or flat."""
    if len(history) <= period:
        raise ValueError(f"MASE needs more than {period} in-sample values, got {len(history)}")
    scale = float(np.mean(np.abs(history[period:] - history[:-period])))
    if not scale > 0:
        raise ValueError("MASE is undefined for a history whose seasonal differences are all 0")
    return scale


def mase(actual: np.ndarray, forecast: np.ndarray, values: np.ndarray, origins: list[int], period: int) -> float:
    """Mean over origins and steps of ``|actual - forecast| / scale(y[:origin])``; actual, forecast (k, h)."""
    scales = np.array([mase_scale(values[:o], period) for o in origins])
    return float(np.mean(np.abs(actual - forecast) / scales[:, None]))


def smape(actual: np.ndarray, forecast: np.ndarray) -> float:
    """Symmetric MAPE in percent: mean of ``200 |a - f| / (|a| + |f|)``, a term being 0 where a = f = 0."""
    denominator = np.abs(actual) + np.abs(forecast)
    terms = np.divide(200 * np.abs(actual - forecast), denominator, out=np.zeros_like(denominator),
                      where=denominator > 0)
    return float(np.mean(terms))


def coverage(actual: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> float:
    """Share of actual values inside [lower, upper]."""
    return float(np.mean((actual >= lower) & (actual <= upper)))


def seasonal_naive(values: np.ndarray, origins: list[int], horizon: int, period: int) -> Forecast:
    """``ŷ_(o+j) = y_(o+j-m·ceil((j+1)/m))``, j = 0..h-1: the last observed value of the same season
    (m = 1: the last value)."""
    j = np.arange(horizon)
    lags = period * ((j // period) + 1) - j
    return {"point": np.stack([values[o - lags] for o in origins]), "lower": None, "upper": None}


def _statsmodels() -> Any:
    try:
        import statsmodels.tsa.arima.model as arima
        import statsmodels.tsa.statespace.exponential_smoothing as ets
    except ImportError as e:
        raise ImportError("the ARIMA and ETS baselines are statsmodels': pip install statsmodels "
                          "(or 'ssmkit[evals]')") from e
    return arima, ets


def _rolling(result: Any, values: np.ndarray, origins: list[int], horizon: int) -> Forecast:
    points, lowers, uppers = [], [], []
    for o in origins:
        forecast = result.apply(values[:o]).get_forecast(horizon)
        interval = np.asarray(forecast.conf_int(alpha=0.2))
        points.append(np.asarray(forecast.predicted_mean))
        lowers.append(interval[:, 0])
        uppers.append(interval[:, 1])
    return {"point": np.stack(points), "lower": np.stack(lowers), "upper": np.stack(uppers)}


def arima(values: np.ndarray, origins: list[int], horizon: int, *, d: int, seasonal: tuple[int, int, int] | None,
          period: int, trend: str, max_p: int, max_q: int) -> Forecast:
    """ARIMA(p, d, q)(P, D, Q)_m with (p, q) in [0, max_p] x [0, max_q] chosen by AIC on ``y[:origins[0]]``;
    d, the seasonal part and the trend term are given (see the task's dataset table)."""
    arima_model, _ = _statsmodels()
    train = values[:origins[0]]
    seasonal_order = (*seasonal, period) if seasonal else (0, 0, 0, 0)
    best = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter of poorly fitting candidate orders
        for p, q in itertools.product(range(max_p + 1), range(max_q + 1)):
            try:
                fitted = arima_model.ARIMA(train, order=(p, d, q), seasonal_order=seasonal_order, trend=trend).fit()
            except (ValueError, np.linalg.LinAlgError):
                continue
            if np.isfinite(fitted.aic) and (best is None or fitted.aic < best[0]):
                best = (fitted.aic, (p, d, q), fitted)
        if best is None:
            raise RuntimeError("no ARIMA order could be fitted")
        out = _rolling(best[2], values, origins, horizon)
    out["details"] = {"order": list(best[1]), "seasonal_order": list(seasonal_order), "trend": trend,
                      "aic": float(best[0])}
    return out


def ets(values: np.ndarray, origins: list[int], horizon: int, *, trend: bool, damped: bool, period: int) -> Forecast:
    """statsmodels' state-space ExponentialSmoothing (additive errors; additive, optionally damped trend;
    additive seasonal of period m when m > 1)."""
    _, ets_model = _statsmodels()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = ets_model.ExponentialSmoothing(values[:origins[0]], trend=trend, damped_trend=trend and damped,
                                                seasonal=period if period > 1 else None).fit(disp=False)
        out = _rolling(fitted, values, origins, horizon)
    out["details"] = {"trend": trend, "damped": trend and damped, "seasonal": period if period > 1 else None}
    return out


def kalman(values: np.ndarray, origins: list[int], horizon: int, spec: StructuralSpec, iterations: int) -> Forecast:
    """ssmkit's structural model (:mod:`ssmkit.classic.structural`), maximum likelihood on ``y[:origins[0]]``;
    80% interval from the predictive variance (±1.2816 σ)."""
    y = torch.tensor(values, dtype=torch.float64)
    fitted = fit(y[:origins[0]], spec, iterations=iterations)
    mean, std = rolling_forecasts(fitted, y, origins, horizon)
    mean, std = mean.numpy(), std.numpy()
    return {"point": mean, "lower": mean - 1.2816 * std, "upper": mean + 1.2816 * std,
            "details": {"trend": spec.trend, "period": spec.period, "cycle_period": spec.cycle_period,
                        "params": fitted.params, "nll_per_step": fitted.nll}}
