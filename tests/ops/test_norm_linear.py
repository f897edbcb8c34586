"""rms_norm_linear: the definition (norm, round, linear, add) in float64, the Triton kernel in Triton's CPU
interpreter against it, the dispatcher's choices and its refusals. The GPU grid is tests/gpu/test_norm_linear.py.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from ssmkit.ops import decode_launch, gated_rms_norm_fn, rms_norm_fn
from ssmkit.ops.norm_linear import rms_norm_linear, rms_norm_linear_argmax
from ssmkit.testing import assert_close, report_checks, run_checks_in_interpreter

# name -> (rows, k, n, group_size, gate (None / "before" / "after"), dtype, residual dtype, bias)
CASES = {
    "one_row_plain_fp32": (1, 64, 40, None, None, "float32", None, True),
    "bf16_groups_gate_after_fp32_residual": (3, 96, 33, 32, "after", "bfloat16", "float32", False),
    "fp16_gate_before_residual": (8, 48, 16, 16, "before", "float16", "float16", True),
    "bf16_mamba2_130m_out_proj_shape": (1, 1536, 24, None, "after", "bfloat16", "float32", False),
    "odd_k_and_n": (5, 30, 17, 10, "after", "float32", "float32", True),
}


def _inputs(rows, k, n, group_size, gate, dtype, res_dtype, bias):
    dtype = getattr(torch, dtype)
    return dict(
        x=torch.randn(rows, k, dtype=dtype),
        norm_weight=(1 + 0.1 * torch.randn(k)).to(dtype),
        weight=(torch.randn(n, k) / k ** 0.5).to(dtype),
        bias=torch.randn(n, dtype=dtype) if bias else None,
        z=torch.randn(rows, k, dtype=dtype) if gate else None,
        group_size=group_size,
        norm_before_gate=gate == "before",
        residual=torch.randn(rows, n, dtype=getattr(torch, res_dtype)) if res_dtype else None,
    )


def _f64(inp):
    return {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inp.items()}


def check_triton(*case) -> None:
    inp = _inputs(*case)
    got = rms_norm_linear(**inp, backend="triton")
    unfused = rms_norm_linear(**inp, backend="chunked")
    exp = rms_norm_linear(**_f64(inp), backend="reference")
    assert got.dtype == unfused.dtype and got.shape == unfused.shape
    # The error is the weight dtype's: the normalised activations and the matmul are rounded to it.
    assert_close(got, exp, inp["weight"].dtype, name="out")
    assert_close(got, unfused, inp["weight"].dtype, name="out vs unfused")


def check_strided_rows() -> None:
    """A view with a row stride (a slice of a wider activation, as in a decode step) reads correctly."""
    wide = torch.randn(2, 100)
    x, z = wide[:, :40], wide[:, 50:90]
    w, nw = torch.randn(24, 40), torch.rand(40) + 0.5
    got = rms_norm_linear(x, nw, w, z=z, group_size=20, backend="triton")
    exp = rms_norm_linear(x.double(), nw.double(), w.double(), z=z.double(), group_size=20, backend="reference")
    assert_close(got, exp, torch.float32, name="strided")


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_is_the_unfused_layer_ops(case):
    """The definition equals gated_rms_norm_fn / rms_norm_fn -> cast -> F.linear -> + residual."""
    inp = _inputs(*CASES[case])
    got = rms_norm_linear(**inp, backend="reference")
    if inp["z"] is None and inp["group_size"] is None:
        normed = rms_norm_fn(inp["x"], inp["norm_weight"], eps=1e-5)
    else:
        normed = gated_rms_norm_fn(inp["x"], inp["z"], inp["norm_weight"], 1e-5, inp["group_size"],
                                   inp["norm_before_gate"])
    exp = F.linear(normed.to(inp["weight"].dtype), inp["weight"], inp["bias"])
    if inp["residual"] is not None:
        exp = inp["residual"] + exp
    assert got.dtype == exp.dtype
    assert_close(got, exp, inp["weight"].dtype, name="reference")
    chunked = rms_norm_linear(**inp, backend="chunked")
    assert chunked.dtype == exp.dtype
    assert_close(chunked, exp, inp["weight"].dtype, name="chunked")


def test_triton_matches_reference_in_interpreter():
    run_checks_in_interpreter(__file__, "all")


def test_auto_on_cpu_is_the_unfused_ops():
    inp = _inputs(*CASES["odd_k_and_n"])
    assert torch.equal(rms_norm_linear(**inp), rms_norm_linear(**inp, backend="chunked"))


def test_gradients_flow_through_the_unfused_path():
    x = torch.randn(2, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    rms_norm_linear(x, torch.ones(16), w).sum().backward()
    assert x.grad is not None and w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("bad, message", [
    (dict(x=torch.randn(2, 3, 16)), "x must have shape"),
    (dict(x=torch.randn(0, 16)), "empty row"),
    (dict(z=torch.randn(2, 15)), "z must have shape"),
    (dict(norm_weight=torch.ones(15)), "norm_weight must have shape"),
    (dict(weight=torch.randn(8, 15)), "weight must have shape"),
    (dict(bias=torch.randn(7)), "bias must have shape"),
    (dict(residual=torch.randn(2, 7)), "residual must have shape"),
    (dict(group_size=5), "group_size must be a positive divisor"),
    (dict(eps=-1.0), "eps must be"),
    (dict(x=torch.ones(2, 16, dtype=torch.long)), "floating-point"),
    (dict(backend="fast"), "backend must be one of"),
])
def test_bad_input_is_refused(bad, message):
    args = dict(x=torch.randn(2, 16), norm_weight=torch.ones(16), weight=torch.randn(8, 16))
    args.update(bad)
    with pytest.raises((TypeError, ValueError), match=message):
        rms_norm_linear(**args)


def test_triton_backend_refuses_what_it_does_not_do(monkeypatch):
    """Too many rows, too long a row or a gradient: a clear error (auto takes the unfused path)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="at most 8 rows of at most 8192 features"):
        rms_norm_linear(torch.randn(9, 16), torch.ones(16), torch.randn(8, 16), backend="triton")
    with pytest.raises(ValueError, match="at most 8192 features"):
        rms_norm_linear(torch.randn(1, 8200), torch.ones(8200), torch.randn(8, 8200), backend="triton")
    with pytest.raises(ValueError, match="no autograd"):
        rms_norm_linear(torch.randn(1, 16, requires_grad=True), torch.ones(16), torch.randn(8, 16), backend="triton")


def check_no_norm(rows, k, n, dtype, res_dtype, bias) -> None:
    """norm_weight=None: residual + linear(x), a Mamba block's out_proj and add."""
    dtype = getattr(torch, dtype)
    x, w = torch.randn(rows, k, dtype=dtype), (torch.randn(n, k) / k ** 0.5).to(dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    r = torch.randn(rows, n, dtype=getattr(torch, res_dtype)) if res_dtype else None
    got = rms_norm_linear(x, None, w, b, residual=r, backend="triton")
    exp = rms_norm_linear(x.double(), None, w.double(), None if b is None else b.double(),
                          residual=None if r is None else r.double(), backend="reference")
    assert got.dtype == rms_norm_linear(x, None, w, b, residual=r, backend="chunked").dtype
    assert_close(got, exp, dtype, name="no norm")


def _head(rows, k, n, dtype):
    dtype = getattr(torch, dtype)
    return (torch.randn(rows, k), (1 + 0.1 * torch.randn(k)).to(dtype), (torch.randn(n, k) / k ** 0.5).to(dtype))


def check_argmax(rows, k, n, vocab, dtype) -> None:
    """The greedy token is the unfused head's argmax; its float64 logit is within rounding of the best."""
    x, nw, w = _head(rows, k, n, dtype)
    got = rms_norm_linear_argmax(x, nw, w, vocab_size=vocab, backend="triton")
    assert got.dtype == torch.int64 and got.shape == (rows,) and bool((got < vocab).all())
    logits = rms_norm_linear(x.double(), nw.double(), w.double(), backend="reference")[:, :vocab]
    best = logits.max(-1).values
    picked = logits.gather(1, got[:, None]).squeeze(1)
    # The kernel's logits are rounded to the weight's dtype: within a few of its ulps of the best.
    tol = 4 * torch.finfo(w.dtype).eps * best.abs().clamp(min=1)
    assert bool((picked >= best - tol).all()), (got, logits.argmax(-1))
    unfused = rms_norm_linear_argmax(x, nw, w, vocab_size=vocab, backend="chunked")
    agree = logits.gather(1, unfused[:, None]).squeeze(1)
    assert bool((agree >= best - tol).all())


def check_argmax_order() -> None:
    """Ties go to the lowest index, a NaN logit wins (the first), padding past vocab_size never does."""
    k, n = 16, 40
    x, nw = torch.ones(3, k), torch.ones(k)
    w = torch.zeros(n, k)
    w[[7, 21, 30], 0] = 1.0          # row 0: tie between 7, 21 and 30 -> 7
    w[35, 0] = 5.0                   # past vocab_size 32: never picked
    got = rms_norm_linear_argmax(x, nw, w, vocab_size=32, backend="triton")
    assert got.tolist() == [7, 7, 7], got
    x = torch.ones(1, k)
    w[12, 1], w[25, 1] = float("nan"), float("nan")
    assert rms_norm_linear_argmax(x, nw, w, vocab_size=32, backend="triton").tolist() == [12]
    assert rms_norm_linear_argmax(x, nw, w, vocab_size=32, backend="chunked").tolist() == [12]
    w = torch.zeros(n, k)
    w[:, 0] = -torch.inf                 # every logit -inf: index 0, as torch.argmax
    assert rms_norm_linear_argmax(x, nw, w, backend="triton").tolist() == [0]


def check_launch_variants() -> None:
    """Every variant of the launch table (tile sizes, warps) gives the same results; PDL is off here."""
    inp = _inputs(*CASES["bf16_groups_gate_after_fp32_residual"])
    x, nw, w = _head(2, 48, 300, "bfloat16")
    base = rms_norm_linear(**inp, backend="triton"), rms_norm_linear_argmax(x, nw, w, vocab_size=290, backend="triton")
    for name in decode_launch.VARIANTS:
        with decode_launch.use(name):
            assert torch.equal(rms_norm_linear(**inp, backend="triton"), base[0]), name
            assert torch.equal(rms_norm_linear_argmax(x, nw, w, vocab_size=290, backend="triton"), base[1]), name


def _main(group: str) -> None:
    checks = {name: (check_triton, case) for name, case in CASES.items()}
    checks["strided_rows"] = (check_strided_rows, ())
    checks["no_norm_bf16_fp32_residual"] = (check_no_norm, (2, 48, 30, "bfloat16", "float32", False))
    checks["no_norm_fp32_bias"] = (check_no_norm, (1, 33, 17, "float32", None, True))
    checks["argmax_bf16_rows"] = (check_argmax, (3, 64, 1000, 997, "bfloat16"))
    checks["argmax_fp32_odd"] = (check_argmax, (1, 30, 77, 77, "float32"))
    checks["argmax_fp16_many_programs"] = (check_argmax, (2, 1024, 300, 290, "float16"))
    checks["argmax_order"] = (check_argmax_order, ())
    checks["launch_variants"] = (check_launch_variants, ())
    report_checks(checks)


if __name__ == "__main__":
    _main(sys.argv[1])
