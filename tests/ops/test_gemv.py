"""The GEMV ops (ssmkit/ops/gemv): the native int8 and bfloat16 kernels against the float64 reference,
argument checks, and the build's fallbacks."""

import os
import shutil

import pytest
import torch

from ssmkit.ops.gemv import (
    MAX_ROWS,
    bf16_gemv,
    int8_gemv,
    native,
    native_available,
    native_linear,
)
from ssmkit.ops.gemv.reference import gemv_reference

needs_native = pytest.mark.skipif(not native_available(), reason="no C compiler here: the native kernel is not built")


def _inputs(m, n, k, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, generator=g) * 0.02 + 1e-3
    b = torch.randn(n, generator=g) if bias else None
    return x, q, s, b


@needs_native
@pytest.mark.parametrize("m", [1, 3, MAX_ROWS])
@pytest.mark.parametrize("n,k", [(1, 1), (7, 63), (33, 64), (5, 65), (130, 777), (64, 1536)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["int8", "bf16", "fp32"])
def test_native_matches_the_reference(m, n, k, bias, kind):
    x, q, s, b = _inputs(m, n, k, bias)
    if kind == "fp32":  # through native_linear only (float32 has no op of its own: F.linear is the reference)
        w = q.float() * s[:, None] + torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 1e-3
        got = native_linear(w, None, b)(x)
        expected = gemv_reference(x, w, None, b)
        magnitude = x.abs() @ w.abs().T
    elif kind == "int8":
        got = int8_gemv(x, q, s, b, backend="native")
        expected = int8_gemv(x, q, s, b, backend="reference")
        magnitude = x.abs() @ (q.float().abs() * s[:, None]).T
    else:
        w = (q.float() * s[:, None]).bfloat16()
        got = bf16_gemv(x, w, b, backend="native")
        expected = bf16_gemv(x, w, b, backend="reference")
        magnitude = x.abs() @ w.float().abs().T
    assert got.shape == (m, n) and got.dtype == torch.float32
    # float32 accumulation of k exact products: error ~ k * eps * |terms|
    bound = 4 * k * 1.2e-7 * magnitude + 1e-6
    assert bool(((got - expected).abs() <= bound).all())


@needs_native
def test_native_is_the_same_with_more_threads():
    x, q, s, b = _inputs(2, 1000, 768, True, seed=3)  # big enough to be split over threads
    for linear in (native_linear(q, s, b), native_linear(q.bfloat16(), None, b), native_linear(q.float(), None, b)):
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = linear(x)
            torch.set_num_threads(2)
            two = linear(x)
        finally:
            torch.set_num_threads(before)
        assert torch.equal(one, two)  # rows are independent: the split does not change any sum


@needs_native
def test_native_linear_checks_its_weights():
    q = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8 CPU weights with scales"):
        native_linear(q)
    with pytest.raises(ValueError, match="bfloat16 ones without"):
        native_linear(q.bfloat16(), torch.ones(4))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        native_linear(q, torch.ones(3))


def test_reference_is_dequantise_then_matmul():
    x, q, s, b = _inputs(2, 9, 17, True)
    expected = (x.double() @ (q.double() * s.double()[:, None]).T + b.double()).float()
    assert torch.equal(int8_gemv(x, q, s, b, backend="reference"), expected)
    w = q.bfloat16()
    assert torch.equal(bf16_gemv(x, w, b, backend="reference"), (x.double() @ w.double().T + b.double()).float())


def test_arguments_are_checked():
    x, q, s, _ = _inputs(1, 4, 8, False)
    with pytest.raises(ValueError, match="at most 8 rows"):
        int8_gemv(torch.randn(MAX_ROWS + 1, 8), q, s)
    with pytest.raises(ValueError, match="qweight must have shape"):
        int8_gemv(x, q[:, :7], s)
    with pytest.raises(ValueError, match="scales must have shape"):
        int8_gemv(x, q, s[:3])
    with pytest.raises(TypeError, match="qweight must be a torch.int8 CPU tensor"):
        int8_gemv(x, q.to(torch.int16), s)
    with pytest.raises(TypeError, match="weight must be a torch.bfloat16 CPU tensor"):
        bf16_gemv(x, q.half())
    with pytest.raises(TypeError, match="x must be a float32 CPU tensor"):
        int8_gemv(x.double(), q, s)
    with pytest.raises(TypeError, match="qweight must be an integer tensor"):
        int8_gemv(x, q.float(), s)
    with pytest.raises(ValueError, match="backend must be"):
        int8_gemv(x, q, s, backend="triton")


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """library() rebuilt from scratch in an empty cache folder, and the real one restored afterwards."""
    monkeypatch.setenv("SSMKIT_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    native.library.cache_clear()


def test_switched_off_by_the_environment(fresh_build, monkeypatch):
    monkeypatch.setenv("SSMKIT_NATIVE", "0")
    assert native.library() is None and not native_available()
    x, q, s, _ = _inputs(1, 4, 8, False)
    torch.testing.assert_close(int8_gemv(x, q, s), int8_gemv(x, q, s, backend="reference"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not available"):
        int8_gemv(x, q, s, backend="native")


def test_no_compiler_means_no_native_kernel(fresh_build, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert native.library() is None
    assert not any(fresh_build.rglob("*.so"))


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here")
def test_build_is_cached_and_an_untrusted_file_is_not_loaded(fresh_build):
    assert native.library() is not None
    built = list(fresh_build.rglob("*.so"))
    assert len(built) == 1
    native.library.cache_clear()
    assert native.library() is not None and list(fresh_build.rglob("*.so")) == built  # reused, not rebuilt
    native.library.cache_clear()
    os.chmod(built[0], 0o777)  # writable by anyone: refused
    with pytest.warns(RuntimeWarning, match="writable by others"):
        assert native.library() is None
