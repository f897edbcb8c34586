"""Triton RMS norms on a CUDA GPU against the float64 reference: outputs, residual stream, gradients.

Run on the device machine: ``python -m pytest -m gpu tests/gpu/test_norm.py -q``.
"""

from __future__ import annotations

import pytest
import torch

from ssmkit.ops.norm import gated_rms_norm_fn, rms_norm_fn
from ssmkit.testing import assert_outputs_and_grads_close, float64_leaf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1, 64), (2, 1000, 96), (4097, 256)]


def _gated(shape, dtype, group_size, gate, bias, eps=1e-5):
    n = shape[-1]
    named = {
        "x": torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True),
        "z": torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) if gate else None,
        "weight": (1 + 0.1 * torch.randn(n, device="cuda")).to(dtype).requires_grad_(),
        "bias": torch.randn(n, device="cuda", dtype=dtype, requires_grad=True) if bias else None,
    }
    named64 = {k: float64_leaf(t) for k, t in named.items()}
    before = gate != "after"
    out = gated_rms_norm_fn(named["x"], named["z"], named["weight"], eps, group_size, before, bias=named["bias"],
                            backend="triton")
    exp = gated_rms_norm_fn(named64["x"], named64["z"], named64["weight"], eps, group_size, before,
                            bias=named64["bias"], backend="reference")
    assert out.dtype == dtype and out.shape == shape
    assert_outputs_and_grads_close([out], [exp], named, named64, dtype)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gate", [None, "before", "after"])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_matches_reference(dtype, shape, group_size, gate, bias):
    _gated(shape, dtype, group_size, gate, bias)


@pytest.mark.parametrize("group_size", [4096, 512, 1000])
def test_gated_large_groups_bfloat16(group_size):
    """The benchmark's group sizes (one 4096-wide group in registers), and a non power of two."""
    n = 4096 if group_size != 1000 else 3000
    _gated((300, n), torch.bfloat16, group_size, "after", False)


@pytest.mark.parametrize("residual", [None, "same", "float32"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference(dtype, shape, residual):
    n = shape[-1]
    named = {
        "x": torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True),
        "weight": (1 + 0.1 * torch.randn(n, device="cuda")).to(dtype).requires_grad_(),
        "bias": torch.randn(n, device="cuda", dtype=dtype, requires_grad=True),
        "residual": torch.randn(shape, device="cuda", dtype=dtype if residual == "same" else torch.float32,
                                requires_grad=True) if residual else None,
    }
    named64 = {k: float64_leaf(t) for k, t in named.items()}
    for prenorm, residual_in_fp32 in ((False, False), (True, False), (True, True)):
        args = (named["x"], named["weight"], named["bias"], named["residual"], prenorm, residual_in_fp32, 1e-5)
        got = rms_norm_fn(*args, backend="triton")
        chunked = rms_norm_fn(*args, backend="chunked")
        exp = rms_norm_fn(named64["x"], named64["weight"], named64["bias"], named64["residual"], prenorm,
                          residual_in_fp32, 1e-5, backend="reference")
        got, chunked, exp = ([t] if not prenorm else list(t) for t in (got, chunked, exp))
        assert [t.dtype for t in got] == [t.dtype for t in chunked], "dtypes as the chunked backend"
        assert_outputs_and_grads_close(got, exp, named, named64, dtype)


def test_nan_stays_in_its_group():
    x = torch.randn(4, 64, device="cuda")
    x[1, 5] = float("nan")
    out = gated_rms_norm_fn(x, torch.randn_like(x), torch.ones(64, device="cuda"), group_size=16, backend="triton")
    assert torch.isnan(out[1, :16]).all() and not torch.isnan(out[1, 16:]).any() and not torch.isnan(out[[0, 2, 3]]).any()


def test_auto_uses_triton_on_cuda():
    x, z, w = (torch.randn(8, 128, device="cuda") for _ in range(3))
    w = w[0]
    assert torch.equal(gated_rms_norm_fn(x, z, w, group_size=64), gated_rms_norm_fn(x, z, w, group_size=64, backend="triton"))


def test_too_large_group_is_refused():
    x = torch.randn(2, 32768, device="cuda")
    with pytest.raises(ValueError, match="backend='chunked'"):
        gated_rms_norm_fn(x, None, torch.ones(32768, device="cuda"), backend="triton")
