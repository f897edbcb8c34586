"""Rolling-origin splits and training windows never reach the future; the bundled series load."""

from __future__ import annotations

import numpy as np
import pytest

from ssmkit.data.timeseries import (
    SERIES,
    load_series,
    rolling_origins,
    training_windows,
)


def test_rolling_origins():
    assert rolling_origins(100, 10, 4, 5) == [75, 80, 85, 90]
    assert rolling_origins(20, 1, 1, 3) == [19]
    with pytest.raises(ValueError, match="need more"):
        rolling_origins(30, 10, 5, 5)
    with pytest.raises(ValueError):
        rolling_origins(100, 0, 4, 5)


@pytest.mark.parametrize("context,horizon,end", [(5, 3, 40), (1, 1, 2), (12, 12, 100)])
def test_training_windows_stop_before_the_end(context, horizon, end):
    values = np.arange(200.0)  # each value is its own index
    inputs, targets = training_windows(values, context, horizon, end)
    assert inputs.shape == (end - context - horizon + 1, context) and targets.shape == (len(inputs), horizon)
    assert targets.max() == end - 1  # the last target is the value just before `end`, never later
    assert (targets[:, 0] == inputs[:, -1] + 1).all()  # targets follow their inputs directly
    assert inputs.min() == 0


def test_training_windows_errors():
    with pytest.raises(ValueError, match="no window"):
        training_windows(np.arange(10.0), 8, 3, 10)


@pytest.mark.parametrize("name", SERIES)
def test_bundled_series(name):
    pytest.importorskip("statsmodels", reason="the series ship with statsmodels")
    series = load_series(name)
    expected = {"co2": 526, "sunspots": 309, "gdp": 203, "elnino": 732}[name]
    assert series.values.shape == (expected,) and np.isfinite(series.values).all()
    assert series.time_axis()[0] == series.start and series.horizon >= 1 and series.period >= 1
    with pytest.raises(ValueError):
        load_series("airline")
