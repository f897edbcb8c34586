"""Tests for ssmkit.ops.selective_scan: every backend and every gradient against the sequential reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.ops.selective_scan import ScanInputs, selective_scan_fn
from ssmkit.ops.selective_scan.chunked import selective_scan_chunked
from ssmkit.testing import assert_close

BACKENDS = ("reference", "chunked")
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _packed_seq_idx(batch, length):
    """Sorted document ids per row, documents of length 1 included."""
    cuts = torch.rand(batch, length) < 0.15
    cuts[:, 0] = False
    return cuts.long().cumsum(dim=1) + 7


def _inputs(b, d, n, l, dtype=torch.float64, *, groups=None, extras=True, init=False, packed=False):
    """Keyword arguments of selective_scan_fn; ``groups=None`` gives B, C of shape (b, n, l)."""
    bc_shape = (b, n, l) if groups is None else (b, groups, n, l)
    kw = dict(
        u=torch.randn(b, d, l, dtype=dtype),
        # Positive Δ unless softplus makes it so: a negative Δ with negative A grows without bound.
        delta=torch.randn(b, d, l, dtype=dtype) - 1.0 if extras else torch.rand(b, d, l, dtype=dtype),
        A=-torch.rand(d, n, dtype=dtype) * 4 - 0.1,
        B=torch.randn(bc_shape, dtype=dtype),
        C=torch.randn(bc_shape, dtype=dtype),
    )
    if extras:
        kw.update(
            D=torch.randn(d, dtype=dtype),
            z=torch.randn(b, d, l, dtype=dtype),
            delta_bias=torch.randn(d, dtype=dtype) * 0.5,
            delta_softplus=True,
        )
    if init:
        kw["initial_state"] = torch.randn(b, d, n, dtype=dtype)
    if packed:
        kw["seq_idx"] = _packed_seq_idx(b, l)
    return kw


def _cast(kw, dtype):
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}


def _run(kw, backend, chunk_size=None):
    if backend == "chunked" and chunk_size is not None:
        return selective_scan_chunked(ScanInputs.from_args(kw), chunk_size=chunk_size)
    return selective_scan_fn(**kw, return_last_state=True, backend=backend)


@pytest.mark.parametrize("variant", ["plain", "extras", "groups", "init", "packed", "all"])
@pytest.mark.parametrize("length", [1, 63, 257])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_backends_match_float64_reference(dtype, length, variant):
    kw = _inputs(
        2, 8, 4, length, dtype,
        groups={"groups": 2, "all": 4, "init": 1}.get(variant),
        extras=variant in ("extras", "all"),
        init=variant in ("init", "all"),
        packed=variant in ("packed", "all"),
    )
    exp_out, exp_last = _run(_cast(kw, torch.float64), "reference")
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for backend in BACKENDS:
        out, last = _run(kw, backend)
        assert out.dtype == dtype and out.shape == kw["u"].shape
        assert last.dtype == state_dtype and last.shape == (2, 8, 4)
        assert_close(out, exp_out, dtype, name=f"{backend} out")
        assert_close(last, exp_last, dtype, name=f"{backend} last_state")


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 300])
def test_chunk_size_does_not_change_results(chunk_size):
    kw = _inputs(3, 6, 3, 150, groups=3, init=True, packed=True)
    before = {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    exp_out, exp_last = _run(kw, "reference")
    out, last = _run(kw, "chunked", chunk_size)
    assert_close(out, exp_out, name="out")
    assert_close(last, exp_last, name="last_state")
    assert all(torch.equal(kw[k], v) for k, v in before.items()), "inputs were modified"


def test_definition_on_a_hand_example():
    # d = n = 1, A = log(1/2): each step halves the state; B = C = 1, so y_t = Σ_s 2^-(t-s) Δ u_s.
    u = torch.tensor([[[1.0, 2.0, 4.0]]], dtype=torch.float64)
    ones = torch.ones(1, 1, 3, dtype=torch.float64)
    A = torch.tensor([[-0.6931471805599453]], dtype=torch.float64)
    for backend in BACKENDS:
        out, last = selective_scan_fn(u, ones, A, ones, ones, return_last_state=True, backend=backend)
        assert_close(out, torch.tensor([[[1.0, 2.5, 5.25]]], dtype=torch.float64), name=backend)
        assert_close(last, torch.tensor([[[5.25]]], dtype=torch.float64), name=backend)
        packed = selective_scan_fn(u, ones, A, ones, ones, seq_idx=torch.tensor([[0, 1, 1]]), backend=backend)
        assert_close(packed, torch.tensor([[[1.0, 2.0, 5.0]]], dtype=torch.float64), name=f"{backend} packed")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_decays_stay_finite_and_exact(backend):
    # Δ up to ~15 and A down to -120: per-step decays of e^-1800, far past float32's exponent range;
    # a form dividing by cumulative decays would overflow here.
    b, d, n, l = 2, 6, 5, 200
    kw = _inputs(b, d, n, l, torch.float32, init=True)
    kw["delta"] = torch.rand(b, d, l) * 15
    kw["delta"][:, :, ::7] = 1e-3
    kw["A"] = -torch.logspace(-2, 2.08, n).expand(d, n).contiguous()
    exp_out, exp_last = _run(_cast(kw, torch.float64), "reference")
    out, last = _run(kw, backend)
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    assert_close(out, exp_out, torch.float32, name="out")
    assert_close(last, exp_last, torch.float32, name="last_state")
    out64, _ = _run(_cast(kw, torch.float64), "chunked", chunk_size=64)
    assert_close(out64, exp_out, name="float64 out, chunk 64")


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_documents_equal_each_document_alone(backend):
    b, d, n, l = 2, 6, 3, 90
    kw = _inputs(b, d, n, l, groups=2, init=True, packed=True)
    out, last = _run(kw, backend)
    for row in range(b):
        ids = kw["seq_idx"][row]
        starts = [0] + [t for t in range(1, l) if ids[t] != ids[t - 1]] + [l]
        for i, (t0, t1) in enumerate(zip(starts[:-1], starts[1:])):
            alone = {
                k: (v[row : row + 1, ..., t0:t1] if v.dim() >= 3 else v)
                for k, v in kw.items()
                if isinstance(v, torch.Tensor) and k not in ("seq_idx", "initial_state")
            }
            alone.update(delta_softplus=True, initial_state=kw["initial_state"][row : row + 1] if i == 0 else None)
            doc_out, doc_last = _run(alone, backend)
            assert_close(out[row : row + 1, :, t0:t1], doc_out, name=f"row {row} document {i} out")
        assert_close(last[row : row + 1], doc_last, name=f"row {row} last_state")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    kw = _inputs(2, 4, 2, 7, groups=2, init=True, packed=True)
    kw["seq_idx"] = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 2]])
    names = [k for k in NAMES if k in kw]

    def f(*tensors):
        args = dict(kw, **dict(zip(names, tensors)))
        if backend == "chunked":
            return _run(args, "chunked", chunk_size=3)
        return _run(args, "reference")

    inputs = tuple(kw[k].clone().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("extras", [False, True])
@pytest.mark.parametrize("groups", [None, 2])
def test_chunked_gradients_match_reference_float32(groups, extras):
    kw = _inputs(2, 8, 4, 70, torch.float32, groups=groups, extras=extras, init=True, packed=extras)
    names = [k for k in NAMES if k in kw]
    go, gl = torch.randn(2, 8, 70), torch.randn(2, 8, 4)

    def grads(backend, dtype):
        args = _cast(kw, dtype)
        leaves = {k: args[k].requires_grad_(True) for k in names}
        out, last = _run(args, backend, chunk_size=16 if backend == "chunked" else None)
        loss = (out * go.to(dtype)).sum() + (last * gl.to(dtype)).sum()
        return torch.autograd.grad(loss, list(leaves.values()))

    expected = grads("reference", torch.float64)
    for name, got, exp in zip(names, grads("chunked", torch.float32), expected):
        assert got.dtype == torch.float32
        assert_close(got, exp, torch.float32, name=f"d{name}")


@pytest.mark.parametrize(
    "wanted", [("u",), ("delta",), ("A",), ("B", "initial_state"), ("C", "z"), ("D", "delta_bias")]
)
def test_chunked_gradients_of_a_subset_of_inputs(wanted):
    kw = _inputs(2, 4, 3, 20, groups=2, init=True, packed=True)

    def grads(backend):
        args = dict(kw, **{k: kw[k].clone().requires_grad_(True) for k in wanted})
        out, last = _run(args, backend, chunk_size=6 if backend == "chunked" else None)
        return torch.autograd.grad(out.square().sum() + last.sum(), [args[k] for k in wanted])

    for name, got, exp in zip(wanted, grads("chunked"), grads("reference")):
        assert_close(got, exp, name=f"d{name}")


def test_bfloat16_gradients_come_back_in_input_dtype():
    kw = _inputs(1, 4, 2, 20, torch.bfloat16, init=True)
    leaves = [kw[k].requires_grad_(True) for k in NAMES if k in kw]
    out, last = _run(kw, "chunked")
    (out.float().sum() + last.sum()).backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad).all() for t in leaves)


def test_backward_saves_only_chunk_boundary_states():
    b, d, n, l = 1, 32, 16, 512
    kw = _inputs(b, d, n, l, torch.float32, extras=False)
    kw["u"].requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _run(kw, "chunked", chunk_size=32)
    # Each saved tensor is at most (b, d, l) or (l / T + 1, b, d, n); none is the (b, d, l, n) expansion.
    assert max(saved) <= max(b * d * l, (l // 32 + 1) * b * d * n)
    assert sum(saved) < b * d * l * n / 2


@pytest.mark.parametrize("layout", ["time_major", "strided"])
def test_non_contiguous_inputs(layout):
    b, d, n, l = 2, 6, 3, 33
    kw = _inputs(b, d, n, l, torch.float32, groups=3, init=True)
    if layout == "time_major":
        odd = {k: kw[k].transpose(-1, -2).contiguous().transpose(-1, -2) for k in ("u", "delta", "z", "B", "C")}
    else:
        odd = {k: torch.repeat_interleave(kw[k], 2, dim=-1)[..., ::2] for k in ("u", "delta", "z", "B", "C")}
    before = {k: v.clone() for k, v in odd.items()}
    go = torch.randn(b, d, l)

    def run(args, backend):
        leaves = [args[k].requires_grad_(True) for k in ("u", "delta", "B", "C")]
        out, last = _run(args, backend)
        return out, last, torch.autograd.grad((out * go).sum() + last.sum(), leaves)

    plain = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    exp_out, exp_last, exp_grads = run(plain, "reference")
    for backend in BACKENDS:
        out, last, grads = run(dict(kw, **{k: v.detach() for k, v in odd.items()}), backend)
        assert_close(out, exp_out, name=f"{backend} out")
        assert_close(last, exp_last, name=f"{backend} last_state")
        for name, got, exp in zip("u delta B C".split(), grads, exp_grads):
            assert_close(got, exp, name=f"{backend} d{name}")
        # The chunked backend keeps a time-major u's layout (no transposes in a Mamba layer).
        time_major_out = backend == "chunked" and layout == "time_major"
        assert (out.transpose(1, 2) if time_major_out else out).is_contiguous()
    assert all(torch.equal(odd[k], before[k]) for k in odd), "inputs were modified"


@given(
    b=st.integers(1, 3),
    g=st.integers(1, 3),
    per_group=st.integers(1, 3),
    n=st.integers(1, 5),
    l=st.integers(1, 40),
    chunk_size=st.integers(1, 12),
    three_dim_bc=st.booleans(),
    packed=st.booleans(),
)
def test_fuzz_shapes(b, g, per_group, n, l, chunk_size, three_dim_bc, packed):
    groups = None if three_dim_bc else g
    kw = _inputs(b, (g if groups else 1) * per_group, n, l, groups=groups, init=True, packed=packed)
    exp_out, exp_last = _run(kw, "reference")
    out, last = _run(kw, "chunked", chunk_size)
    assert_close(out, exp_out, name="out")
    assert_close(last, exp_last, name="last_state")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_travels_with_the_state_until_a_new_document(backend):
    b, d, n, l = 1, 4, 3, 20
    kw = _inputs(b, d, n, l, torch.float32, groups=2, packed=False)
    kw["seq_idx"] = torch.tensor([[0] * 12 + [1] * 8])
    kw["u"][0, 1, 5] = float("nan")
    kw["C"][0, 1, :, 3] = float("nan")
    out, last = _run(kw, backend)
    nan = torch.isnan(out[0])
    expected = torch.zeros(d, l, dtype=torch.bool)
    expected[1, 5:12] = True  # u's channel, from its step to the end of its document
    expected[2:, 3] = True  # C of group 1 at step 3: that group's channels at that step only
    assert torch.equal(nan, expected)
    assert torch.isfinite(last).all()
    nan_b = dict(kw, seq_idx=None, u=kw["u"].nan_to_num(), C=kw["C"].nan_to_num())
    nan_b["B"] = nan_b["B"].clone()
    nan_b["B"][0, 0, 0, 15] = float("nan")
    out, last = _run(nan_b, backend)
    assert torch.isnan(out[0, :2, 15:]).all() and not torch.isnan(out[0, :2, :15]).any()
    assert not torch.isnan(out[0, 2:]).any()
    assert torch.isnan(last[0, :2, 0]).all() and not torch.isnan(last[0, 2:]).any()


def test_mamba_130m_shapes_run_on_both_backends():
    kw = _inputs(1, 1536, 16, 24, torch.float32, init=True)
    kw["A"] = -torch.arange(1, 17.0).repeat(1536, 1)
    exp_out, exp_last = _run(kw, "reference")
    out, last = _run(kw, "chunked")
    assert_close(out, exp_out, name="out")
    assert_close(last, exp_last, name="last_state")


def test_auto_backend_is_chunked_and_default_returns_out_only():
    """On a CPU, auto is the chunked form (the native kernel, where built, without gradients: same values to
    float32 rounding; tests/ops/test_selective_scan_native.py)."""
    kw = {k: v.requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
          for k, v in _inputs(1, 4, 2, 10, torch.float32).items()}
    out = selective_scan_fn(**kw)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, selective_scan_fn(**kw, backend="chunked"))
    with torch.no_grad():
        assert_close(selective_scan_fn(**kw), selective_scan_fn(**kw, backend="chunked"), torch.float32, name="out")


def _bad(**changes):
    kw = _inputs(2, 4, 3, 5, torch.float32, groups=2, init=True, packed=True)
    kw.update(changes)
    return kw


@pytest.mark.parametrize(
    "changes, error, name",
    [
        (dict(u=torch.randn(2, 4)), ValueError, "u"),
        (dict(delta=torch.randn(2, 4, 6)), ValueError, "delta"),
        (dict(delta=torch.randn(3, 4, 5)), ValueError, "delta"),
        (dict(A=torch.randn(4)), ValueError, "A"),
        (dict(A=-torch.rand(5, 3)), ValueError, "A"),
        (dict(A=torch.randn(4, 3, dtype=torch.complex64)), TypeError, "A"),
        (dict(A=torch.ones(4, 3, dtype=torch.int64)), TypeError, "A"),
        (dict(B=torch.randn(2, 2, 3)), ValueError, "B"),
        (dict(B=torch.randn(2, 3, 3, 5), C=torch.randn(2, 3, 3, 5)), ValueError, "g=3"),
        (dict(C=torch.randn(2, 1, 3, 5)), ValueError, "C"),
        (dict(C=torch.randn(2, 3, 5)), ValueError, "C"),
        (dict(C=torch.randn(2, 2, 3, 4)), ValueError, "C"),
        (dict(D=torch.randn(5)), ValueError, "D"),
        (dict(z=torch.randn(2, 4, 4)), ValueError, "z"),
        (dict(delta_bias=torch.randn(4, 1)), ValueError, "delta_bias"),
        (dict(initial_state=torch.randn(2, 4, 2)), ValueError, "initial_state"),
        (dict(seq_idx=torch.zeros(2, 5)), TypeError, "seq_idx"),
        (dict(seq_idx=torch.zeros(2, 6, dtype=torch.int32)), ValueError, "seq_idx"),
        (dict(u=torch.ones(2, 4, 5, dtype=torch.int32)), TypeError, "u"),
        (dict(z=[1.0]), TypeError, "z"),
        (dict(initial_state=torch.randn(2, 4, 3, device="meta")), ValueError, "initial_state"),
    ],
)
def test_bad_inputs_name_the_argument(changes, error, name):
    with pytest.raises(error, match=name):
        selective_scan_fn(**_bad(**changes))


def test_empty_and_bad_backend():
    empty = dict(u=torch.randn(0, 4, 5), delta=torch.randn(0, 4, 5), z=torch.randn(0, 4, 5))
    kw = _bad(**empty, B=torch.randn(0, 2, 3, 5), C=torch.randn(0, 2, 3, 5), initial_state=None, seq_idx=None)
    with pytest.raises(ValueError, match="u has an empty batch"):
        selective_scan_fn(**kw)
    with pytest.raises(ValueError, match="backend"):
        selective_scan_fn(**_bad(), backend="cuda")


def test_softplus_without_bias():
    # delta_softplus alone, without bias: Δ = softplus(delta); checked against the formula by hand.
    kw = _inputs(1, 2, 2, 3, extras=False)
    out = selective_scan_fn(**kw, delta_softplus=True)
    manual = selective_scan_fn(**dict(kw, delta=F.softplus(kw["delta"])), backend="reference")
    assert_close(out, manual, name="out")
