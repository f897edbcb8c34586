"""Tests of ssmkit.ops.ssd: every backend against the float64 recurrence, gradients, packing, errors."""

from __future__ import annotations

import doctest

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.ops import ssd
from ssmkit.ops.ssd import mamba_chunk_scan_combined
from ssmkit.testing import assert_close

BACKENDS = ("reference", "chunked")
F64 = torch.float64


def make_inputs(b=2, l=37, h=4, p=3, g=2, n=5, *, dtype=torch.float32, D_shape="h", z=True, dt_bias=True,
                initial=False):
    """Random SSD inputs of moderate scale; A < 0 and softplus-able dt keep the SSM stable."""
    inp = {
        "x": torch.randn(b, l, h, p),
        "dt": torch.randn(b, l, h) - 1.0,
        "A": -torch.rand(h) * 2 - 0.1,
        "B": torch.randn(b, l, g, n),
        "C": torch.randn(b, l, g, n),
    }
    if D_shape is not None:
        inp["D"] = torch.randn(h) if D_shape == "h" else torch.randn(h, p)
    if z:
        inp["z"] = torch.randn(b, l, h, p)
    if dt_bias:
        inp["dt_bias"] = torch.randn(h) * 0.5
    if initial:
        inp["initial_states"] = torch.randn(b, h, p, n)
    return {k: v.to(dtype) for k, v in inp.items()}


def f64(inp):
    return {k: v.to(F64) if v.is_floating_point() else v for k, v in inp.items()}


def run(inp, chunk_size=16, backend="chunked", **kw):
    return mamba_chunk_scan_combined(**inp, chunk_size=chunk_size, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("l", [1, 63, 257])
@pytest.mark.parametrize("g", [1, 2])
@pytest.mark.parametrize("packed", [False, True])
def test_matches_float64_reference(backend, dtype, l, g, packed):
    # chunk 16 does not divide 63 or 257 and is longer than l = 1; packed documents change at 16
    # (a chunk edge) and at 40 (inside a chunk).
    inp = make_inputs(l=l, g=g, dtype=dtype, D_shape="hp" if g == 2 else "h", initial=True)
    if packed:
        inp["seq_idx"] = ((torch.arange(l) >= 16).int() + (torch.arange(l) >= 40).int()).expand(2, l)
    kw = dict(dt_softplus=True, dt_limit=(0.05, 2.0), return_final_states=True)
    out, final = run(inp, backend=backend, **kw)
    want, want_final = run(f64(inp), backend="reference", **kw)
    assert out.dtype == dtype and out.shape == inp["x"].shape
    assert final.dtype == (F64 if dtype == F64 else torch.float32)
    assert_close(out, want, dtype, name="out")
    assert_close(final, want_final, dtype, name="final_states")


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64, 300])
def test_chunk_sizes_agree_float64(chunk_size):
    inp = f64(make_inputs(l=63, D_shape=None, z=False, dt_bias=False, initial=True))
    out, final = run(inp, chunk_size, dt_softplus=True, return_final_states=True)
    want, want_final = run(inp, chunk_size, backend="reference", dt_softplus=True, return_final_states=True)
    assert_close(out, want, name="out")
    assert_close(final, want_final, name="final_states")


def test_auto_is_chunked_and_float16_works():
    inp = make_inputs(l=40, dtype=torch.float16)
    assert torch.equal(run(inp, backend="auto", dt_softplus=True), run(inp, backend="chunked", dt_softplus=True))
    want = run(f64(inp), backend="reference", dt_softplus=True)
    assert_close(run(inp, dt_softplus=True), want, torch.float16, name="out")


def test_dt_processing_order():
    # dt + dt_bias, then softplus, then clamp: a clamp to (a, a) makes every step exactly a.
    inp = make_inputs(l=30, z=False, D_shape=None)
    clamped = run(f64(inp), dt_softplus=True, dt_limit=(0.3, 0.3))
    constant = dict(f64(inp), dt=torch.full_like(inp["dt"], 0.3, dtype=F64), dt_bias=None)
    assert_close(clamped, run(constant, backend="reference"), name="clamped")
    shifted = dict(f64(inp), dt=inp["dt"].to(F64) + inp["dt_bias"].to(F64), dt_bias=None)
    assert_close(run(f64(inp), dt_softplus=True), run(shifted, backend="reference", dt_softplus=True))
    # Without softplus and with the default limit nothing is clamped: negative steps pass through.
    neg = dict(f64(inp), dt=-inp["dt"].abs().to(F64) * 0.01, dt_bias=None)
    unclamped = run(neg, backend="reference")
    zero_steps = run(dict(neg, dt=torch.zeros_like(neg["dt"])), backend="reference")
    assert not torch.allclose(unclamped, zero_steps)
    assert_close(run(neg), unclamped, name="negative dt")


def test_recurrence_by_hand():
    # One head, one state, one channel: H_t = exp(Δ A) H_{t-1} + Δ x B, y = H C + D x, times silu(z).
    x, dt, B, C, z = (torch.randn(1, 6, 1, 1, dtype=F64) for _ in range(5))
    dt = dt.abs().view(1, 6, 1)
    A, D = torch.tensor([-0.7], dtype=F64), torch.tensor([0.3], dtype=F64)
    Bv, Cv = B.view(1, 6, 1, 1), C.view(1, 6, 1, 1)
    state, ys = torch.tensor(0.5, dtype=F64), []
    for t in range(6):
        state = torch.exp(dt[0, t, 0] * A[0]) * state + dt[0, t, 0] * x[0, t, 0, 0] * Bv[0, t, 0, 0]
        ys.append((state * Cv[0, t, 0, 0] + D[0] * x[0, t, 0, 0]) * torch.nn.functional.silu(z[0, t, 0, 0]))
    want = torch.stack(ys).view(1, 6, 1, 1)
    init = torch.full((1, 1, 1, 1), 0.5, dtype=F64)
    for backend in BACKENDS:
        out, final = mamba_chunk_scan_combined(x, dt, A, Bv, Cv, 4, D=D, z=z, initial_states=init,
                                               return_final_states=True, backend=backend)
        assert_close(out, want, name=backend)
        assert_close(final.view(()), state, name=f"{backend} final")


def _grads(inp, backend, chunk_size=8, cu_seqlens=None, **kw):
    inp = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inp.items()}
    outs = run(inp, chunk_size, backend, return_final_states=True, cu_seqlens=cu_seqlens,
               return_varlen_states=cu_seqlens is not None, **kw)
    gen = torch.Generator().manual_seed(1)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=F64)).sum() for o in outs)
    loss.backward()
    return {k: v.grad for k, v in inp.items() if v.is_floating_point()}


@pytest.mark.parametrize("packed", [False, True])
def test_gradients_fp32_match_float64_reference(packed):
    inp = make_inputs(l=45, D_shape="hp", initial=True)
    if packed:
        inp["seq_idx"] = torch.tensor([[0] * 16 + [1] * 11 + [2] * 18, [3] * 30 + [4] * 15])
    got = _grads(inp, "chunked", dt_softplus=True)
    want = _grads(f64(inp), "reference", dt_softplus=True)
    assert set(got) == {"x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"}
    for name in got:
        assert_close(got[name], want[name], torch.float32, name=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_strong_decays_match_the_reference_with_no_denormal_factors(dtype):
    """Decays far below the float's range inside a chunk (Δ·A sums to about -60 per position): outputs and
    gradients still match the float64 recurrence, and the decay factors the chunked path multiplies are
    exactly 0 there, never denormal or tiny (either makes CPU matmuls many times slower)."""
    from ssmkit.ops.ssd import chunked

    inp = make_inputs(l=40, h=4, initial=True, dtype=dtype)
    inp["A"] = -torch.tensor([0.5, 8.0, 30.0, 60.0], dtype=dtype)
    inp["dt"] = torch.full_like(inp["dt"], 1.0)
    got = _grads(inp, "chunked", dt_softplus=True)
    want = _grads(f64(inp), "reference", dt_softplus=True)
    for name in got:
        assert_close(got[name], want[name], dtype, name=f"grad {name}")
    assert_close(run(inp, 32, dt_softplus=True), run(f64(inp), backend="reference", dt_softplus=True), dtype)
    cum = torch.cumsum(torch.nn.functional.softplus(inp["dt"] + inp["dt_bias"]) * inp["A"], dim=1)[:1, :32]
    drop, upper = chunked._masks(32, None, dtype, cum.device)
    decay = chunked._decay(cum, upper)
    smallest = torch.finfo(dtype).tiny ** 0.5
    assert decay.masked_select(drop).eq(0).all()
    assert ((decay == 0) | (decay >= smallest / 2)).all()
    assert (decay == 0).any() and decay.diagonal(dim1=-2, dim2=-1).eq(1).all()


def test_varlen_gradients_match_reference():
    inp = f64(make_inputs(b=1, l=29, initial=True))
    cu = torch.tensor([0, 5, 8, 21, 29])
    got = _grads(inp, "chunked", cu_seqlens=cu, dt_softplus=True)
    want = _grads(inp, "reference", cu_seqlens=cu, dt_softplus=True)
    for name in got:
        assert_close(got[name], want[name], name=f"grad {name}")


@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck_chunked(packed):
    inp = f64(make_inputs(b=2 - packed, l=11, h=4, p=2, g=2, n=3, D_shape="hp", initial=True))
    names = list(inp)
    seq_idx = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]]) if packed else None

    def fn(*tensors):
        return run(dict(zip(names, tensors)), 4, seq_idx=seq_idx, dt_softplus=True, dt_limit=(0.01, 5.0),
                   return_final_states=True)

    assert torch.autograd.gradcheck(fn, [inp[k].requires_grad_() for k in names])


def test_packed_equals_each_document_alone():
    # chunk 8: boundaries at 16 (a chunk edge) and 21 (inside a chunk).
    lengths = [16, 5, 14]
    docs = [f64(make_inputs(b=1, l=n_, initial=True)) for n_ in lengths]
    shared = {k: docs[0][k] for k in ("A", "D", "dt_bias")}
    packed = dict(shared, **{k: torch.cat([d[k] for d in docs], dim=1) for k in ("x", "dt", "B", "C", "z")})
    packed["initial_states"] = docs[0]["initial_states"]
    seq_idx = torch.repeat_interleave(torch.tensor([7, 3, 9]), torch.tensor(lengths))[None]
    for backend in BACKENDS:
        out, final = run(packed, 8, backend, seq_idx=seq_idx, dt_softplus=True, return_final_states=True)
        start = 0
        for i, d in enumerate(docs):
            alone = dict(d, **shared)
            if i > 0:
                del alone["initial_states"]
            want, want_final = run(alone, 8, "reference", dt_softplus=True, return_final_states=True)
            assert_close(out[:, start:start + lengths[i]], want, name=f"{backend} doc {i}")
            start += lengths[i]
        assert_close(final, want_final, name=f"{backend} final state of the last document")


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_states_are_each_sequences_final_state(backend):
    lengths = [3, 13, 8, 1, 7]  # chunk 8: ends inside chunks, at a chunk edge, a length-1 sequence
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    inp = f64(make_inputs(b=1, l=sum(lengths), initial=True))
    out, final, varlen = run(inp, 8, backend, cu_seqlens=cu, dt_softplus=True, return_final_states=True,
                             return_varlen_states=True)
    assert varlen.shape == (len(lengths), 4, 3, 5)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    assert_close(out, run(inp, 8, "reference", seq_idx=seq_idx, dt_softplus=True), name="out")
    assert_close(final, varlen[-1:], name="final state == last varlen state")
    for i in range(len(lengths)):
        s, e = cu[i].item(), cu[i + 1].item()
        alone = {k: (v[:, s:e] if k != "initial_states" and v.dim() >= 3 else v) for k, v in inp.items()}
        if i > 0:
            del alone["initial_states"]
        _, want = run(alone, 8, "reference", dt_softplus=True, return_final_states=True)
        assert_close(varlen[i], want[0], name=f"varlen state {i}")


def test_cu_seqlens_and_seq_idx():
    inp = make_inputs(b=1, l=20)
    cu = torch.tensor([0, 6, 20], dtype=torch.int32)
    seq_idx = torch.tensor([[0] * 6 + [1] * 14], dtype=torch.int32)
    derived = run(inp, 8, cu_seqlens=cu, return_varlen_states=True)
    given_ = run(inp, 8, cu_seqlens=cu, seq_idx=seq_idx, return_varlen_states=True)
    assert torch.equal(derived[0], given_[0]) and torch.equal(derived[1], given_[1])
    # cu_seqlens alone also separates the documents of out.
    assert torch.equal(run(inp, 8, cu_seqlens=cu), run(inp, 8, seq_idx=seq_idx))
    with pytest.raises(ValueError, match="seq_idx"):
        run(inp, 8, cu_seqlens=cu, seq_idx=torch.zeros(1, 20, dtype=torch.int32), return_varlen_states=True)


def test_seq_idx_values_do_not_matter_only_changes():
    inp = f64(make_inputs(l=30))
    a = torch.tensor([[4] * 10 + [2] * 10 + [4] * 10] * 2)
    b = torch.tensor([[0] * 10 + [1] * 10 + [2] * 10] * 2)
    assert_close(run(inp, 8, seq_idx=a), run(inp, 8, seq_idx=b))
    assert_close(run(inp, 8, "reference", seq_idx=a), run(inp, 8, seq_idx=b))


@pytest.mark.parametrize(
    "flags, kinds",
    [({}, "o"), ({"return_final_states": True}, "of"), ({"return_varlen_states": True}, "ov"),
     ({"return_final_states": True, "return_varlen_states": True}, "ofv")],
)
def test_return_structure(flags, kinds):
    inp = make_inputs(b=1, l=10, dtype=torch.bfloat16)
    res = run(inp, 4, cu_seqlens=torch.tensor([0, 4, 10]), **flags)
    res = (res,) if kinds == "o" else res
    shapes = {"o": (1, 10, 4, 3), "f": (1, 4, 3, 5), "v": (2, 4, 3, 5)}
    assert [tuple(t.shape) for t in res] == [shapes[k] for k in kinds]
    assert [t.dtype for t in res] == [torch.bfloat16] + [torch.float32] * (len(kinds) - 1)


@given(
    b=st.integers(1, 2), l=st.integers(1, 40), g=st.sampled_from([1, 2]), r=st.integers(1, 3),
    p=st.integers(1, 4), n=st.integers(1, 6), chunk=st.integers(1, 17), split=st.integers(0, 40),
    seed=st.integers(0, 2**16),
)
def test_fuzz_shapes(b, l, g, r, p, n, chunk, split, seed):
    torch.manual_seed(seed)
    inp = f64(make_inputs(b, l, g * r, p, g, n, initial=seed % 2 == 0, D_shape=("h", "hp", None)[seed % 3]))
    seq_idx = (torch.arange(l) >= split).expand(b, l).to(torch.int64) if seed % 4 < 2 else None
    out, final = run(inp, chunk, seq_idx=seq_idx, dt_softplus=True, return_final_states=True)
    want, want_final = run(inp, chunk, "reference", seq_idx=seq_idx, dt_softplus=True, return_final_states=True)
    assert_close(out, want, name="out")
    assert_close(final, want_final, name="final_states")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_behaviour(backend):
    # As documented: NaN in x at t (row 0, head 1, channel 0) reaches out from t to the end of its
    # document (that channel only), maybe the rest of its chunk, never other rows/heads or a
    # document that starts in a later chunk.
    inp = make_inputs(l=40, z=False, D_shape=None, initial=True)
    inp["x"][0, 12, 1, 0] = float("nan")
    seq_idx = torch.tensor([[0] * 24 + [1] * 16] * 2)  # the second document starts at chunk edge 24
    for kw in ({}, {"seq_idx": seq_idx}):
        out, final = run(inp, 8, backend, dt_softplus=True, return_final_states=True, **kw)
        nan = torch.isnan(out)
        doc_end = 24 if kw else 40
        assert nan[0, 12:doc_end, 1, 0].all()
        assert not nan[0, :8].any()  # chunks before the NaN's chunk
        assert not nan[1].any() and not nan[:, :, [0, 2, 3]].any() and not nan[:, :, :, 1:].any()
        assert not nan[0, doc_end:].any()
        if backend == "reference":
            assert not nan[0, :12].any()
        # The final state belongs to the last document: NaN only when the NaN's document is last.
        assert torch.isnan(final[0, 1, 0]).all() == (not kw)
        assert not torch.isnan(final[1]).any() and not torch.isnan(final[0, [0, 2, 3]]).any()


@pytest.mark.parametrize("packed", [False, True])
def test_input_scale_apart_from_the_step(packed):
    """input_scale weighs x in place of Δ (Δ still decays): chunked equals the recurrence, gradients
    included, and input_scale = Δ gives the op without it."""
    inp = make_inputs(l=45, D_shape="hp", initial=True)
    inp["input_scale"] = torch.randn(2, 45, 4)
    if packed:
        inp["seq_idx"] = torch.tensor([[0] * 16 + [1] * 11 + [2] * 18, [3] * 30 + [4] * 15])
    kw = {"dt_softplus": True, "dt_limit": (0.05, 3.0)}
    got = _grads(inp, "chunked", **kw)
    want = _grads(f64(inp), "reference", **kw)
    assert set(got) == {"x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states", "input_scale"}
    for name in got:
        assert_close(got[name], want[name], torch.float32, name=f"grad {name}")
    plain = f64(make_inputs(l=30, initial=True))
    delta = torch.nn.functional.softplus(plain["dt"] + plain["dt_bias"])
    for backend in BACKENDS:
        a = run(plain, backend=backend, dt_softplus=True)
        b = run({**plain, "input_scale": delta}, backend=backend, dt_softplus=True)
        assert_close(b, a, F64, name=f"{backend}: input_scale = Δ")
    varlen = f64(make_inputs(b=1, l=29, initial=True)) | {"input_scale": torch.randn(1, 29, 4, dtype=F64)}
    cu = torch.tensor([0, 5, 8, 21, 29])
    got, want = _grads(varlen, "chunked", cu_seqlens=cu), _grads(varlen, "reference", cu_seqlens=cu)
    for name in got:
        assert_close(got[name], want[name], name=f"varlen grad {name}")


def _bad(**changes):
    inp = make_inputs(b=2, l=10, h=4, p=3, g=2, n=5, initial=True)
    inp["seq_idx"] = torch.zeros(2, 10, dtype=torch.int32)
    inp.update(changes)
    return inp


@pytest.mark.parametrize(
    "changes, exc, match",
    [
        ({"x": torch.randn(2, 10, 4)}, ValueError, "x"),
        ({"x": torch.randint(0, 3, (2, 10, 4, 3))}, TypeError, "x"),
        ({"dt": torch.randn(2, 10)}, ValueError, "dt"),
        ({"dt": torch.randn(2, 11, 4)}, ValueError, "dt"),
        ({"dt": torch.randn(3, 10, 4)}, ValueError, "dt"),
        ({"A": torch.randn(4, 1)}, ValueError, "A"),
        ({"A": torch.randn(5)}, ValueError, "A"),
        ({"A": torch.ones(4, dtype=torch.int64)}, TypeError, "A"),
        ({"B": torch.randn(2, 10, 2)}, ValueError, "B"),
        ({"B": torch.randn(2, 9, 2, 5)}, ValueError, "B"),
        ({"C": torch.randn(2, 10, 2, 6)}, ValueError, "C"),
        ({"C": torch.randn(2, 10, 1, 5)}, ValueError, "C"),
        ({"input_scale": torch.randn(2, 10)}, ValueError, "input_scale"),
        ({"input_scale": torch.randn(2, 10, 3)}, ValueError, "input_scale"),
        ({"B": torch.randn(2, 10, 3, 5), "C": torch.randn(2, 10, 3, 5)}, ValueError, "divisible by groups"),
        ({"D": torch.randn(4, 3, 1)}, ValueError, "D"),
        ({"D": torch.randn(5)}, ValueError, "D"),
        ({"D": torch.randn(4, 2)}, ValueError, "D"),
        ({"z": torch.randn(2, 10, 4, 2)}, ValueError, "z"),
        ({"dt_bias": torch.randn(3)}, ValueError, "dt_bias"),
        ({"initial_states": torch.randn(2, 4, 3, 4)}, ValueError, "initial_states"),
        ({"initial_states": torch.randn(4, 3, 5)}, ValueError, "initial_states"),
        ({"seq_idx": torch.zeros(2, 10)}, TypeError, "seq_idx"),
        ({"seq_idx": torch.zeros(2, 9, dtype=torch.int32)}, ValueError, "seq_idx"),
        ({"x": [[1.0]]}, TypeError, "x"),
        ({"initial_states": torch.randn(2, 4, 3, 5, device="meta")}, ValueError, "initial_states"),
        ({"B": torch.randn(2, 10, 2, 5, device="meta")}, ValueError, "device"),
    ],
)
def test_bad_inputs(changes, exc, match):
    with pytest.raises(exc, match=match):
        run(_bad(**changes), 4)


@pytest.mark.parametrize("dim, match", [(0, "batch"), (1, "length")])
def test_empty_batch_or_length(dim, match):
    inp = {k: (v.narrow(dim, 0, 0) if v.dim() >= 3 else v) for k, v in make_inputs(initial=True).items()}
    if dim == 1:
        del inp["initial_states"]
    with pytest.raises(ValueError, match=match):
        run(inp, 4)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"chunk_size": 4.0}, TypeError, "chunk_size"),
        ({"chunk_size": True}, TypeError, "chunk_size"),
        ({"dt_limit": (1.0, 0.5)}, ValueError, "dt_limit"),
        ({"dt_limit": 1.0}, TypeError, "dt_limit"),
        ({"dt_softplus": 1}, TypeError, "dt_softplus"),
        ({"backend": "cuda"}, ValueError, "backend"),
        ({"backend": "triton"}, ValueError, "triton"),
        ({"return_varlen_states": True}, ValueError, "cu_seqlens"),
        ({"cu_seqlens": torch.tensor([0, 10])}, ValueError, "batch"),
    ],
)
def test_bad_options(kw, exc, match):
    kw = {"chunk_size": 4, **kw}
    with pytest.raises(exc, match=match):
        mamba_chunk_scan_combined(**_bad(), **kw)


@pytest.mark.parametrize(
    "cu, exc, match",
    [
        (torch.tensor([1, 10]), ValueError, "cu_seqlens"),
        (torch.tensor([0, 9]), ValueError, "cu_seqlens"),
        (torch.tensor([0, 4, 4, 10]), ValueError, "cu_seqlens"),
        (torch.tensor([0.0, 10.0]), TypeError, "cu_seqlens"),
        (torch.tensor([[0, 10]]), ValueError, "cu_seqlens"),
        (torch.tensor([0, 10], device="meta"), ValueError, "cu_seqlens"),
    ],
)
def test_bad_cu_seqlens(cu, exc, match):
    inp = make_inputs(b=1, l=10)
    with pytest.raises(exc, match=match):
        run(inp, 4, cu_seqlens=cu, return_varlen_states=True)


def test_docstring_example():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(ssd.mamba_chunk_scan_combined, globs={"torch": torch, **vars(ssd)}):
        runner.run(test)
    assert runner.summarize(verbose=False).attempted > 0
    assert runner.failures == 0


@pytest.mark.parametrize(("field", "value", "error"), [
    ("rows_head_stages", -1, ValueError), ("cols_head_stages", 9, ValueError), ("rows_state_head_stages", True, ValueError),
    ("state_bwd_tile", 48, ValueError), ("cb", (4,), ValueError), ("cb_lowp", 1, TypeError), ("dcb_lowp", "yes", TypeError),
    ("scan_heads", 3, ValueError), ("scan_heads", True, ValueError), ("state_online", 0, TypeError),
])
def test_launch_rejects_bad_settings(field, value, error):
    from ssmkit.ops.ssd.launch import SSDLaunch

    with pytest.raises(error, match=f"SSDLaunch.{field}"):
        SSDLaunch(**{field: value})


def test_launch_head_stages_none_means_the_compilers_choice():
    from ssmkit.ops.ssd.launch import CONFIGS, SSDLaunch

    assert SSDLaunch().head_stages("rows") is None
    assert SSDLaunch(cols_head_stages=2).head_stages("cols") == 2
    assert CONFIGS["rows_h2"].overrides() == {"rows_head_stages": 2}
