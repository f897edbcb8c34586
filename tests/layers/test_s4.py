"""S4 layer (DPLR, HiPPO init): Cauchy convolution == dense recurrent steps, packing, bidirectional, gradients."""

from __future__ import annotations

import pytest
import torch

from ssmkit.layers.s4 import S4, S4State
from ssmkit.ops import lti
from ssmkit.testing import assert_close

H = 8


def make(dtype=torch.float32, **kw):
    torch.manual_seed(2)
    return S4(H, **({"d_state": 8, "l_max": 64, "dt_min": 0.01, "dt_max": 0.5} | kw)).to(dtype)


def run_steps(layer, x, state):
    return torch.cat([layer(x[:, t:t + 1], cache=state) for t in range(x.shape[1])], dim=1)


def test_hippo_legs_initialisation():
    layer = make(torch.float64)
    Lambda, P, B, _ = lti.nplr("legs", 8)
    A, _, _, _, _ = layer.dplr()
    # Stored at float32 precision, then converted to float64.
    assert_close(torch.view_as_real(A[3]), torch.view_as_real(Lambda), rtol=1e-7, name="Λ")
    assert layer.P.shape == (1, H, 4, 2) and layer.C.shape == (1, H, 4, 2)
    assert_close(layer.P[0, 5], torch.view_as_real(P[0]), rtol=1e-7, name="P")
    assert_close(layer.B[5], torch.view_as_real(B), rtol=1e-7, name="B")
    assert make(measure="legt").P.shape == (2, H, 4, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("measure", ["legs", "legt", "fourier"])
def test_steps_equal_parallel_forward(dtype, measure):
    layer = make(dtype, measure=measure)
    x = torch.randn(2, 21, H, dtype=dtype)
    full = layer(x)
    state = layer.allocate_state(2)
    with torch.no_grad():
        steps = run_steps(layer, x, state)
    rtol = 2e-5 if dtype == torch.float32 else 1e-10
    assert_close(steps, full, rtol=rtol, atol=0, name="steps vs parallel")
    prefill = layer.allocate_state(2)
    layer(x, cache=prefill)
    assert_close(prefill.ssm, state.ssm, rtol=rtol, name="state after prefill")


@pytest.mark.parametrize("split", [1, 9])
def test_prefill_then_continue_and_initial_state(split):
    layer = make(torch.float64)
    x = torch.randn(2, 17, H, dtype=torch.float64)
    full = layer(x)
    state = layer.allocate_state(2)
    out = torch.cat([layer(x[:, :split], cache=state), layer(x[:, split:], cache=state)], 1)
    assert_close(out, full, rtol=1e-10, name="prefill + continue")
    again = layer.allocate_state(2)
    layer(x[:, :split], cache=again)
    assert_close(layer(x[:, split:], initial_state=again), full[:, split:], rtol=1e-10, name="initial_state")


def test_seq_idx_packing_equals_documents_alone():
    layer = make(torch.float64)
    a, b = torch.randn(1, 6, H, dtype=torch.float64), torch.randn(1, 9, H, dtype=torch.float64)
    seq_idx = torch.tensor([[7] * 6 + [8] * 9])
    x = torch.cat([a, b], 1)
    out = layer(x, seq_idx=seq_idx)
    assert_close(out[:, :6], layer(a), name="doc a")
    assert_close(out[:, 6:], layer(b), name="doc b")
    packed, alone = layer.allocate_state(1), layer.allocate_state(1)
    assert_close(layer(x, seq_idx=seq_idx, cache=packed), out, rtol=1e-10, name="packed with a cache")
    layer(b, cache=alone)
    assert_close(packed.ssm, alone.ssm, rtol=1e-10, name="state of the last document")


def test_bidirectional_reads_the_future_and_has_no_step():
    layer = make(torch.float64, bidirectional=True)
    assert layer.C.shape == (2, H, 4, 2)
    x = torch.randn(1, 12, H, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 10] -= 2.0
    assert (layer(x2)[:, :10] - layer(x)[:, :10]).abs().max() > 1e-6
    with pytest.raises(ValueError, match="no recurrent state, cache or decode step"):
        layer(x[:, :1], cache=make(torch.float64).allocate_state(1))
    with pytest.raises(ValueError, match="bidirectional layer reads future positions"):
        layer.allocate_state(1)


def test_gradients_and_long_inputs():
    layer = make()
    layer(torch.randn(2, 30, H)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="l_max = 64"):
        layer(torch.randn(1, 65, H))
    state = layer.allocate_state(1)
    with torch.no_grad():
        run_steps(layer, torch.randn(1, 70, H), state)  # decoding has no length limit
    assert torch.isfinite(state.ssm).all()
    with pytest.raises(ValueError, match="state.ssm has shape"):
        layer(torch.randn(1, 3, H), cache=S4State(ssm=torch.zeros(1, H, 4)))


def test_recurrent_form_is_reused_until_a_parameter_changes():
    layer = make()
    with torch.no_grad():
        first = layer.recurrence()
        assert layer.recurrence() is first
        layer.log_dt.add_(0.1)
        assert layer.recurrence() is not first
