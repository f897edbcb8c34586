"""The native one-pass Mamba-2 state step (ops/state_update/native.py) against the torch reference step."""

import pytest
import torch

from ssmkit.ops import selective_state_update
from ssmkit.ops.state_update.native import native_ssd_step

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
