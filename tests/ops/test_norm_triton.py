"""Triton RMS norm kernels in Triton's CPU interpreter against the float64 reference.

The interpreter has to be switched on (TRITON_INTERPRET=1) before triton is imported, so each test
runs a group of tiny cases in a subprocess (this file run as a script) and fails with the message of
every case that failed. The full grid on a GPU is tests/gpu/test_norm.py.
"""

from __future__ import annotations

import sys

import pytest
import torch

from ssmkit.ops.norm import gated_rms_norm_fn, layernorm_fn, rms_norm_fn
from ssmkit.testing import (
    assert_close,
    assert_outputs_and_grads_close,
    float64_leaf,
    report_checks,
    run_checks_in_interpreter,
)

# name -> (shape, dtype, group_size, gate (None / "before" / "after"), bias, LayerNorm (layernorm_fn))
GATED_CASES = {
    "groups_gate_before": ((3, 5, 32), "float32", 8, "before", True, False),
    "one_group_gate_after": ((7, 24), "float32", None, "after", False, False),
    "no_gate_odd_group": ((4, 30), "float32", 10, None, True, False),
    "bfloat16_groups": ((2, 5, 24), "bfloat16", 8, "after", True, False),
    "float16_gate_before": ((9, 16), "float16", 16, "before", False, False),
    "float64_groups": ((2, 3, 24), "float64", 12, "after", True, False),
    "layernorm_groups_gate_after": ((3, 5, 30), "float32", 10, "after", True, True),
    "layernorm_gate_before_odd": ((7, 20), "float32", None, "before", False, True),
    "layernorm_bfloat16": ((2, 5, 24), "bfloat16", 8, None, True, True),
}
# name -> (shape, dtype, residual (None / "same" / "float32"), bias, prenorm, residual_in_fp32)
PLAIN_CASES = {
    "residual_prenorm": ((3, 5, 24), "float32", "same", True, True, False),
    "no_residual": ((9, 20), "float32", None, False, False, False),
    "bfloat16_fp32_residual": ((9, 20), "bfloat16", "float32", True, True, False),
    "float16_residual_in_fp32": ((4, 33), "float16", "same", False, True, True),
}


def check_gated(shape, dtype, group_size, gate, bias, layer) -> None:
    dtype = getattr(torch, dtype)
    n = shape[-1]
    named = {
        "x": torch.randn(shape, dtype=dtype, requires_grad=True),
        "z": torch.randn(shape, dtype=dtype, requires_grad=True) if gate else None,
        "weight": (1 + 0.1 * torch.randn(n)).to(dtype).requires_grad_(),
        "bias": torch.randn(n, dtype=dtype, requires_grad=True) if bias else None,
    }
    named64 = {k: float64_leaf(t) for k, t in named.items()}
    before = gate != "after"
    if layer:
        out = layernorm_fn(named["x"], named["weight"], named["bias"], named["z"], 1e-5, group_size, before,
                           backend="triton")
        exp = layernorm_fn(named64["x"], named64["weight"], named64["bias"], named64["z"], 1e-5, group_size,
                           before, backend="reference")
    else:
        out = gated_rms_norm_fn(named["x"], named["z"], named["weight"], 1e-5, group_size, before,
                                bias=named["bias"], backend="triton")
        exp = gated_rms_norm_fn(named64["x"], named64["z"], named64["weight"], 1e-5, group_size, before,
                                bias=named64["bias"], backend="reference")
    assert out.dtype == dtype and out.shape == shape
    assert_outputs_and_grads_close([out], [exp], named, named64, dtype)


def check_plain(shape, dtype, residual, bias, prenorm, residual_in_fp32) -> None:
    dtype = getattr(torch, dtype)
    n = shape[-1]
    res_dtype = dtype if residual == "same" else torch.float32
    named = {
        "x": torch.randn(shape, dtype=dtype, requires_grad=True),
        "weight": (1 + 0.1 * torch.randn(n)).to(dtype).requires_grad_(),
        "bias": torch.randn(n, dtype=dtype, requires_grad=True) if bias else None,
        "residual": torch.randn(shape, dtype=res_dtype, requires_grad=True) if residual else None,
    }
    named64 = {k: float64_leaf(t) for k, t in named.items()}
    args = (named["x"], named["weight"], named["bias"], named["residual"], prenorm, residual_in_fp32, 1e-5)
    got = rms_norm_fn(*args, backend="triton")
    chunked = rms_norm_fn(*args, backend="chunked")
    exp = rms_norm_fn(named64["x"], named64["weight"], named64["bias"], named64["residual"], prenorm,
                      residual_in_fp32, 1e-5, backend="reference")
    got, chunked, exp = ([t] if not prenorm else list(t) for t in (got, chunked, exp))
    assert [t.dtype for t in got] == [t.dtype for t in chunked], "dtypes as the chunked backend"
    assert_outputs_and_grads_close(got, exp, named, named64, dtype)


def check_edge_cases() -> None:
    """Only the residual stream used (no gradient for out), and a transposed (non-contiguous) input."""
    x, res = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    _, h = rms_norm_fn(x, torch.ones(16), None, res, True, backend="triton")
    h.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and torch.equal(res.grad, torch.ones_like(res))
    x, z, w = torch.randn(16, 6).t(), torch.randn(6, 16), torch.randn(16)
    out = gated_rms_norm_fn(x, z, w, group_size=8, backend="triton")
    exp = gated_rms_norm_fn(x.double(), z.double(), w.double(), group_size=8, backend="reference")
    assert_close(out, exp, torch.float32, name="transposed x")


def check_first_order_only() -> None:
    """The backward is first-order only: a gradient penalty through it fails, not with the norm's terms left out
    (its gradients would come back as constants and cut the chain for every node before it)."""
    x, z = (torch.randn(3, 16, requires_grad=True) for _ in range(2))
    w = torch.randn(16)
    out = gated_rms_norm_fn(x, z, w, group_size=8, backend="triton")
    dx, = torch.autograd.grad(out.pow(2).sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (dx.pow(2).sum() + x.sum()).backward()


@pytest.mark.parametrize("group", ["gated", "plain"])
def test_triton_matches_reference_in_interpreter(group):
    run_checks_in_interpreter(__file__, group)


def _main(group: str) -> None:
    if group == "gated":
        checks = {name: (check_gated, case) for name, case in GATED_CASES.items()}
    else:
        checks = {name: (check_plain, case) for name, case in PLAIN_CASES.items()}
        checks["edge_cases"] = (check_edge_cases, ())
        checks["first_order_only"] = (check_first_order_only, ())
    report_checks(checks)


if __name__ == "__main__":
    _main(sys.argv[1])
