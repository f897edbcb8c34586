"""The Fréchet distance against closed forms, and the scoring CNN's shapes."""

from __future__ import annotations

import pytest
import torch

from ssmkit.evals._digit_scorer import DigitScorer, frechet_distance, predict


def test_frechet_distance_closed_forms():
    torch.manual_seed(0)
    a = torch.randn(500, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 3.0], dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(float((shift**2).sum()), rel=1e-9)
    # b = 2 (a - mean) + mean: Σ_b = 4 Σ_a, so Tr(Σ + 4Σ - 2·2Σ) = Tr(Σ).
    centred = a - a.mean(0)
    b = 2 * centred + a.mean(0)
    assert frechet_distance(a, b) == pytest.approx(float(torch.trace(torch.cov(a.T))), rel=1e-8)
    # One dimension: (μ1 - μ2)² + (σ1 - σ2)².
    x, y = torch.randn(1000, 1, dtype=torch.float64), 3 * torch.randn(1000, 1, dtype=torch.float64) + 1
    expected = (x.mean() - y.mean()) ** 2 + (x.std() - y.std()) ** 2
    assert frechet_distance(x, y) == pytest.approx(float(expected), rel=1e-8)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError):
        frechet_distance(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError):
        frechet_distance(torch.randn(1, 3), torch.randn(5, 3))


@pytest.mark.parametrize("side", [8, 28])
def test_scorer_shapes(side):
    labels, feats = predict(DigitScorer().eval(), torch.randn(7, 1, side, side))
    assert labels.shape == (7,) and feats.shape == (7, 64) and feats.dtype == torch.float64
