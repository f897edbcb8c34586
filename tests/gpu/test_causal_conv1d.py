"""Triton causal convolution on a CUDA GPU against the float64 reference: outputs, final states, gradients.

Run on the device machine: ``python -m pytest -m gpu tests/gpu/test_causal_conv1d.py -q``.
"""

from __future__ import annotations

import pytest
import torch

from ssmkit.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update, triton_backward
from ssmkit.testing import assert_close, assert_outputs_and_grads_close, float64_leaf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LENGTHS = [1, 63, 1000, 4097]
# name -> (width, channel_last, bias, seq_idx kind, initial_states, activation)
CONFIGS = {
    "plain_silu_channel_last": (4, True, True, None, False, "silu"),
    "docs_init_channel_first": (4, False, True, "alternating", True, "silu"),
    "docs_init_width3_no_act": (3, True, False, "sorted", True, None),
    "init_width2": (2, True, True, None, True, "silu"),
}


def _seq_idx(kind: str | None, batch: int, length: int, device) -> torch.Tensor | None:
    if kind is None:
        return None
    change = torch.rand(batch, length, device=device) < min(0.3, 20 / length)
    if kind == "alternating":  # 0, 1, 0, 1, ...: a document index that reappears is a new document
        return (change.cumsum(1) % 2).to(torch.int32)
    return change.cumsum(1)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["generic", "shifted"])
def test_fn_matches_reference(kernel, dtype, length, config, monkeypatch):
    monkeypatch.setattr(triton_backward, "LAUNCH", triton_backward.BackwardLaunch(kernel=kernel))
    width, channel_last, bias, seq, init, activation = CONFIGS[config]
    batch, dim, dev = 2, 136, "cuda"  # 136: a partial channel block for both tile shapes
    x = (
        torch.randn(batch, length, dim, device=dev, dtype=dtype).transpose(1, 2)
        if channel_last
        else torch.randn(batch, dim, length, device=dev, dtype=dtype)
    )
    named = {
        "x": x.requires_grad_(),
        "weight": torch.randn(dim, width, device=dev, dtype=dtype, requires_grad=True),
        "bias": torch.randn(dim, device=dev, dtype=dtype, requires_grad=True) if bias else None,
        "initial_states": torch.randn(batch, dim, width - 1, device=dev, dtype=dtype, requires_grad=True)
        if init
        else None,
    }
    named64 = {k: float64_leaf(t) for k, t in named.items()}
    seq_idx = _seq_idx(seq, batch, length, dev)
    out, final = causal_conv1d_fn(
        named["x"], named["weight"], named["bias"], seq_idx, named["initial_states"], True, None, activation,
        backend="triton",
    )
    exp_out, exp_final = causal_conv1d_fn(
        named64["x"], named64["weight"], named64["bias"], seq_idx, named64["initial_states"], True, None, activation,
        backend="reference",
    )
    assert out.dtype == dtype and final.dtype == dtype
    if channel_last and length > 1:
        assert out.stride(1) == 1, "the output keeps x's channel-last layout"
    assert_outputs_and_grads_close([out, final], [exp_out, exp_final], named, named64, dtype,
                                   names=["out", "final_states"])


@pytest.mark.parametrize("width", [1, 6, 8])
def test_other_widths_float32(width):
    """Widths outside causal_conv1d's 2..4, with documents and initial states (forward and backward)."""
    batch, dim, length = 2, 40, 300
    x = torch.randn(batch, length, dim, device="cuda").transpose(1, 2).requires_grad_()
    weight = torch.randn(dim, width, device="cuda", requires_grad=True)
    init = torch.randn(batch, dim, width - 1, device="cuda", requires_grad=True)
    seq_idx = _seq_idx("alternating", batch, length, "cuda")
    out, final = causal_conv1d_fn(x, weight, None, seq_idx, init, True, None, "silu", backend="triton")
    x64, w64, i64 = float64_leaf(x), float64_leaf(weight), float64_leaf(init)
    exp_out, exp_final = causal_conv1d_fn(x64, w64, None, seq_idx, i64, True, None, "silu", backend="reference")
    assert_close(out, exp_out, name="out")
    assert_close(final, exp_final, name="final_states")
    g = torch.randn_like(exp_out)
    grads = torch.autograd.grad((out.double() * g).sum() + final.double().sum(), [x, weight, init], allow_unused=True)
    exp_grads = torch.autograd.grad((exp_out * g).sum() + exp_final.sum(), [x64, w64, i64], allow_unused=True)
    for name, got, exp in zip(("dx", "dweight", "dinit"), grads, exp_grads):
        if exp is None:
            assert got is None or not got.any(), name
        else:
            assert_close(got, exp, name=name)


def test_auto_uses_triton_on_cuda():
    x = torch.randn(2, 64, 50, device="cuda")
    weight, bias = torch.randn(64, 4, device="cuda"), torch.randn(64, device="cuda")
    auto = causal_conv1d_fn(x, weight, bias, activation="silu")
    assert torch.equal(auto, causal_conv1d_fn(x, weight, bias, activation="silu", backend="triton"))


@pytest.mark.parametrize("tokens", [0, 1, 5])
@pytest.mark.parametrize("extra_state", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_update_matches_reference(dtype, extra_state, tokens):
    batch, dim, width = 3, 200, 4
    state = torch.randn(batch, dim, width - 1 + extra_state, device="cuda", dtype=dtype)
    state64 = state.double()
    shape = (batch, dim, tokens) if tokens else (batch, dim)
    weight, bias = torch.randn(dim, width, device="cuda", dtype=dtype), torch.randn(dim, device="cuda", dtype=dtype)
    for _ in range(3):
        x = torch.randn(shape, device="cuda", dtype=dtype)
        out = causal_conv1d_update(x, state, weight, bias, "silu", backend="triton")
        exp = causal_conv1d_update(x.double(), state64, weight.double(), bias.double(), "silu", backend="reference")
        assert out.dtype == dtype and out.shape == x.shape
        assert_close(out, exp, dtype, name="out")
        assert_close(state, state64, dtype, name="conv_state")


def test_update_continues_fn():
    """Decoding from causal_conv1d_fn's final states gives the outputs of the longer sequence."""
    batch, dim, width, length = 2, 64, 4, 40
    x = torch.randn(batch, dim, length + 3, device="cuda")
    weight, bias = torch.randn(dim, width, device="cuda"), torch.randn(dim, device="cuda")
    full = causal_conv1d_fn(x, weight, bias, activation="silu", backend="triton")
    _, state = causal_conv1d_fn(x[..., :length], weight, bias, None, None, True, None, "silu", backend="triton")
    for t in range(length, length + 3):
        step = causal_conv1d_update(x[..., t], state, weight, bias, "silu", backend="triton")
        assert_close(step, full[..., t], name=f"step {t}")
