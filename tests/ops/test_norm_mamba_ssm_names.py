"""The gated norm under mamba_ssm's names: ``rmsnorm_fn`` and ``layernorm_fn`` (LayerNorm with bias)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssmkit.ops.norm import gated_rms_norm_fn, layernorm_fn, rmsnorm_fn
from ssmkit.testing import assert_outputs_and_grads_close, float64_leaf


def _group_layer_norm(x, weight, bias, eps, group_size):
    """torch's LayerNorm applied to each group of the last dimension, then the affine map."""
    groups = x.unflatten(-1, (x.shape[-1] // group_size, group_size))
    return F.layer_norm(groups, (group_size,), eps=eps).flatten(-2) * weight + bias


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("group_size", [None, 4])
def test_layernorm_without_gate_is_torch_layer_norm_per_group(backend, group_size):
    x = torch.randn(3, 5, 12, dtype=torch.float64) * 3 + 2
    weight, bias = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    got = layernorm_fn(x, weight, bias, eps=1e-5, group_size=group_size, backend=backend)
    expected = _group_layer_norm(x, weight, bias, 1e-5, group_size or 12)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_layernorm_gate_order(backend, norm_before_gate):
    x, z = torch.randn(4, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    weight, bias = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    got = layernorm_fn(x, weight, bias, z, 1e-6, 8, norm_before_gate, backend=backend)
    if norm_before_gate:
        expected = _group_layer_norm(x, weight, bias, 1e-6, 8) * F.silu(z)
    else:
        expected = _group_layer_norm(x * F.silu(z), weight, bias, 1e-6, 8)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate", [None, "before", "after"])
def test_layernorm_chunked_outputs_and_every_gradient_match_the_float64_reference(dtype, gate):
    shape, n = (3, 7, 24), 24
    named = {
        "x": (torch.randn(shape) * 2 + 1).to(dtype).requires_grad_(),
        "z": torch.randn(shape, dtype=dtype, requires_grad=True) if gate else None,
        "weight": (1 + 0.1 * torch.randn(n)).to(dtype).requires_grad_(),
        "bias": torch.randn(n, dtype=dtype, requires_grad=True),
    }
    named64 = {k: float64_leaf(t) for k, t in named.items()}
    before = gate != "after"
    out = layernorm_fn(named["x"], named["weight"], named["bias"], named["z"], 1e-5, 8, before, backend="chunked")
    exp = layernorm_fn(named64["x"], named64["weight"], named64["bias"], named64["z"], 1e-5, 8, before,
                       backend="reference")
    assert out.dtype == dtype
    assert_outputs_and_grads_close([out], [exp], named, named64, dtype)


def test_rmsnorm_fn_is_the_gated_rms_norm_in_mamba_ssm_argument_order():
    x, z, weight, bias = torch.randn(2, 3, 16), torch.randn(2, 3, 16), torch.randn(16), torch.randn(16)
    for before in (True, False):
        expected = gated_rms_norm_fn(x, z, weight, 1e-5, 4, before, bias=bias)
        assert torch.equal(rmsnorm_fn(x, weight, bias, z, 1e-5, 4, before), expected)
        assert torch.equal(layernorm_fn(x, weight, bias, z, 1e-5, 4, before, True), expected)
    assert torch.equal(rmsnorm_fn(x, weight, None), gated_rms_norm_fn(x, None, weight))


def test_names_arguments_in_errors():
    x = torch.randn(2, 12)
    with pytest.raises(ValueError, match="group_size"):
        layernorm_fn(x, torch.ones(12), torch.zeros(12), group_size=5)
    with pytest.raises(ValueError, match="bias"):
        rmsnorm_fn(x, torch.ones(12), torch.zeros(11))
    with pytest.raises(TypeError, match="is_rms_norm"):
        layernorm_fn(x, torch.ones(12), None, is_rms_norm="yes")
