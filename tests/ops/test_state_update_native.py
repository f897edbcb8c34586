"""The native one-pass Mamba-2 and Mamba-1 state steps (ops/state_update/native.py) against the reference steps."""

import pytest
import torch

from ssmkit.ops import selective_state_update
from ssmkit.ops.state_update.native import native_selective_step, native_ssd_step

step = native_ssd_step()
pytestmark = pytest.mark.skipif(step is None, reason="no C compiler here: the native kernels are not built")


@pytest.mark.parametrize("b,h,p,n,g", [(1, 4, 8, 16, 1), (3, 6, 5, 7, 2), (2, 8, 16, 128, 4), (1, 24, 64, 128, 1)])
def test_native_step_equals_the_reference_step(b, h, p, n, g):
    gen = torch.Generator().manual_seed(b * 100 + n)
    state = torch.randn(b, h, p, n, generator=gen)
    x, B, C = torch.randn(b, h, p, generator=gen), torch.randn(b, g, n, generator=gen), torch.randn(b, g, n, generator=gen)
    dt, A = torch.randn(b, h, generator=gen), -torch.rand(h, generator=gen)
    expected_state = state.clone()
    expected = selective_state_update(expected_state, x, dt, A, B, C, dt_softplus=True, backend="reference")
    delta = torch.nn.functional.softplus(dt)
    ptr = state.data_ptr()
    y = step(state, x, delta, torch.exp(delta * A), B, C)
    assert state.data_ptr() == ptr  # in place
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, expected_state, rtol=1e-6, atol=1e-6)


def test_native_step_reads_strided_inputs():
    b, h, p, n, g = 2, 4, 8, 16, 2
    gen = torch.Generator().manual_seed(7)
    state = torch.randn(b, h, p, n, generator=gen)
    packed = torch.randn(b, h * p + 2 * g * n, generator=gen)  # x, B, C as slices of one row, as a layer's
    x, B, C = packed.split([h * p, g * n, g * n], dim=-1)
    delta, decay = torch.rand(b, h, generator=gen), torch.rand(b, h, generator=gen)
    ref = state.clone()
    y = step(state, x.reshape(b, h, p), delta, decay, B.reshape(b, g, n), C.reshape(b, g, n))
    s = ref * decay[..., None, None] + (delta[..., None] * x.reshape(b, h, p))[..., None] * B.reshape(b, g, 1, 1, n).repeat_interleave(h // g, 1).reshape(b, h, 1, n)
    torch.testing.assert_close(state, s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, (s * C.reshape(b, g, 1, n).repeat_interleave(h // g, 1)).sum(-1), rtol=1e-5, atol=1e-5)


selective = native_selective_step()


@pytest.mark.parametrize("b,I,n,R,gate,dt_inside", [(1, 16, 16, 4, True, True), (2, 37, 16, 5, True, True),
                                                     (3, 20, 7, 3, False, False), (1, 48, 35, 8, True, False)])
def test_native_selective_step_equals_the_reference_step(b, I, n, R, gate, dt_inside):
    """Mamba-1's step (dt projection, softplus, state update, D, SiLU gate) against the float64 reference,
    over channel counts that are not multiples of the 16-wide blocks and state sizes off the vector width;
    dt values span softplus's linear branch (> 20) and very negative ones (delta ~ 0)."""
    gen = torch.Generator().manual_seed(b * 1000 + I)
    state = torch.randn(b, I, n, generator=gen)
    packed = torch.randn(b, R + 2 * n, generator=gen)  # x_proj's output: dt_low, B, C as slices
    dt_low, B, C = packed.split([R, n, n], dim=-1)
    xz = torch.randn(b, 2 * I, generator=gen) * 4  # in_proj's output: x and z as slices (z up to ~±15)
    x, z = xz.split(I, dim=-1)
    A, D, dt_bias = -torch.rand(I, n, generator=gen) * 3, torch.randn(I, generator=gen), torch.randn(I, generator=gen)
    dt_weight = torch.randn(I, R, generator=gen) * 3
    dt = dt_low @ dt_weight.T
    dt[:, :3] = torch.tensor([25.0, -30.0, 19.5])  # softplus's linear branch, a vanishing delta, just below
    if dt_inside:
        dt_weight[:3] = 0.0
        dt_bias[:3] = torch.tensor([25.0, -30.0, 19.5])
        dt = dt_low @ dt_weight.T  # what the kernel computes from dt_low
    expected_state = state.clone().double()
    expected = selective_state_update(expected_state, x.double(), dt.double(), A.double(), B.double(), C.double(),
                                      D.double(), z=z.double() if gate else None, dt_bias=dt_bias.double(),
                                      dt_softplus=True, backend="reference")
    step = selective(A, dt_bias, D, dt_weight if dt_inside else None)
    y = step(state, x, dt_low if dt_inside else dt, B, C, z if gate else None)
    torch.testing.assert_close(state, expected_state.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, expected.float(), rtol=1e-5, atol=1e-5)
