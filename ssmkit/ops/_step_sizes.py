"""Step sizes Δ as the selective SSMs use them (SSD, its decode step, context parallelism), defined once."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["NO_LIMIT", "check_dt_limit", "discretize_dt"]

# The (0, inf) limit means "no clamp": mamba_ssm's callers pass it to switch the clamp off.
NO_LIMIT = (0.0, float("inf"))


def check_dt_limit(dt_limit: object) -> tuple[float, float]:
    """``dt_limit`` as a (lo, hi) pair of floats with lo <= hi; else TypeError / ValueError."""
    if not isinstance(dt_limit, (tuple, list)) or len(dt_limit) != 2:
        raise TypeError(f"dt_limit must be a (lo, hi) pair of floats, got {dt_limit!r}")
    lo, hi = (float(v) for v in dt_limit)
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"dt_limit must be (lo, hi) with lo <= hi, got {dt_limit!r}")
    return lo, hi


def discretize_dt(
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Step sizes as the SSM uses them: ``clamp(softplus(dt + dt_bias), *dt_limit)``, in ``dtype``.

    dt: (b, l, h); dt_bias: (h,). Softplus uses PyTorch's threshold of 20 (linear above), as
    mamba_ssm's kernels do. The clamp is skipped for the default limit ``(0, inf)``.
    """
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != NO_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt
