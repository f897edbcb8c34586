"""Classical linear-Gaussian state space models: the Kalman filter and its relatives.

The deep SSMs of :mod:`ssmkit.layers` descend from this model; here it is used as it is in time
series work: filtering, smoothing, forecasting, imputing missing values, and likelihood-based
fitting (every function is differentiable).
"""

from ssmkit.classic.kalman import (
    FilterResult,
    LinearGaussianSSM,
    SmootherResult,
    forecast,
    impute,
    kalman_filter,
    rts_smoother,
)

__all__ = [
    "FilterResult",
    "LinearGaussianSSM",
    "SmootherResult",
    "forecast",
    "impute",
    "kalman_filter",
    "rts_smoother",
]
