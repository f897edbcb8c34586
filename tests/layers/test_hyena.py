"""Hyena layer: FFT long convolutions == windowed decode steps, packing, gradients, implicit filters."""

from __future__ import annotations

import math

import pytest
import torch

from ssmkit.layers.hyena import Hyena, HyenaState
from ssmkit.testing import assert_close

H = 8


def make(dtype=torch.float32, **kw):
    torch.manual_seed(3)
    return Hyena(H, **({"l_max": 12, "filter_order": 16} | kw)).to(dtype)


def run_steps(layer, x, state):
    return torch.cat([layer(x[:, t:t + 1], cache=state) for t in range(x.shape[1])], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", [{}, {"order": 3, "short_filter_order": 4}, {"modulate": False, "emb_dim": 5}])
def test_steps_equal_parallel_forward_beyond_the_filter_length(dtype, kw):
    layer = make(dtype, **kw)
    x = torch.randn(2, 29, H, dtype=dtype)  # longer than l_max = 12: the window slides
    full = layer(x)
    state = layer.allocate_state(2)
    steps = run_steps(layer, x, state)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close(steps, full, rtol=rtol, atol=0, name="steps vs parallel")
    prefill = layer.allocate_state(2)
    layer(x, cache=prefill)
    assert_close(prefill.long, state.long, rtol=rtol, name="long window")
    assert_close(prefill.conv, state.conv, rtol=rtol, name="short window")


@pytest.mark.parametrize("split", [1, 5, 20])
def test_prefill_then_continue_and_initial_state(split):
    layer = make(torch.float64)
    x = torch.randn(2, 26, H, dtype=torch.float64)
    full = layer(x)
    state = layer.allocate_state(2)
    out = torch.cat([layer(x[:, :split], cache=state), layer(x[:, split:], cache=state)], 1)
    assert_close(out, full, name="prefill + continue")
    again = layer.allocate_state(2)
    layer(x[:, :split], cache=again)
    assert_close(layer(x[:, split:], initial_state=again), full[:, split:], name="initial_state")


def test_seq_idx_packing_equals_documents_alone():
    layer = make(torch.float64)
    a, b = torch.randn(1, 15, H, dtype=torch.float64), torch.randn(1, 3, H, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 15 + [1] * 3])
    x = torch.cat([a, b], 1)
    out = layer(x, seq_idx=seq_idx)
    assert_close(out[:, :15], layer(a), name="doc a")
    assert_close(out[:, 15:], layer(b), name="doc b")
    packed, alone = layer.allocate_state(1), layer.allocate_state(1)
    layer(x, seq_idx=seq_idx, cache=packed)
    layer(b, cache=alone)
    assert_close(packed.long, alone.long, name="long window of the last document")
    assert_close(packed.conv, alone.conv, name="short window of the last document")


def test_implicit_filter_shape_and_decay():
    layer = make(torch.float64, l_max=64)
    h = layer.filter_fn()
    assert h.shape == (H, 64)
    # The modulation window makes every filter decay: late taps are much smaller than early ones.
    assert bool((h[:, -8:].abs().mean(1) < h[:, :8].abs().mean(1)).all())
    z = layer.filter_fn.z
    assert z.shape == (64, 3) and math.isclose(z[-1, 0].item(), 1.0) and z[0, 1].item() == 1.0
    assert "filter_fn.z" not in layer.state_dict(), "positional features are rebuilt, not saved"


def test_causal_gradients_and_bad_states():
    layer = make()
    x = torch.randn(1, 10, H, requires_grad=True)
    y = layer(x)
    y[:, 4].sum().backward()
    # Causal up to the FFT's rounding.
    assert x.grad[:, 5:].abs().max() < 1e-6 * x.grad[:, :5].abs().max(), "causal"
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    state = layer.allocate_state(2)
    assert state.conv.shape == (2, 3 * H, 3) and state.long.shape == (2, H, 11)
    with pytest.raises(ValueError, match="state.long has shape"):
        layer(torch.randn(2, 3, H), cache=HyenaState(conv=state.conv, long=torch.zeros(2, H, 5)))
    with pytest.raises(ValueError, match="order must be >= 2"):
        Hyena(H, order=1)
    with pytest.raises(ValueError, match="emb_dim must be odd"):
        Hyena(H, emb_dim=4)


def test_bfloat16_tracks_float32():
    layer = make(torch.bfloat16)
    x = torch.randn(2, 9, H).to(torch.bfloat16)
    full = layer(x)
    assert full.dtype == torch.bfloat16
    steps = run_steps(layer, x, layer.allocate_state(2))
    assert_close(steps, full, torch.bfloat16, name="bf16 steps")
