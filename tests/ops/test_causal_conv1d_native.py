"""The native one-token convolution update (ops/causal_conv1d/native.py) against the reference update."""

import pytest
import torch

from ssmkit.ops import causal_conv1d_update
from ssmkit.ops.causal_conv1d.native import native_conv_step
from ssmkit.ops.native import library

pytestmark = pytest.mark.skipif(library() is None, reason="no C compiler here: the native kernels are not built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("b,c,w,bias", [(1, 16, 4, True), (3, 37, 2, False), (2, 8, 5, True)])
def test_native_conv_step_equals_the_reference(dtype, b, c, w, bias):
    gen = torch.Generator().manual_seed(c * 10 + w)
    weight, b_ = torch.randn(c, w, generator=gen), torch.randn(c, generator=gen) if bias else None
    window = torch.randn(b, c, w, generator=gen).to(dtype)
    packed = torch.randn(b, 2 * c, generator=gen).to(dtype)  # x as a slice of a projection's output
    x = packed[:, c:]
    expected_window = window.double()  # a copy, updated by the reference
    expected = causal_conv1d_update(x.double(), expected_window, weight.double(),
                                    None if b_ is None else b_.double(), activation="silu")
    step = native_conv_step(weight, b_)
    ptr = window.data_ptr()
    out = step(x.float(), window)
    assert window.data_ptr() == ptr and window.dtype == dtype  # shifted in place, in its dtype
    assert torch.equal(window, expected_window.to(dtype))  # bfloat16 inputs are stored exactly
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)
