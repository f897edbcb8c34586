"""Kalman filter, Rauch-Tung-Striebel smoother, forecasts and imputation for linear-Gaussian SSMs.

Dimensions: ``T`` time steps, ``k`` state size, ``m`` observation size, ``...`` optional batch of
independent series (the model is shared).

The model (Durbin & Koopman, "Time Series Analysis by State Space Methods", chapter 4)::

    x_1 ~ N(initial_mean, initial_cov)
    x_(t+1) = F x_t + w_t,   w_t ~ N(0, Q)
    y_t     = H x_t + v_t,   v_t ~ N(0, R)

``initial_mean``/``initial_cov`` describe the first state before its observation is seen (the
convention of statsmodels, so its ``initialize_known`` and ``initialize_approximate_diffuse`` map
directly). Missing observations are NaN: a step with no observed component skips the update, a
partly observed one updates with the observed components only. Everything is differentiable, so
the log-likelihood can be maximised with a torch optimiser.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch


@dataclasses.dataclass
class LinearGaussianSSM:
    """A time-invariant linear-Gaussian state space model (see the module docstring).

    F: (k, k) transition; H: (m, k) observation; Q: (k, k) and R: (m, m) noise covariances;
    initial_mean: (k,); initial_cov: (k, k).

    Example::

        model = LinearGaussianSSM.local_level(level_var=1469.1, obs_var=15099.0)
        result = kalman_filter(nile[:, None], model)
    """

    F: torch.Tensor
    H: torch.Tensor
    Q: torch.Tensor
    R: torch.Tensor
    initial_mean: torch.Tensor
    initial_cov: torch.Tensor

    def __post_init__(self) -> None:
        k = self.F.shape[-1] if self.F.dim() == 2 else -1
        m = self.H.shape[0] if self.H.dim() == 2 else -1
        expected = {"F": (k, k), "H": (m, k), "Q": (k, k), "R": (m, m), "initial_mean": (k,), "initial_cov": (k, k)}
        for name, shape in expected.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"LinearGaussianSSM.{name} must be a floating-point tensor, got {type(t).__name__}")
            if k < 1 or m < 1 or tuple(t.shape) != shape:
                raise ValueError(f"LinearGaussianSSM.{name} must have shape {shape} (F (k, k), H (m, k)), "
                                 f"got {tuple(t.shape)}")

    @property
    def state_size(self) -> int:
        return self.F.shape[0]

    @property
    def obs_size(self) -> int:
        return self.H.shape[0]

    @classmethod
    def local_level(cls, level_var: float | torch.Tensor, obs_var: float | torch.Tensor, *,
                    initial_mean: float = 0.0, initial_var: float = 1e6,
                    dtype: torch.dtype = torch.float64) -> LinearGaussianSSM:
        """The random walk plus noise ``y_t = μ_t + ε_t, μ_(t+1) = μ_t + η_t`` (k = m = 1).

        The defaults (mean 0, variance 1e6) are statsmodels' approximate diffuse initialisation of
        ``UnobservedComponents(y, "local level")``. Tensor variances keep their gradients.
        """
        one = torch.ones(1, 1, dtype=dtype)
        level = torch.as_tensor(level_var, dtype=dtype).reshape(1, 1)
        obs = torch.as_tensor(obs_var, dtype=dtype).reshape(1, 1)
        return cls(F=one, H=one.clone(), Q=level, R=obs, initial_mean=torch.full((1,), initial_mean, dtype=dtype),
                   initial_cov=one * initial_var)


class FilterResult(NamedTuple):
    """Output of :func:`kalman_filter`; ``t`` indexes the time axis (second to last, or last for loglik_terms).

    predicted_mean (..., T, k), predicted_cov (..., T, k, k): x_t given y_1..y_(t-1).
    filtered_mean (..., T, k), filtered_cov (..., T, k, k): x_t given y_1..y_t.
    innovation (..., T, m): y_t - H x_t|t-1 (0 where missing); innovation_cov (..., T, m, m).
    loglik_terms (..., T): log p(y_t | y_<t) of the observed components (0 when none is);
    loglik (...,): their sum from ``burn`` on.
    """

    predicted_mean: torch.Tensor
    predicted_cov: torch.Tensor
    filtered_mean: torch.Tensor
    filtered_cov: torch.Tensor
    innovation: torch.Tensor
    innovation_cov: torch.Tensor
    loglik_terms: torch.Tensor
    loglik: torch.Tensor


class SmootherResult(NamedTuple):
    """smoothed_mean (..., T, k), smoothed_cov (..., T, k, k): x_t given every observation."""

    smoothed_mean: torch.Tensor
    smoothed_cov: torch.Tensor


def _check_obs(y: object, model: LinearGaussianSSM) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        raise TypeError(f"y must be a floating-point tensor of shape (..., T, m), got {type(y).__name__}"
                        + (f" of {y.dtype}" if isinstance(y, torch.Tensor) else ""))
    if y.dim() < 2 or y.shape[-1] != model.obs_size:
        raise ValueError(f"y must have shape (..., T, m) with m = {model.obs_size} (rows of H), got {tuple(y.shape)}")
    if y.shape[-2] == 0:
        raise ValueError("y has an empty time dimension (T = 0)")
    return y


def _matrices(model: LinearGaussianSSM, dtype: torch.dtype, device: torch.device):
    return [getattr(model, f.name).to(dtype=dtype, device=device) for f in dataclasses.fields(model)]


def kalman_filter(y: torch.Tensor, model: LinearGaussianSSM, *, burn: int = 0, joseph: bool = True) -> FilterResult:
    """Run the Kalman filter over ``y`` (..., T, m); NaN entries are missing observations.

    Per step: ``e = y - H x⁻``, ``S = H P⁻ Hᵀ + R``, ``K = P⁻ Hᵀ S⁻¹``, ``x = x⁻ + K e``, and
    ``P = (I - K H) P⁻ (I - K H)ᵀ + K R Kᵀ`` (Joseph form, symmetric and positive semi-definite even
    with rounding; ``joseph=False`` uses ``(I - K H) P⁻``). Then ``x⁻ = F x``, ``P⁻ = F P Fᵀ + Q``.
    Missing components are removed from e, H and R for that step (an all-missing step only predicts).
    ``log p(y_t | y_<t) = -½ (m_t log 2π + log det S + eᵀ S⁻¹ e)`` over the m_t observed components;
    ``burn`` leaves the first steps out of ``loglik`` (statsmodels' ``loglikelihood_burn``: 1 for a
    local level model, whose first step is diffuse).

    Computed in y's dtype promoted with the model's (use float64 for diffuse initialisations).
    """
    _check_obs(y, model)
    if isinstance(burn, bool) or not isinstance(burn, int) or burn < 0:
        raise ValueError(f"burn must be an int >= 0, got {burn!r}")
    dtype = torch.promote_types(y.dtype, model.F.dtype)
    F, H, Q, R, x, P = _matrices(model, dtype, y.device)
    y = y.to(dtype)
    batch = y.shape[:-2]
    x, P = x.expand(*batch, -1), P.expand(*batch, -1, -1)
    eye_k = torch.eye(F.shape[0], dtype=dtype, device=y.device)
    out: dict[str, list[torch.Tensor]] = {f: [] for f in FilterResult._fields[:-1]}
    for t in range(y.shape[-2]):
        out["predicted_mean"].append(x)
        out["predicted_cov"].append(P)
        obs = ~torch.isnan(y[..., t, :])  # (..., m)
        o = obs.to(dtype)
        H_t = o[..., :, None] * H
        R_t = o[..., :, None] * R * o[..., None, :] + torch.diag_embed(1 - o)
        e = torch.where(obs, y[..., t, :], 0.0) - (H_t @ x[..., None])[..., 0]
        S = H_t @ P @ H_t.transpose(-1, -2) + R_t
        chol = torch.linalg.cholesky(S)
        gain = torch.cholesky_solve(H_t @ P, chol).transpose(-1, -2)  # P Hᵀ S⁻¹ (S, P symmetric)
        x = x + (gain @ e[..., None])[..., 0]
        if joseph:
            left = eye_k - gain @ H_t
            P = left @ P @ left.transpose(-1, -2) + gain @ R_t @ gain.transpose(-1, -2)
        else:
            P = (eye_k - gain @ H_t) @ P
        white = torch.linalg.solve_triangular(chol, e[..., None], upper=False)[..., 0]
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        out["loglik_terms"].append(-0.5 * (o.sum(-1) * math.log(2 * math.pi) + logdet + (white**2).sum(-1)))
        out["filtered_mean"].append(x)
        out["filtered_cov"].append(P)
        out["innovation"].append(e)
        out["innovation_cov"].append(torch.where(obs[..., :, None] & obs[..., None, :], S, 0.0))
        x = (F @ x[..., None])[..., 0]
        P = F @ P @ F.transpose(-1, -2) + Q
    stacked = {name: torch.stack(v, dim=-2 if name.endswith(("mean", "innovation")) else -3)
               for name, v in out.items() if name != "loglik_terms"}
    terms = torch.stack(out["loglik_terms"], dim=-1)
    return FilterResult(**stacked, loglik_terms=terms, loglik=terms[..., burn:].sum(-1))


def rts_smoother(model: LinearGaussianSSM, filtered: FilterResult) -> SmootherResult:
    """Rauch-Tung-Striebel smoother from a :func:`kalman_filter` result.

    ``G = P_t Fᵀ (P⁻_(t+1))⁻¹``, ``x^s_t = x_t + G (x^s_(t+1) - x⁻_(t+1))``,
    ``P^s_t = P_t + G (P^s_(t+1) - P⁻_(t+1)) Gᵀ``, backwards from the last filtered state.
    """
    dtype, device = filtered.filtered_mean.dtype, filtered.filtered_mean.device
    F = model.F.to(dtype=dtype, device=device)
    mean, cov = filtered.filtered_mean[..., -1, :], filtered.filtered_cov[..., -1, :, :]
    means, covs = [mean], [cov]
    for t in range(filtered.filtered_mean.shape[-2] - 2, -1, -1):
        P_t = filtered.filtered_cov[..., t, :, :]
        P_pred = filtered.predicted_cov[..., t + 1, :, :]
        G = torch.linalg.solve(P_pred, F @ P_t).transpose(-1, -2)
        gap = mean - filtered.predicted_mean[..., t + 1, :]
        mean = filtered.filtered_mean[..., t, :] + (G @ gap[..., None])[..., 0]
        cov = P_t + G @ (cov - P_pred) @ G.transpose(-1, -2)
        means.append(mean)
        covs.append(cov)
    return SmootherResult(torch.stack(means[::-1], dim=-2), torch.stack(covs[::-1], dim=-3))


def forecast(model: LinearGaussianSSM, filtered: FilterResult, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (..., steps, m) and covariance (..., steps, m, m) of y_(T+1), ..., y_(T+steps) given y_1..y_T."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    dtype, device = filtered.filtered_mean.dtype, filtered.filtered_mean.device
    F, H, Q, R, _, _ = _matrices(model, dtype, device)
    x, P = filtered.filtered_mean[..., -1, :], filtered.filtered_cov[..., -1, :, :]
    means, covs = [], []
    for _ in range(steps):
        x, P = (F @ x[..., None])[..., 0], F @ P @ F.transpose(-1, -2) + Q
        means.append((H @ x[..., None])[..., 0])
        covs.append(H @ P @ H.transpose(-1, -2) + R)
    return torch.stack(means, dim=-2), torch.stack(covs, dim=-3)


def impute(y: torch.Tensor, model: LinearGaussianSSM) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the NaN entries of ``y`` (..., T, m) with their smoothed expectation ``E[y_t | all observed]``.

    Returns ``(filled, variance)``: filled (..., T, m) equals y where observed; variance (..., T, m)
    is the predictive variance ``diag(H P^s_t Hᵀ + R)`` of each filled entry (0 where observed).
    """
    smoothed = rts_smoother(model, kalman_filter(y, model))
    dtype = smoothed.smoothed_mean.dtype
    H, R = model.H.to(dtype=dtype, device=y.device), model.R.to(dtype=dtype, device=y.device)
    expected = (H @ smoothed.smoothed_mean[..., None])[..., 0]
    var = torch.diagonal(H @ smoothed.smoothed_cov @ H.transpose(-1, -2) + R, dim1=-2, dim2=-1)
    missing = torch.isnan(y)
    return torch.where(missing, expected, y.to(dtype)), torch.where(missing, var, 0.0)
