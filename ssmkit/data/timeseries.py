"""Real time series bundled with statsmodels, and rolling-origin splits that never show a model the future.

Nothing is downloaded: the series ship inside the statsmodels wheel.

| name | series | step | length | period m | horizon h |
|---|---|---|---|---|---|
| ``co2`` | Mauna Loa CO2 (ppm), weekly 1958-2001 averaged by month (missing weeks left out; months with none interpolated) | month | 526 | 12 | 12 |
| ``sunspots`` | yearly sunspot numbers 1700-2008 (the cycle is about 11 years, not exactly periodic) | year | 309 | 11 | 11 |
| ``gdp`` | US real GDP (billions of 2005 dollars, seasonally adjusted), macrodata 1959Q1-2009Q3 | quarter | 203 | 1 | 8 |
| ``elnino`` | monthly sea-surface temperature of the El Nino region 1950-2010 | month | 732 | 12 | 12 |

Rolling-origin evaluation: forecasts of ``y[o:o + h]`` from ``y[:o]`` at origins ``o_1 < ... < o_k`` spaced
``stride`` apart, the last one ``len(y) - h``. Everything that is fitted (model weights, ARIMA and ETS
parameters, Kalman variances) sees ``y[:o_1]`` only, and :func:`training_windows` cuts its (input, target)
pairs from that part.

    series = load_series("co2")
    origins = rolling_origins(len(series.values), series.horizon, n_origins=12, stride=12)
    x, y = training_windows(series.values, context=48, horizon=12, end=origins[0])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SERIES = ("co2", "sunspots", "gdp", "elnino")


@dataclass
class Series:
    """values (n,) float64; ``period`` m (1 = not seasonal); ``horizon`` h; ``start`` the first step's label
    (a year, fractional for months and quarters) and ``step`` the years between steps, for plots."""

    name: str
    values: np.ndarray
    period: int
    horizon: int
    start: float
    step: float
    unit: str
    source: str

    def time_axis(self) -> np.ndarray:
        """(n,) the calendar year of each step (fractional within the year)."""
        return self.start + self.step * np.arange(len(self.values))


def load_series(name: str) -> Series:
    """The bundled series ``name`` (one of :data:`SERIES`); ImportError names the package when statsmodels is
    missing, ValueError an unknown name."""
    if name not in SERIES:
        raise ValueError(f"unknown series {name!r}; available: {', '.join(SERIES)}")
    try:
        import statsmodels.api as sm
    except ImportError as e:
        raise ImportError("the forecasting series ship with statsmodels: pip install statsmodels "
                          "(or 'ssmkit[evals]')") from e
    if name == "co2":
        weekly = sm.datasets.co2.load_pandas().data["co2"]
        # The five months without any weekly reading (1958-06, 1958-10, 1964-02..04) are interpolated linearly.
        monthly = weekly.resample("MS").mean().interpolate()
        first = monthly.index[0]
        return Series(name, monthly.to_numpy(np.float64), 12, 12, first.year + (first.month - 1) / 12, 1 / 12,
                      "ppm", "Mauna Loa CO2, weekly 1958-2001, monthly means (statsmodels co2)")
    if name == "sunspots":
        data = sm.datasets.sunspots.load_pandas().data
        return Series(name, data["SUNACTIVITY"].to_numpy(np.float64), 11, 11, float(data["YEAR"].iloc[0]), 1.0,
                      "sunspot number", "yearly sunspot numbers 1700-2008 (statsmodels sunspots)")
    if name == "gdp":
        data = sm.datasets.macrodata.load_pandas().data
        start = float(data["year"].iloc[0]) + (float(data["quarter"].iloc[0]) - 1) / 4
        return Series(name, data["realgdp"].to_numpy(np.float64), 1, 8, start, 0.25, "billion 2005 USD",
                      "US real GDP, quarterly, seasonally adjusted, 1959-2009 (statsmodels macrodata)")
    data = sm.datasets.elnino.load_pandas().data
    values = data.drop(columns="YEAR").to_numpy(np.float64).reshape(-1)
    return Series(name, values, 12, 12, float(data["YEAR"].iloc[0]), 1 / 12, "deg C",
                  "El Nino region sea-surface temperature, monthly 1950-2010 (statsmodels elnino)")


def rolling_origins(n: int, horizon: int, n_origins: int, stride: int) -> list[int]:
    """Origins o_1 < ... < o_k (k = ``n_origins``), ``stride`` apart, the last ``n - horizon``: the forecast
    from origin o covers ``y[o:o + horizon]``. Raises ValueError unless every origin is >= 1."""
    for name, value in (("horizon", horizon), ("n_origins", n_origins), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    last = n - horizon
    first = last - stride * (n_origins - 1)
    if first < 1:
        raise ValueError(f"{n_origins} origins {stride} apart with horizon {horizon} need more than {n} steps")
    return [first + stride * i for i in range(n_origins)]


def training_windows(values: np.ndarray, context: int, horizon: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (input, target) pair of ``values[:end]``: inputs (k, context) = ``values[s:s + context]``,
    targets (k, horizon) = the next ``horizon`` values, for each start s with ``s + context + horizon <= end``
    (so no target reaches index ``end`` or later). Raises ValueError when there is none."""
    if context < 1 or horizon < 1:
        raise ValueError(f"context and horizon must be >= 1, got {context} and {horizon}")
    count = end - context - horizon + 1
    if count < 1 or end > len(values):
        raise ValueError(f"no window of {context} + {horizon} steps fits in the first {end} of {len(values)} values")
    starts = np.arange(count)[:, None]
    inputs = values[starts + np.arange(context)]
    targets = values[starts + context + np.arange(horizon)]
    return inputs, targets
