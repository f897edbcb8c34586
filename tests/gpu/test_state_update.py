"""Triton ``selective_state_update`` on a CUDA GPU against the float64 torch step.

Run on the device machine: ``python -m pytest -m gpu tests/gpu/test_state_update.py -q``.
"""

from __future__ import annotations

import pytest
import torch

from ssmkit.ops.state_update import selective_state_update
from ssmkit.testing import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEV = "cuda"


def _rand(shape, dtype=torch.float32):
    return torch.randn(shape, device=DEV, dtype=dtype)


def _check(state, args, kw, dtype, steps=3):
    """Several steps with fresh inputs each: Triton (auto) vs the float64 torch step on upcast copies."""
    expected_state = state.double()
    for _ in range(steps):
        step_args = [a() if callable(a) else a for a in args]
        up = [a.double() for a in step_args]
        kw64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        expected = selective_state_update(expected_state, *up, **kw64, backend="reference")
        ptr = state.data_ptr()
        actual = selective_state_update(state, *step_args, **kw)
        assert state.data_ptr() == ptr and actual.dtype == step_args[0].dtype
        assert_close(actual, expected, dtype, name="y")
        assert_close(state, expected_state, torch.float32, name="state")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, d, n, groups", [(1, 1536, 16, None), (64, 1536, 16, None), (3, 40, 7, 4), (2, 8, 64, 1)])
def test_mamba1_shapes(dtype, b, d, n, groups):
    bc = (b, n) if groups is None else (b, groups, n)
    args = (lambda: _rand((b, d), dtype), lambda: _rand((b, d), dtype), -torch.rand(d, n, device=DEV) * 8,
            lambda: _rand(bc, dtype), lambda: _rand(bc, dtype))
    kw = dict(D=_rand(d), z=_rand((b, d), dtype), dt_bias=_rand(d) - 3, dt_softplus=True)
    _check(torch.zeros(b, d, n, device=DEV), args, kw, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, h, p, n, g", [(1, 24, 64, 128, 1), (64, 24, 64, 128, 1), (2, 8, 50, 17, 2),
                                           (3, 6, 1, 32, 3), (1, 128, 64, 128, 8)])
@pytest.mark.parametrize("compact", [True, False])
def test_mamba2_shapes(dtype, b, h, p, n, g, compact):
    args = (lambda: _rand((b, h, p), dtype), lambda: _rand((b, h) if compact else (b, h, p), dtype),
            -torch.rand((h,) if compact else (h, p, n), device=DEV) * 8,
            lambda: _rand((b, g, n), dtype), lambda: _rand((b, g, n), dtype))
    kw = dict(D=_rand((h,) if compact else (h, p)), z=_rand((b, h, p), dtype),
              dt_bias=_rand((h,) if compact else (h, p)) - 3, dt_softplus=True, dt_limit=(0.001, 0.2))
    _check(_rand((b, h, p, n)), args, kw, dtype)


def test_optional_parts_off_and_strided_state():
    b, h, p, n = 4, 8, 64, 128
    # A state slice of a larger cache (rows 1..4 of 6, heads-major transposed): updated in its memory.
    cache = torch.randn(6, h, n, p, device=DEV).transpose(-1, -2)
    state = cache[1:5]
    args = (lambda: _rand((b, h, p)), lambda: _rand((b, h)).abs(), -torch.rand(h, device=DEV),
            lambda: _rand((b, n)), lambda: _rand((b, n)))
    before_other = cache[[0, 5]].clone()
    _check(state, args, {}, torch.float32)
    assert torch.equal(cache[[0, 5]], before_other)


def test_backend_choice():
    b, h, p, n = 1, 2, 4, 8
    args = (_rand((b, h, p)), _rand((b, h)), -torch.rand(h, device=DEV), _rand((b, n)), _rand((b, n)))
    s1, s2 = torch.zeros(b, h, p, n, device=DEV), torch.zeros(b, h, p, n, device=DEV)
    y1 = selective_state_update(s1, *args, backend="triton")
    y2 = selective_state_update(s2, *args, backend="chunked")
    assert_close(y1, y2, torch.float32)
    # float64 takes the torch step under "auto", and is refused by "triton".
    s64 = torch.zeros(b, h, p, n, device=DEV, dtype=torch.float64)
    selective_state_update(s64, *args)
    with pytest.raises(ValueError, match="computes in float32"):
        selective_state_update(s64, *args, backend="triton")


def test_step_is_capturable_in_a_cuda_graph():
    b, h, p, n = 2, 24, 64, 128
    state = torch.zeros(b, h, p, n, device=DEV)
    x, dt, A = _rand((b, h, p), torch.bfloat16), _rand((b, h), torch.bfloat16), -torch.rand(h, device=DEV)
    B, C = _rand((b, 1, n), torch.bfloat16), _rand((b, 1, n), torch.bfloat16)
    selective_state_update(state.clone(), x, dt, A, B, C, dt_softplus=True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = selective_state_update(state, x, dt, A, B, C, dt_softplus=True)
    expected_state = torch.zeros(b, h, p, n, device=DEV, dtype=torch.float64)
    for _ in range(3):
        x.copy_(_rand((b, h, p), torch.bfloat16))
        graph.replay()
        expected = selective_state_update(expected_state, x.double(), dt.double(), A.double(), B.double(),
                                          C.double(), dt_softplus=True)
        assert_close(y, expected, torch.bfloat16, name="y")
        assert_close(state, expected_state, torch.float32, name="state")
