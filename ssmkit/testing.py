"""One tolerance helper for every test and benchmark check.

Errors are measured relative to the size of the expected tensor (``max|a - e| / max(max|e|, floor)``),
which is meaningful for outputs of any scale, plus an absolute floor for tensors that are ~0.
The per-dtype table follows mamba_ssm's test tolerances.
"""

from __future__ import annotations

import torch

# (rtol, atol) per dtype of the computation under test.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (3e-4, 1e-5),
    torch.float16: (5e-3, 1e-3),
    torch.bfloat16: (2e-2, 5e-3),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for computations done in ``dtype``."""
    if dtype not in TOLERANCES:
        raise ValueError(f"no tolerance defined for dtype {dtype}")
    return TOLERANCES[dtype]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` computed in float64."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    scale = e.abs().max().item() if e.numel() else 0.0
    diff = (a - e).abs().max().item() if e.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    name: str = "tensor",
) -> None:
    """Assert ``actual`` matches ``expected`` within the tolerance of ``dtype``.

    Passes when ``max|a - e| <= atol + rtol * max|e|``. ``dtype`` defaults to ``actual.dtype``;
    explicit ``rtol``/``atol`` override the table. On failure the message gives the max and mean
    absolute error, the relative error and where the worst element is. NaN in either tensor fails
    unless both have NaN at the same places.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    d_rtol, d_atol = tolerance(dtype or actual.dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        raise AssertionError(
            f"{name}: NaN pattern differs ({int(nan_a.sum())} NaN in actual, {int(nan_e.sum())} in expected)"
        )
    a, e = a[~nan_a], e[~nan_e]
    if e.numel() == 0:
        return
    # Equal values (infinities included) count as exact; inf - inf would otherwise be NaN.
    diff = torch.where(a == e, torch.zeros_like(a), (a - e).abs())
    finite = e[torch.isfinite(e)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    max_err = diff.max().item()
    bound = atol + rtol * scale
    if not max_err <= bound:
        worst = int(diff.argmax())
        raise AssertionError(
            f"{name}: max abs err {max_err:.3e} > bound {bound:.3e} (rtol {rtol:g}, atol {atol:g}, "
            f"max|expected| {scale:.3e}); mean abs err {diff.mean().item():.3e}, "
            f"relative err {max_err / scale if scale else max_err:.3e}, worst at flat index {worst}: "
            f"actual {a.flatten()[worst].item():.6g} vs expected {e.flatten()[worst].item():.6g}"
        )
