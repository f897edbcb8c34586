"""Tests for the backend choice (ssmkit/ops/backend.py) and the tolerance helper (ssmkit/testing.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ssmkit.ops import backend as backend_module
from ssmkit.ops.backend import BACKENDS, resolve_backend, triton_available
from ssmkit.testing import TOLERANCES, assert_close, relative_error, tolerance

CPU = torch.device("cpu")


@pytest.fixture
def fake_triton(monkeypatch):
    """Make ``find_spec("triton")`` answer as if triton were (True) or were not (False) installed."""
    real = importlib.util.find_spec

    def install(present: bool) -> None:
        marker = object()

        def find_spec(name, *args):
            if name == "triton":
                return marker if present else None
            return real(name, *args)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        triton_available.cache_clear()

    yield install
    triton_available.cache_clear()


@pytest.mark.parametrize("name", ["reference", "chunked"])
def test_explicit_backends_pass_through(name):
    assert resolve_backend(name, CPU) == name
    assert resolve_backend(name, torch.device("meta"), has_triton=True) == name


def test_auto_is_chunked_without_cuda():
    assert resolve_backend("auto", CPU) == "chunked"
    assert resolve_backend("auto", CPU, has_triton=True) == "chunked"
    assert resolve_backend("auto", torch.device("cuda"), has_triton=False) == "chunked"


def test_auto_picks_triton_on_cuda_when_available(monkeypatch):
    monkeypatch.setattr(backend_module, "triton_available", lambda: True)
    assert resolve_backend("auto", torch.device("cuda"), has_triton=True) == "triton"
    assert resolve_backend("auto", CPU, has_triton=True) == "chunked"
    monkeypatch.setattr(backend_module, "triton_available", lambda: False)
    assert resolve_backend("auto", torch.device("cuda"), has_triton=True) == "chunked"


@pytest.mark.parametrize("bad", ["cuda", "Chunked", "", "ref", None, 1])
def test_unknown_backend_is_refused_with_the_choices(bad):
    with pytest.raises(ValueError, match="backend must be one of") as info:
        resolve_backend(bad, CPU)
    assert all(name in str(info.value) for name in BACKENDS)


def test_triton_refused_for_an_op_without_kernels():
    with pytest.raises(ValueError, match="no Triton implementation"):
        resolve_backend("triton", torch.device("cuda"), has_triton=False)


def test_triton_refused_clearly_without_cuda(monkeypatch, fake_triton):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fake_triton(True)
    with pytest.raises(ValueError, match="needs CUDA tensors") as info:
        resolve_backend("triton", CPU, has_triton=True)
    assert "TRITON_INTERPRET=1" in str(info.value) and "cpu" in str(info.value)


def test_triton_interpreter_allows_cpu_only_with_the_package(monkeypatch, fake_triton):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fake_triton(False)
    with pytest.raises(ValueError, match="needs the triton package"):
        resolve_backend("triton", CPU, has_triton=True)
    fake_triton(True)
    assert resolve_backend("triton", CPU, has_triton=True) == "triton"


def test_triton_available_needs_package_and_cuda(monkeypatch, fake_triton):
    fake_triton(False)
    assert triton_available() is False
    fake_triton(True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert triton_available() is False
    triton_available.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert triton_available() is True


def test_tolerance_table():
    assert tolerance(torch.float32) == TOLERANCES[torch.float32] == (3e-4, 1e-5)
    rtols = [tolerance(d)[0] for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64)]
    assert rtols == sorted(rtols, reverse=True)
    with pytest.raises(ValueError, match="no tolerance defined for dtype torch.int64"):
        tolerance(torch.int64)


def test_relative_error():
    assert relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])) == 0.5
    assert relative_error(torch.tensor([0.5]), torch.zeros(1)) == 0.5  # expected all zero: absolute error
    assert relative_error(torch.empty(0), torch.empty(0)) == 0.0
    assert relative_error(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([1.0], dtype=torch.float64)) == 0.0


def test_assert_close_passes_within_the_dtype_tolerance():
    expected = torch.randn(1000, dtype=torch.float64)
    rtol, atol = tolerance(torch.float32)
    bound = atol + rtol * expected.abs().max().item()
    assert_close(expected + 0.9 * bound * torch.randn(1000, dtype=torch.float64).sign(), expected, torch.float32)
    assert_close(expected.float(), expected)  # the dtype defaults to actual's: float32 rounding fits float32's


def test_assert_close_fails_beyond_it_and_says_where():
    expected = torch.randn(50, dtype=torch.float64)
    rtol, atol = tolerance(torch.float32)
    actual = expected.clone()
    actual[7] += 1.5 * (atol + rtol * expected.abs().max().item())
    with pytest.raises(AssertionError, match="my_output: max abs err") as info:
        assert_close(actual, expected, torch.float32, name="my_output")
    assert "worst at flat index 7" in str(info.value) and "mean abs err" in str(info.value)


def test_assert_close_uses_the_given_dtype_and_overrides():
    expected = torch.ones(10)
    actual = expected + 1e-2
    with pytest.raises(AssertionError):
        assert_close(actual, expected)
    assert_close(actual, expected, torch.bfloat16)
    assert_close(actual, expected, rtol=0.0, atol=1e-2 + 1e-7)
    with pytest.raises(AssertionError):
        assert_close(actual, expected, torch.bfloat16, rtol=0.0, atol=1e-3)


def test_assert_close_checks_shapes():
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(3), torch.zeros(1, 3))
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(2), torch.zeros(3))


def test_assert_close_nan_patterns():
    nan = float("nan")
    expected = torch.tensor([1.0, nan, 3.0])
    assert_close(torch.tensor([1.0, nan, 3.0]), expected)
    assert_close(torch.full((4,), nan), torch.full((4,), nan))
    with pytest.raises(AssertionError, match="NaN pattern differs"):
        assert_close(torch.tensor([1.0, 2.0, 3.0]), expected)
    with pytest.raises(AssertionError, match="NaN pattern differs"):
        assert_close(torch.tensor([nan, 2.0, 3.0]), expected)
    with pytest.raises(AssertionError, match="max abs err"):
        assert_close(torch.tensor([1.0, nan, 4.0]), expected)  # same NaNs, the rest still compared


def test_assert_close_equal_infinities_pass_and_mismatched_fail():
    inf = float("inf")
    assert_close(torch.tensor([1.0, inf, -inf]), torch.tensor([1.0, inf, -inf]))
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1.0, inf]), torch.tensor([1.0, -inf]))
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1.0, 2.0]), torch.tensor([1.0, inf]))
