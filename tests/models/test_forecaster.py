"""SSMForecaster: shapes, ordered quantiles, equivariance to the series' level and scale, the pinball loss."""

from __future__ import annotations

import pytest
import torch

from ssmkit.models.forecaster import (
    MIXERS,
    NORMS,
    ForecasterConfig,
    SSMForecaster,
    pinball_loss,
)
from ssmkit.testing import assert_close


def tiny(mixer: str, period: int = 4, **options) -> SSMForecaster:
    torch.manual_seed(0)
    return SSMForecaster(ForecasterConfig(mixer=mixer, horizon=5, period=period, d_model=16, n_layer=2, d_state=8,
                                          ff_width=16, **options)).double()


@pytest.mark.parametrize("mixer", MIXERS)
def test_shapes_and_ordered_quantiles(mixer):
    model = tiny(mixer)
    history = torch.randn(3, 20, dtype=torch.float64).cumsum(1)
    q = model(history, torch.tensor([0, 1, 3]))
    assert q.shape == (3, 5, 3) and (q.diff(dim=-1) >= 0).all()
    loss = model.loss(history, torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 1, 3]))
    loss.backward()
    assert loss.item() > 0 and all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("mixer,norm", [("s4d", "last"), ("mamba", "last"), ("s4d", "mean")])
def test_forecasts_follow_the_series_level_and_scale(mixer, norm):
    model = tiny(mixer, norm=norm)
    history, phase = torch.randn(2, 16, dtype=torch.float64), torch.tensor([2, 3])
    assert_close(model(7.5 * history - 300.0, phase), 7.5 * model(history, phase) - 300.0, rtol=1e-9, atol=1e-8)


def test_scale_norm_follows_the_scale_and_keeps_zero():
    model = tiny("s4d", norm="scale")
    history, phase = torch.rand(2, 16, dtype=torch.float64), torch.tensor([0, 1])
    assert_close(model(40.0 * history, phase), 40.0 * model(history, phase), rtol=1e-9, atol=1e-9)
    # Not shift-equivariant: the distance from 0 is information the model sees.
    assert not torch.allclose(model(history + 5.0, phase), model(history, phase) + 5.0)
    loc, scale = model.normalise(history)
    assert (loc == 0).all()
    assert_close(scale, history.abs().mean(1, keepdim=True), rtol=1e-12, atol=0)


@pytest.mark.parametrize("norm", NORMS)
def test_normalisation_inverts_exactly(norm):
    """A zero head on the seasonal skip forecasts exactly the raw seasonal naive forecast: the normalisation
    is undone exactly, whatever the level and scale of the history."""
    model = tiny("s4d", norm=norm, seasonal_skip=True, zero_head=True)
    history = 1e3 + 50.0 * torch.randn(3, 11, dtype=torch.float64)
    q = model(history, torch.tensor([0, 1, 2]))
    expected = history[:, [7, 8, 9, 10, 7]]  # period 4, horizon 5: the last season, repeated
    for i in range(q.shape[-1]):
        assert_close(q[..., i], expected, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("norm", ["last", "mean"])
def test_zero_head_forecasts_the_location(norm):
    model = tiny("mamba", norm=norm, zero_head=True)
    history = torch.randn(2, 9, dtype=torch.float64)
    loc = history[:, -1] if norm == "last" else history.mean(1)
    assert_close(model(history, torch.tensor([0, 3])), loc[:, None, None].expand(2, 5, 3), rtol=0, atol=1e-12)


def test_the_season_embedding_is_used_and_required():
    model = tiny("s4d")
    history = torch.randn(1, 12, dtype=torch.float64)
    assert not torch.allclose(model(history, torch.tensor([0])), model(history, torch.tensor([1])))
    with pytest.raises(ValueError, match="phase"):
        model(history)
    assert tiny("s4d", period=1)(history).shape == (1, 5, 3)
    plain = tiny("s4d", season_embedding=False)  # period 4 for the seasonal naive skip, no position feature
    assert plain.season is None and plain(history).shape == (1, 5, 3)


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
    with pytest.raises(ValueError, match="norm"):
        ForecasterConfig(norm="minmax")
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
