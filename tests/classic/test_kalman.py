"""Kalman filter, smoother, forecasts and imputation against statsmodels on the Nile data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssmkit.classic import LinearGaussianSSM, forecast, impute, kalman_filter, rts_smoother
from ssmkit.testing import assert_close

sm = pytest.importorskip("statsmodels.api", reason="statsmodels is in the test extra")

F64 = torch.float64


@pytest.fixture(scope="module")
def nile():
    y = sm.datasets.nile.load_pandas().data["volume"].to_numpy()
    fitted = sm.tsa.UnobservedComponents(y, "local level").fit(disp=False)
    return y, fitted


def _model(fitted, **kw):
    obs_var, level_var = fitted.params  # statsmodels orders them sigma2.irregular, sigma2.level
    return LinearGaussianSSM.local_level(level_var, obs_var, **kw)


def _t(a):
    return torch.tensor(np.array(a), dtype=F64)


def test_filter_matches_statsmodels_local_level_approximate_diffuse(nile):
    """statsmodels' default: approximate diffuse (mean 0, variance 1e6) and loglikelihood_burn = 1."""
    y, fitted = nile
    assert fitted.model.loglikelihood_burn == 1
    result = kalman_filter(_t(y)[:, None], _model(fitted), burn=1)
    assert math.isclose(result.loglik.item(), fitted.llf, rel_tol=1e-12)
    assert_close(result.loglik_terms[1:], _t(fitted.llf_obs)[1:], name="llf_obs")
    assert_close(result.filtered_mean[:, 0], _t(fitted.filtered_state[0]), name="filtered state")
    assert_close(result.filtered_cov[:, 0, 0], _t(fitted.filtered_state_cov[0, 0]), name="filtered cov")
    assert_close(result.predicted_mean[:, 0], _t(fitted.predicted_state[0, :-1]), name="predicted state")
    assert_close(result.innovation[:, 0], _t(fitted.forecasts_error[0]), name="innovations")


def test_known_initialisation_matches_and_joseph_form_agrees(nile):
    y, fitted = nile
    model = sm.tsa.UnobservedComponents(y, "local level")
    model.ssm.initialize_known(np.array([1000.0]), np.array([[5000.0]]))
    expected = model.smooth(fitted.params)
    ours = _model(fitted, initial_mean=1000.0, initial_var=5000.0)
    result = kalman_filter(_t(y)[:, None], ours, burn=1)
    assert math.isclose(result.loglik.item(), expected.llf, rel_tol=1e-12)
    assert_close(result.filtered_mean[:, 0], _t(expected.filtered_state[0]), name="filtered state")
    plain = kalman_filter(_t(y)[:, None], ours, burn=1, joseph=False)
    assert_close(plain.filtered_cov, result.filtered_cov, name="Joseph vs standard covariance")
    assert torch.equal(result.filtered_cov, result.filtered_cov.transpose(-1, -2))


def test_smoother_and_forecast_match_statsmodels(nile):
    y, fitted = nile
    model = _model(fitted)
    result = kalman_filter(_t(y)[:, None], model, burn=1)
    smoothed = rts_smoother(model, result)
    assert_close(smoothed.smoothed_mean[:, 0], _t(fitted.smoothed_state[0]), name="smoothed state")
    assert_close(smoothed.smoothed_cov[:, 0, 0], _t(fitted.smoothed_state_cov[0, 0]), name="smoothed cov")
    mean, cov = forecast(model, result, 10)
    expected = fitted.get_forecast(10)
    assert_close(mean[:, 0], _t(expected.predicted_mean), name="forecast mean")
    assert_close(cov[:, 0, 0], _t(expected.var_pred_mean), name="forecast variance")


def test_missing_values_and_imputation(nile):
    y, fitted = nile
    gaps = [0, 3, 20, 21, 22, 60, 99]
    y_missing = y.copy()
    y_missing[gaps] = np.nan
    expected = sm.tsa.UnobservedComponents(y_missing, "local level").smooth(fitted.params)
    model = _model(fitted)
    result = kalman_filter(_t(y_missing)[:, None], model, burn=1)
    assert math.isclose(result.loglik.item(), expected.llf, rel_tol=1e-12)
    assert_close(result.filtered_mean[:, 0], _t(expected.filtered_state[0]), name="filtered with gaps")
    assert bool((result.loglik_terms[gaps] == 0).all())
    filled, var = impute(_t(y_missing)[:, None], model)
    assert_close(filled[gaps, 0], _t(expected.smoothed_state[0, gaps]), name="imputed values")
    keep = [t for t in range(100) if t not in gaps]
    assert torch.equal(filled[keep, 0], _t(y[keep])) and bool((var[keep] == 0).all())
    assert_close(var[gaps, 0], _t(expected.smoothed_state_cov[0, 0, gaps]) + fitted.params[0], name="variance")


def test_batched_multivariate_partially_missing_equals_one_series_at_a_time():
    torch.manual_seed(0)
    k, m, T = 3, 2, 25
    F = torch.eye(k, dtype=F64) * 0.9 + 0.05 * torch.randn(k, k, dtype=F64)
    L = torch.randn(k, k, dtype=F64) * 0.3
    model = LinearGaussianSSM(F=F, H=torch.randn(m, k, dtype=F64), Q=L @ L.T + 0.1 * torch.eye(k, dtype=F64),
                              R=torch.tensor([[0.5, 0.1], [0.1, 0.3]], dtype=F64),
                              initial_mean=torch.zeros(k, dtype=F64), initial_cov=torch.eye(k, dtype=F64))
    y = torch.randn(2, T, m, dtype=F64)
    y[0, 5, 1] = y[1, 7, :] = y[1, 8, 0] = float("nan")
    batched = kalman_filter(y, model)
    for i in range(2):
        single = kalman_filter(y[i], model)
        assert_close(batched.filtered_mean[i], single.filtered_mean, name="filtered")
        assert_close(batched.loglik[i], single.loglik, name="loglik")
    # A partly observed step scores the observed component alone under the predicted state.
    x, P = batched.predicted_mean[0, 5], batched.predicted_cov[0, 5]
    h, r = model.H[0], model.R[0, 0]
    var = h @ P @ h + r
    expected = -0.5 * (math.log(2 * math.pi) + torch.log(var) + (y[0, 5, 0] - h @ x) ** 2 / var)
    assert_close(batched.loglik_terms[0, 5], expected, name="partly observed step")
    assert bool((batched.loglik_terms[1, 7] == 0).all())


def test_loglikelihood_is_differentiable_and_fits_the_nile_parameters(nile):
    y, fitted = nile
    log_vars = torch.log(torch.tensor([10000.0, 1000.0], dtype=F64)).requires_grad_()
    yt = _t(y)[:, None]
    opt = torch.optim.LBFGS([log_vars], lr=1, max_iter=15, line_search_fn="strong_wolfe")

    def loglik(log_vars):
        obs, level = torch.exp(log_vars)
        return kalman_filter(yt, LinearGaussianSSM.local_level(level, obs), burn=1).loglik

    def closure():
        opt.zero_grad()
        loss = -loglik(log_vars)
        loss.backward()
        return loss

    opt.step(closure)
    # The likelihood is flat near its maximum: check that ours is at least as high as statsmodels'
    # optimum and that the parameters agree to 1%.
    assert loglik(log_vars.detach()).item() >= fitted.llf - 1e-6
    assert_close(torch.exp(log_vars.detach()), _t(fitted.params), rtol=1e-2, atol=0, name="MLE (obs, level)")


def test_bad_inputs():
    model = LinearGaussianSSM.local_level(1.0, 1.0)
    with pytest.raises(ValueError, match=r"y must have shape \(\.\.\., T, m\) with m = 1"):
        kalman_filter(torch.zeros(5, 2, dtype=F64), model)
    with pytest.raises(TypeError, match="y must be a floating-point tensor"):
        kalman_filter(torch.zeros(5, 1, dtype=torch.long), model)
    with pytest.raises(ValueError, match="empty time dimension"):
        kalman_filter(torch.zeros(0, 1, dtype=F64), model)
    with pytest.raises(ValueError, match="burn must be an int"):
        kalman_filter(torch.zeros(5, 1, dtype=F64), model, burn=-1)
    with pytest.raises(ValueError, match=r"LinearGaussianSSM.Q must have shape \(1, 1\)"):
        LinearGaussianSSM(F=model.F, H=model.H, Q=torch.eye(2, dtype=F64), R=model.R,
                          initial_mean=model.initial_mean, initial_cov=model.initial_cov)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        forecast(model, kalman_filter(torch.zeros(5, 1, dtype=F64), model), 0)
