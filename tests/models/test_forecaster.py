"""SSMForecaster: shapes, ordered quantiles, equivariance to the series' level and scale, the pinball loss."""

from __future__ import annotations

import pytest
import torch

from ssmkit.models.forecaster import (
    MIXERS,
    ForecasterConfig,
    SSMForecaster,
    pinball_loss,
)
from ssmkit.testing import assert_close


def tiny(mixer: str, period: int = 4) -> SSMForecaster:
    torch.manual_seed(0)
    return SSMForecaster(ForecasterConfig(mixer=mixer, horizon=5, period=period, d_model=16, n_layer=2, d_state=8,
                                          ff_width=16)).double()


@pytest.mark.parametrize("mixer", MIXERS)
def test_shapes_and_ordered_quantiles(mixer):
    model = tiny(mixer)
    history = torch.randn(3, 20, dtype=torch.float64).cumsum(1)
    q = model(history, torch.tensor([0, 1, 3]))
    assert q.shape == (3, 5, 3) and (q.diff(dim=-1) >= 0).all()
    loss = model.loss(history, torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 1, 3]))
    loss.backward()
    assert loss.item() > 0 and all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("mixer", ["s4d", "mamba"])
def test_forecasts_follow_the_series_level_and_scale(mixer):
    model = tiny(mixer)
    history, phase = torch.randn(2, 16, dtype=torch.float64), torch.tensor([2, 3])
    assert_close(model(7.5 * history - 300.0, phase), 7.5 * model(history, phase) - 300.0, rtol=1e-9, atol=1e-8)


def test_the_season_embedding_is_used_and_required():
    model = tiny("s4d")
    history = torch.randn(1, 12, dtype=torch.float64)
    assert not torch.allclose(model(history, torch.tensor([0])), model(history, torch.tensor([1])))
    with pytest.raises(ValueError, match="phase"):
        model(history)
    assert tiny("s4d", period=1)(history).shape == (1, 5, 3)


def test_pinball_loss_by_hand():
    pred = torch.tensor([[[1.0, 2.0, 3.0]]])
    target = torch.tensor([[2.5]])
    q = torch.tensor([0.1, 0.5, 0.9])
    # e = 1.5, 0.5, -0.5: 0.1·1.5, 0.5·0.5, (0.9 - 1)·(-0.5)
    assert pinball_loss(pred, target, q).item() == pytest.approx((0.15 + 0.25 + 0.05) / 3)


def test_config_checks():
    with pytest.raises(ValueError, match="0.5"):
        ForecasterConfig(quantiles=(0.1, 0.9))
    with pytest.raises(ValueError, match="mixer"):
        ForecasterConfig(mixer="gru")
    assert ForecasterConfig().to_dict()["quantiles"] == [0.1, 0.5, 0.9]


def test_seasonal_skip_starts_from_the_seasonal_naive_forecast():
    torch.manual_seed(0)
    model = SSMForecaster(ForecasterConfig(mixer="s4d", horizon=6, period=4, d_model=8, n_layer=1, d_state=4,
                                           seasonal_skip=True)).double()
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    history = torch.randn(2, 10, dtype=torch.float64)
    q = model(history, torch.tensor([0, 1]))
    expected = history[:, [6, 7, 8, 9, 6, 7]]  # the last season, repeated
    for i in range(3):
        assert_close(q[..., i], expected, rtol=1e-12, atol=1e-12)
