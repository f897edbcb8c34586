"""Tests for ssmkit.ops.norm: the fused fast path against the plain formulas, and against transformers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.ops.norm import gated_rms_norm_fn, rms_norm_fn
from ssmkit.testing import assert_close

BACKENDS = ("reference", "chunked")
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(2, 63, 48), (1, 1, 48), (257, 48)]


def _f64(t):
    return t.double() if t is not None else None


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("residual_kind", [None, "same", "float32"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference(dtype, shape, residual_kind, with_bias):
    n = shape[-1]
    x = torch.randn(shape, dtype=dtype)
    weight = (1 + 0.1 * torch.randn(n)).to(dtype)
    bias = torch.randn(n, dtype=dtype) if with_bias else None
    residual = None
    if residual_kind is not None:
        residual = torch.randn(shape, dtype=dtype if residual_kind == "same" else torch.float32)
    for residual_in_fp32 in (False, True):
        exp_out, exp_res = rms_norm_fn(
            _f64(x), _f64(weight), _f64(bias), _f64(residual), True, residual_in_fp32, 1e-5, backend="reference"
        )
        for backend in BACKENDS:
            out, res = rms_norm_fn(x, weight, bias, residual, True, residual_in_fp32, 1e-5, backend=backend)
            assert out.dtype == dtype
            res_dtype = residual.dtype if residual is not None else dtype
            assert res.dtype == (torch.promote_types(res_dtype, torch.float32) if residual_in_fp32 else res_dtype)
            assert_close(out, exp_out, dtype, name=f"{backend} out")
            assert_close(res, exp_res, res.dtype, name=f"{backend} residual")
            assert torch.equal(rms_norm_fn(x, weight, bias, residual, eps=1e-5, backend=backend), out)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("gate", [None, "before", "after"])
@pytest.mark.parametrize("group_size", [None, 16, 8])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_rms_norm_matches_reference(dtype, shape, group_size, gate, with_bias):
    n = shape[-1]
    x = torch.randn(shape, dtype=dtype)
    z = torch.randn(shape, dtype=dtype) if gate else None
    weight = (1 + 0.1 * torch.randn(n)).to(dtype)
    bias = torch.randn(n, dtype=dtype) if with_bias else None
    before = gate != "after"
    expected = gated_rms_norm_fn(_f64(x), _f64(z), _f64(weight), 1e-5, group_size, before, bias=_f64(bias),
                                 backend="reference")
    for backend in BACKENDS:
        out = gated_rms_norm_fn(x, z, weight, 1e-5, group_size, before, bias=bias, backend=backend)
        assert out.dtype == dtype
        assert_close(out, expected, dtype, name=f"{backend} out")


def test_formulas_on_a_hand_example():
    x = torch.tensor([[3.0, 4.0, 0.0, 2.0]])
    weight = torch.tensor([1.0, 2.0, 3.0, 4.0])
    for backend in BACKENDS:
        # mean square 29/4 over the row; 25/2 and 2 over the groups of two.
        assert_close(rms_norm_fn(x, weight, eps=0.0, backend=backend), x * weight / (29 / 4) ** 0.5)
        grouped = gated_rms_norm_fn(x, None, weight, eps=0.0, group_size=2, backend=backend)
        assert_close(grouped, torch.tensor([[3 / 12.5**0.5, 8 / 12.5**0.5, 0.0, 8 / 2**0.5]]))
        z = torch.tensor([[0.0, 100.0, 100.0, 100.0]])
        after = gated_rms_norm_fn(x, z, weight, eps=0.0, group_size=2, norm_before_gate=False, backend=backend)
        # silu(0) = 0 empties one entry of each group, the other normalises to sqrt(2) times its weight.
        assert_close(after, torch.tensor([[0.0, 2.0, 0.0, 4.0]]) * 2**0.5)


def test_grouped_norm_is_the_norm_of_each_group():
    x, z = torch.randn(3, 5, 24, dtype=torch.float64), torch.randn(3, 5, 24, dtype=torch.float64)
    weight, bias = torch.randn(24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    for before in (True, False):
        out = gated_rms_norm_fn(x, z, weight, 1e-5, 8, before, bias=bias)
        for g in range(3):
            s = slice(8 * g, 8 * g + 8)
            alone = gated_rms_norm_fn(x[..., s], z[..., s], weight[s], 1e-5, None, before, bias=bias[s])
            assert_close(out[..., s], alone, name=f"group {g}")


def test_prenorm_without_residual_returns_x():
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    for backend in BACKENDS:
        _, res = rms_norm_fn(x, torch.ones(32), prenorm=True, backend=backend)
        assert res.dtype == torch.bfloat16 and torch.equal(res, x)
        _, res = rms_norm_fn(x, torch.ones(32), prenorm=True, residual_in_fp32=True, backend=backend)
        assert res.dtype == torch.float32 and torch.equal(res, x.float())


def test_inputs_are_not_modified():
    x, z, residual = torch.randn(4, 8, 32), torch.randn(4, 8, 32), torch.randn(4, 8, 32)
    weight, bias = torch.randn(32), torch.randn(32)
    copies = [t.clone() for t in (x, z, residual, weight, bias)]
    for backend in BACKENDS:
        rms_norm_fn(x, weight, bias, residual, prenorm=True, backend=backend)
        for before in (True, False):
            gated_rms_norm_fn(x, z, weight, group_size=8, norm_before_gate=before, bias=bias, backend=backend)
    for t, c in zip((x, z, residual, weight, bias), copies):
        assert torch.equal(t, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_gradcheck(backend):
    x, residual = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    weight, bias = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    tensors = tuple(t.requires_grad_() for t in (x, weight, bias, residual))

    def fn(x, weight, bias, residual):
        return rms_norm_fn(x, weight, bias, residual, prenorm=True, eps=1e-5, backend=backend)

    assert torch.autograd.gradcheck(fn, tensors)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm_fn(x, w, backend=backend), (x, weight))


@pytest.mark.parametrize("group_size", [None, 3])
@pytest.mark.parametrize("gate", [None, "before", "after"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_rms_norm_gradcheck(backend, gate, group_size):
    x, z = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    weight, bias = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    for t in (x, z, weight, bias):
        t.requires_grad_()

    def fn(x, z, weight, bias):
        return gated_rms_norm_fn(x, z if gate else None, weight, 1e-5, group_size, gate != "after", bias=bias,
                                 backend=backend)

    assert torch.autograd.gradcheck(fn, (x, z, weight, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_gradients_match_reference(dtype):
    shape, n = (3, 21, 64), 64
    x, z, residual = (torch.randn(shape, dtype=dtype) for _ in range(3))
    weight, bias = (1 + 0.1 * torch.randn(n)).to(dtype), torch.randn(n, dtype=dtype)
    grad_out, grad_res = torch.randn(shape, dtype=dtype), torch.randn(shape)
    leaves = [t.requires_grad_() for t in (x, z, weight, bias, residual)]

    def run(backend, ins, before):
        x, z, weight, bias, residual = ins
        out, res = rms_norm_fn(x, weight, bias, residual, prenorm=True, residual_in_fp32=True, backend=backend)
        gated = gated_rms_norm_fn(out, z, weight, 1e-5, 16, before, bias=bias, backend=backend)
        return torch.autograd.grad((gated, res), ins, (grad_out.to(gated.dtype), grad_res.to(res.dtype)))

    for before in (True, False):
        got = run("chunked", leaves, before)
        want = run("reference", [t.detach().double().requires_grad_() for t in leaves], before)
        for name, g, w in zip(("x", "z", "weight", "bias", "residual"), got, want):
            assert g.dtype == dtype
            assert_close(g, w, dtype, name=f"d{name} (norm_before_gate={before})")


@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    groups=st.integers(1, 4),
    group_size=st.integers(1, 9),
    explicit_group=st.booleans(),
    gate=st.sampled_from([None, "before", "after"]),
    with_bias=st.booleans(),
    with_residual=st.booleans(),
    eps=st.sampled_from([0.0, 1e-6, 1e-2]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_chunked_matches_reference(lead, groups, group_size, explicit_group, gate, with_bias, with_residual,
                                        eps, seed):
    torch.manual_seed(seed)
    n = groups * group_size
    shape = (*lead, n)
    x, z = torch.randn(shape, dtype=torch.float64, requires_grad=True), torch.randn(shape, dtype=torch.float64)
    residual = torch.randn(shape, dtype=torch.float64) if with_residual else None
    weight = torch.randn(n, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n, dtype=torch.float64) if with_bias else None
    gs = group_size if explicit_group or groups == 1 else None
    results = {}
    for backend in BACKENDS:
        out, res = rms_norm_fn(x, weight, bias, residual, True, False, eps, backend=backend)
        gated = gated_rms_norm_fn(x, z if gate else None, weight, eps, gs, gate != "after", bias=bias, backend=backend)
        results[backend] = (out, res, gated, *torch.autograd.grad(out.sum() + (gated * gated).sum(), (x, weight)))
    for name, got, want in zip(("out", "residual", "gated", "dx", "dweight"), results["chunked"], results["reference"]):
        assert_close(got, want, name=name)


def test_matches_transformers_norms():
    from transformers.models.mamba import modeling_mamba
    from transformers.models.mamba2 import modeling_mamba2

    # transformers 5.x renamed MambaRMSNormGated to Mamba2RMSNormGated; same function.
    MambaRMSNormGated = getattr(modeling_mamba2, "Mamba2RMSNormGated", None) or getattr(
        modeling_mamba2, "MambaRMSNormGated", None)
    MambaRMSNorm = getattr(modeling_mamba, "MambaRMSNorm", None)
    if MambaRMSNormGated is None or MambaRMSNorm is None:
        pytest.skip("this transformers release has neither Mamba2RMSNormGated nor MambaRMSNormGated")
    x, gate = torch.randn(2, 7, 64), torch.randn(2, 7, 64)
    gated = MambaRMSNormGated(64, group_size=16, eps=1e-5)
    plain = MambaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        gated.weight.normal_()
        plain.weight.normal_()
        for backend in BACKENDS:
            out = gated_rms_norm_fn(x, gate, gated.weight, 1e-5, 16, norm_before_gate=False, backend=backend)
            assert_close(out, gated(x, gate), name="MambaRMSNormGated")
            assert_close(rms_norm_fn(x, plain.weight, eps=1e-5, backend=backend), plain(x), name="MambaRMSNorm")
            # bfloat16: transformers rounds before the weight, ssmkit after: within one bfloat16 rounding.
            xb, gb = x.bfloat16(), gate.bfloat16()
            out = gated_rms_norm_fn(xb, gb, gated.weight, 1e-5, 16, norm_before_gate=False, backend=backend)
            assert out.dtype == torch.bfloat16
            assert_close(out, gated(xb, gb), torch.bfloat16, name="MambaRMSNormGated bf16")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_x_poisons_its_row_or_group(backend):
    x, z, residual = torch.randn(3, 12), torch.randn(3, 12), torch.randn(3, 12)
    x[1, 5] = float("nan")
    out, res = rms_norm_fn(x, torch.randn(12), residual=residual, prenorm=True, backend=backend)
    assert out.isnan().any(dim=1).tolist() == [False, True, False] and out[1].isnan().all()
    assert res.isnan().nonzero().tolist() == [[1, 5]]
    for before in (True, False):
        out = gated_rms_norm_fn(x, z, torch.randn(12), group_size=4, norm_before_gate=before, backend=backend)
        expected = torch.zeros(3, 12, dtype=torch.bool)
        expected[1, 4:8] = True
        assert torch.equal(out.isnan(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_z_weight_bias(backend):
    x, z = torch.randn(3, 12), torch.randn(3, 12)
    z[0, 2] = float("nan")
    group = torch.zeros(3, 12, dtype=torch.bool)
    group[0, 0:4] = True
    single = torch.zeros(3, 12, dtype=torch.bool)
    single[0, 2] = True
    weight = torch.randn(12)
    assert torch.equal(gated_rms_norm_fn(x, z, weight, group_size=4, backend=backend).isnan(), single)
    after = gated_rms_norm_fn(x, z, weight, group_size=4, norm_before_gate=False, backend=backend)
    assert torch.equal(after.isnan(), group)
    weight[7] = float("nan")
    bias = torch.randn(12)
    bias[9] = float("nan")
    column = torch.zeros(3, 12, dtype=torch.bool)
    column[:, [7, 9]] = True
    assert torch.equal(rms_norm_fn(x, weight, bias, backend=backend).isnan(), column)
    assert torch.equal(gated_rms_norm_fn(x, None, weight, group_size=4, bias=bias, backend=backend).isnan(), column)


def _bad_rms_cases():
    x, w = torch.randn(2, 5, 8), torch.randn(8)
    ok = dict(x=x, weight=w)
    return [
        (dict(ok, x=torch.tensor(1.0)), ValueError, "x must have shape"),
        (dict(ok, x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (dict(ok, x=torch.ones(2, 8, dtype=torch.int32)), TypeError, "x must be a floating"),
        (dict(ok, x=torch.randn(0, 5, 8)), ValueError, "x has an empty leading"),
        (dict(ok, x=torch.randn(2, 5, 0), weight=torch.randn(0)), ValueError, "x has an empty last"),
        (dict(ok, weight=torch.randn(7)), ValueError, "weight must have shape"),
        (dict(ok, weight=torch.randn(1, 8)), ValueError, "weight must have shape"),
        (dict(ok, bias=torch.randn(9)), ValueError, "bias must have shape"),
        (dict(ok, residual=torch.randn(2, 4, 8)), ValueError, "residual must have shape"),
        (dict(ok, residual=torch.randn(5, 8)), ValueError, "residual must have shape"),
        (dict(ok, residual=torch.ones(2, 5, 8, dtype=torch.long)), TypeError, "residual must be a floating"),
        (dict(ok, residual=torch.randn(2, 5, 8, device="meta")), ValueError, "residual"),
        (dict(ok, weight=torch.randn(8, device="meta")), ValueError, "weight"),
        (dict(ok, prenorm=1), TypeError, "prenorm must be a bool"),
        (dict(ok, residual_in_fp32=None), TypeError, "residual_in_fp32 must be a bool"),
        (dict(ok, eps=-1.0), ValueError, "eps must be"),
        (dict(ok, eps="small"), ValueError, "eps must be"),
        (dict(ok, backend="gpu"), ValueError, "backend must be one of"),
        (dict(ok, backend="triton"), ValueError, "backend='triton'"),
    ]


@pytest.mark.parametrize("kwargs, error, message", _bad_rms_cases())
def test_rms_norm_bad_inputs(kwargs, error, message):
    with pytest.raises(error, match=message):
        rms_norm_fn(**kwargs)


def _bad_gated_cases():
    x, z, w = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(8)
    ok = dict(x=x, z=z, weight=w)
    return [
        (dict(ok, z=torch.randn(2, 5, 4)), ValueError, "z must have shape"),
        (dict(ok, z=torch.ones(2, 5, 8, dtype=torch.int64)), TypeError, "z must be a floating"),
        (dict(ok, z=torch.randn(2, 5, 8, device="meta")), ValueError, "z"),
        (dict(ok, weight=torch.randn(4)), ValueError, "weight must have shape"),
        (dict(ok, bias=torch.randn(4)), ValueError, "bias must have shape"),
        (dict(ok, group_size=3), ValueError, "group_size must be a positive divisor"),
        (dict(ok, group_size=0), ValueError, "group_size must be a positive divisor"),
        (dict(ok, group_size=4.0), TypeError, "group_size must be an int"),
        (dict(ok, norm_before_gate="no"), TypeError, "norm_before_gate must be a bool"),
        (dict(ok, eps=float("nan")), ValueError, "eps must be"),
        (dict(ok, x=torch.randn(0, 8), z=None), ValueError, "x has an empty leading"),
        (dict(ok, backend="triton"), ValueError, "backend='triton'"),
    ]


@pytest.mark.parametrize("kwargs, error, message", _bad_gated_cases())
def test_gated_rms_norm_bad_inputs(kwargs, error, message):
    with pytest.raises(error, match=message):
        gated_rms_norm_fn(**kwargs)


def test_eps_guards_zero_rows():
    x = torch.zeros(2, 8)
    for backend in BACKENDS:
        assert torch.equal(rms_norm_fn(x, torch.ones(8), backend=backend), x)
        assert torch.equal(gated_rms_norm_fn(x, x, torch.ones(8), group_size=2, backend=backend), x)
    for backend in BACKENDS:
        assert rms_norm_fn(x, torch.ones(8), eps=0.0, backend=backend).isnan().all()
