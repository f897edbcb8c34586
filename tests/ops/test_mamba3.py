"""Tests of ssmkit.ops.mamba3: chunked vs the float64 recurrence, independent forms of the same map
(mamba_ssm's kernel formulation, a complex diagonal SSM, Mamba-2 at λ = 1), gradients, packing,
the decode step, NaN behaviour and argument errors."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.ops import mamba3
from ssmkit.ops.mamba3 import (
    Mamba3Inputs,
    Mamba3ScanState,
    chunked,
    mamba3_scan,
    mamba3_step,
)
from ssmkit.ops.ssd import mamba_chunk_scan_combined
from ssmkit.testing import assert_close, assert_outputs_and_grads_close, float64_leaf

BACKENDS = ("reference", "chunked")
F64 = torch.float64
# (rank r, groups g, rotary angles a of n = 8 state entries, interleaved pairs): single input with
# rope_fraction 0.5 as mamba_ssm's SISO kernel; MIMO with rope_fraction 1.0 as its MIMO kernel.
CONFIGS = [(1, 1, 2, True), (2, 2, 4, False)]


def make_inputs(b=2, l=37, h=4, p=3, r=1, g=1, n=8, a=2, *, dtype=torch.float32, initial=False, mimo_o=True,
                extras=True):
    """Random Mamba-3 inputs: Δ in (0.05, 0.55), A in (-2, 0), a few full turns of rotation."""
    inp = {
        "x": torch.randn(b, l, h, p),
        "dt": torch.rand(b, l, h) * 0.5 + 0.05,
        "A": -torch.rand(b, l, h) * 2,
        "B": torch.randn(b, l, r, g, n),
        "C": torch.randn(b, l, r, g, n),
        "trap": torch.randn(b, l, h),
        "angles": torch.randn(b, l, h, a) * 2,
    }
    if extras:
        inp |= {"D": torch.randn(h), "z": torch.randn(b, l, h, p), "B_bias": torch.randn(h, r, n),
                "C_bias": torch.randn(h, r, n), "mimo_x": torch.randn(h, r, p), "mimo_z": torch.randn(h, r, p)}
        if mimo_o:
            inp["mimo_o"] = torch.randn(h, r, p)
    inp = {k: v.to(dtype) for k, v in inp.items()}
    if initial:
        inp["initial_state"] = random_state(b, h, p, r, n, a, dtype)
    return inp


def random_state(b, h, p, r, n, a, dtype=torch.float32):
    tensors = (torch.rand(b, h, a) * 6.2, torch.randn(b, h, p, n), torch.randn(b, r, h, n), torch.randn(b, h, p))
    return Mamba3ScanState(*(t.to(dtype) for t in tensors))


def f64(inp):
    out = {}
    for k, v in inp.items():
        if isinstance(v, tuple):
            out[k] = Mamba3ScanState(*(t.to(F64) for t in v))
        else:
            out[k] = v.to(F64) if v.is_floating_point() else v
    return out


def run(inp, backend="chunked", chunk_size=16, **kw):
    return mamba3_scan(**inp, backend=backend, chunk_size=chunk_size, **kw)


def assert_state_close(got, want, dtype=None, name="state"):
    # Angles live on a circle: compare them through the wrapped difference.
    diff = torch.remainder(got.angle.double() - want.angle.double() + math.pi, 2 * math.pi) - math.pi
    assert_close(diff, torch.zeros_like(diff), dtype, atol=tolerance_atol(dtype or got.ssm.dtype), name=f"{name}.angle")
    for field in ("ssm", "last_B", "last_x"):
        assert_close(getattr(got, field), getattr(want, field), dtype, name=f"{name}.{field}")


def tolerance_atol(dtype):
    return {F64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]


def packed_ids(b, l):
    """Three documents in row 0 (a boundary inside a chunk of 16, one at a chunk edge), one in row 1."""
    cut1, cut2 = max(1, l // 3), 16 * max(1, (2 * l // 3) // 16)
    ids = torch.zeros(b, l, dtype=torch.int64)
    ids[0, cut1:] = 1
    ids[0, max(cut1 + 1, cut2):] = 2
    return ids


# The reference is the definition: it is not compared with itself in float64, nor run at length 257.
GRID = [(backend, dtype, l) for backend in BACKENDS for dtype in (F64, torch.float32, torch.bfloat16)
        for l in (1, 63, 257) if backend == "chunked" or (dtype != F64 and l != 257)]


@pytest.mark.parametrize("backend, dtype, l", GRID)
@pytest.mark.parametrize("r, g, a, interleaved", CONFIGS)
@pytest.mark.parametrize("packed", [False, True])
def test_matches_float64_reference(backend, dtype, l, r, g, a, interleaved, packed):
    inp = make_inputs(b=2, l=l, h=4, r=r, g=g, a=a, dtype=dtype, initial=True)
    kw = {"rotary_interleaved": interleaved, "return_final_state": True, "seq_idx": packed_ids(2, l) if packed else None}
    out, final = run(inp, backend, **kw)
    want, want_final = run(f64(inp), "reference", **kw)
    assert out.dtype == dtype and out.shape == inp["x"].shape
    assert final.ssm.dtype == (F64 if dtype == F64 else torch.float32)
    assert_close(out, want, dtype, name="out")
    assert_state_close(final, want_final, dtype)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64, 300])
def test_chunk_sizes_agree_float64(chunk_size):
    inp = f64(make_inputs(l=63, r=2, g=1, a=3, initial=True))
    out, final = run(inp, chunk_size=chunk_size, return_final_state=True, seq_idx=packed_ids(2, 63))
    want, want_final = run(inp, "reference", return_final_state=True, seq_idx=packed_ids(2, 63))
    assert_close(out, want, name="out")
    assert_state_close(final, want_final)


def _rotate_like_mamba_ssm(v, theta, interleaved):
    """mamba_ssm's rotary (``apply_rotary_qk_inference_reference``): pairs (2i, 2i+1) or (i, i + n/2)."""
    a = theta.shape[-1]
    cos, sin = torch.cos(theta), torch.sin(theta)
    if interleaved:
        v0, v1 = v[..., 0:2 * a:2], v[..., 1:2 * a:2]
        out = v.clone()
        out[..., 0:2 * a:2], out[..., 1:2 * a:2] = v0 * cos - v1 * sin, v0 * sin + v1 * cos
        return out
    half = v.shape[-1] // 2
    out = v.clone()
    v0, v1 = v[..., :a], v[..., half:half + a]
    out[..., :a], out[..., half:half + a] = v0 * cos - v1 * sin, v0 * sin + v1 * cos
    return out


def _dense_like_mamba_ssm(inp, interleaved):
    """The quadratic form mamba_ssm's SISO (Triton) and MIMO (TileLang) kernels compute, one (b, h) at a
    time: shifted gamma ``scale_s = Δ_s λ_s + Δ_{s+1}(1 - λ_{s+1})`` off the diagonal, ``γ_t`` (through the
    un-rotated q·k dot) on it, the carried (k, v) folded into the input state with ``Δ_0 (1 - λ_0)``."""
    x, dt, A, B, C, trap, ang = (inp[k] for k in ("x", "dt", "A", "B", "C", "trap", "angles"))
    b, l, h, p = x.shape
    g = B.shape[3]
    st = inp["initial_state"]
    lam = torch.sigmoid(trap)
    theta = torch.cumsum(torch.tanh(ang) * math.pi * dt[..., None], dim=1) + st.angle[:, None]
    out = torch.zeros(b, l, h, p, dtype=F64)
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            q = C[bi, :, :, gi] + inp["C_bias"][hi]  # (l, r, n)
            k = B[bi, :, :, gi] + inp["B_bias"][hi]
            qk_dot = torch.einsum("trn,tsn->trs", q, k)  # same step, before the rotation
            q = _rotate_like_mamba_ssm(q, theta[bi, :, None, hi], interleaved)
            k = _rotate_like_mamba_ssm(k, theta[bi, :, None, hi], interleaved)
            v = x[bi, :, hi, None] * inp["mimo_x"][hi]  # (l, r, p)
            dts, lams = dt[bi, :, hi], lam[bi, :, hi]
            gamma = dts * lams
            scale = gamma + F.pad(dts[1:] * (1 - lams[1:]), (0, 1))
            cum = torch.cumsum(A[bi, :, hi] * dts, 0)
            decay = torch.exp(cum[:, None] - cum[None, :]).tril(-1)  # strictly causal
            state = st.ssm[bi, hi] + dts[0] * (1 - lams[0]) * torch.einsum(
                "rp,rn->pn", st.last_x[bi, hi] * inp["mimo_x"][hi], st.last_B[bi, :, hi])
            y = torch.einsum("trn,pn,t->trp", q, state, torch.exp(cum))
            y = y + torch.einsum("trn,sun,ts,s,sup->trp", q, k, decay, scale, v)
            y = y + gamma[:, None, None] * torch.einsum("trs,tsp->trp", qk_dot, v) + inp["D"][hi] * v
            y = y * F.silu(inp["z"][bi, :, hi, None] * inp["mimo_z"][hi])
            out[bi, :, hi] = (y * inp["mimo_o"][hi]).sum(1)
    return out


@pytest.mark.parametrize("r, g, a, interleaved", CONFIGS)
def test_matches_mamba_ssm_kernel_formulation(r, g, a, interleaved):
    inp = f64(make_inputs(b=2, l=21, h=2, p=2, r=r, g=g, a=a, initial=True))
    want = _dense_like_mamba_ssm(inp, interleaved)
    for backend in BACKENDS:
        assert_close(run(inp, backend, chunk_size=8, rotary_interleaved=interleaved), want, name=backend)


def test_rotary_state_is_a_complex_diagonal_ssm():
    # One head, p = 1, n = 2 (one complex entry): H'_t = α e^{-iΔθ_t} H'_{t-1} + β e^{-iΔθ_t} B_{t-1} x_{t-1}
    # + γ B_t x_t and y = Re(conj(C_t) H'_t): rotating B and C by θ is a complex eigenvalue α e^{-iΔθ}.
    inp = f64(make_inputs(b=1, l=9, h=1, p=1, r=1, g=1, n=2, a=1, extras=False))
    x, dt, A = inp["x"][0, :, 0, 0], inp["dt"][0, :, 0], inp["A"][0, :, 0]
    Bc = torch.complex(inp["B"][0, :, 0, 0, 0], inp["B"][0, :, 0, 0, 1])
    Cc = torch.complex(inp["C"][0, :, 0, 0, 0], inp["C"][0, :, 0, 0, 1])
    lam = torch.sigmoid(inp["trap"][0, :, 0])
    dtheta = dt * math.pi * torch.tanh(inp["angles"][0, :, 0, 0])
    H, ys = torch.zeros((), dtype=torch.complex128), []
    for t in range(9):
        alpha, turn = torch.exp(dt[t] * A[t]), torch.exp(-1j * dtheta[t])
        prev = (1 - lam[t]) * dt[t] * alpha * turn * Bc[t - 1] * x[t - 1] if t > 0 else 0
        H = alpha * turn * H + prev + lam[t] * dt[t] * Bc[t] * x[t]
        ys.append((Cc[t].conj() * H).real)
    want = torch.stack(ys).view(1, 9, 1, 1, 1)
    for backend in BACKENDS:
        assert_close(run(inp, backend, chunk_size=4), want, name=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
def test_euler_limit_is_mamba2(backend, packed):
    # λ = 1 (sigmoid(40) == 1 in float64), no rotation, A constant per head: Mamba-2's SSD.
    b, l, h, p, g, n = 2, 30, 4, 3, 2, 6
    inp = f64(make_inputs(b, l, h, p, 1, g, n, 1, extras=False, initial=True))
    A = -torch.rand(h, dtype=F64) - 0.1
    inp |= {"A": A.expand(b, l, h), "trap": torch.full((b, l, h), 40.0, dtype=F64),
            "angles": torch.zeros(b, l, h, 1, dtype=F64), "D": torch.randn(h, dtype=F64),
            "z": torch.randn(b, l, h, p, dtype=F64)}
    inp["initial_state"] = inp["initial_state"]._replace(angle=torch.zeros(b, h, 1, dtype=F64))
    seq_idx = packed_ids(b, l) if packed else None
    out, final = run(inp, backend, chunk_size=8, seq_idx=seq_idx, return_final_state=True)
    want, want_final = mamba_chunk_scan_combined(
        inp["x"], inp["dt"], A, inp["B"][:, :, 0], inp["C"][:, :, 0], 8, D=inp["D"], z=inp["z"],
        initial_states=inp["initial_state"].ssm, seq_idx=seq_idx, return_final_states=True, backend="reference")
    assert_close(out[:, :, 0], want, name="out")
    assert_close(final.ssm, want_final, name="final state")
    # Away from λ = 1 the trapezoid term (the carried B, x) changes the result.
    half = run(dict(inp, trap=torch.zeros_like(inp["trap"])), backend, chunk_size=8, seq_idx=seq_idx)
    assert (half[:, :, 0] - want).abs().max() > 1e-3


def _grads(inp, backend, chunk_size=8, **kw):
    """Gradients of a random projection of every output; ``backend`` is a name, or a scan called as
    ``backend(leaves, **kw) -> (out, final_state)``."""
    leaves = {}
    for k, v in inp.items():
        if isinstance(v, tuple):
            leaves[k] = Mamba3ScanState(*(t.detach().clone().requires_grad_() for t in v))
        elif v.is_floating_point():
            leaves[k] = v.detach().clone().requires_grad_()
        else:
            leaves[k] = v
    if callable(backend):
        out, final = backend(leaves, **kw)
    else:
        out, final = run(leaves, backend, chunk_size, return_final_state=True, **kw)
    gen = torch.Generator().manual_seed(1)
    # The angle enters the loss through cos/sin only: the wrap at 2π must not matter.
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=F64)).sum()
               for o in (out, final.ssm, final.last_B, final.last_x, torch.cos(final.angle)))
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    grads |= {f"initial_state.{f}": t.grad for f, t in zip(Mamba3ScanState._fields, leaves["initial_state"])}
    return grads


@pytest.mark.parametrize("r, g, a, interleaved", CONFIGS)
def test_gradients_fp32_match_float64_reference(r, g, a, interleaved):
    inp = make_inputs(l=45, r=r, g=g, a=a, initial=True)
    kw = {"rotary_interleaved": interleaved, "seq_idx": packed_ids(2, 45)}
    got = _grads(inp, "chunked", **kw)
    want = _grads(f64(inp), "reference", **kw)
    assert len(got) == 18 and all(v is not None for v in got.values())
    for name in got:
        assert_close(got[name], want[name], torch.float32, name=f"grad {name}")


@pytest.mark.parametrize("packed, r", [(False, 2), (True, 1)])
def test_gradcheck_chunked(packed, r):
    inp = f64(make_inputs(b=2 - packed, l=9, h=2, p=2, r=r, g=1, n=4, a=1, initial=True))
    state = inp.pop("initial_state")
    names = list(inp)
    seq_idx = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2]]) if packed else None

    def fn(*tensors):
        args = dict(zip(names, tensors[:len(names)]))
        out, final = run(args, "chunked", 4, initial_state=Mamba3ScanState(*tensors[len(names):]),
                         seq_idx=seq_idx, return_final_state=True)
        return out, final.ssm, final.last_B, final.last_x, torch.sin(final.angle)

    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (*inp.values(), *state)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_each_document_alone(backend):
    lengths = [16, 5, 14]  # chunk 8: boundaries at 16 (a chunk edge) and 21 (inside a chunk)
    docs = [f64(make_inputs(b=1, l=n_, r=2, g=2, a=3, initial=True)) for n_ in lengths]
    shared = {k: docs[0][k] for k in ("D", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o")}
    per_token = ("x", "dt", "A", "B", "C", "trap", "angles", "z")
    packed = dict(shared, initial_state=docs[0]["initial_state"],
                  **{k: torch.cat([d[k] for d in docs], dim=1) for k in per_token})
    seq_idx = torch.repeat_interleave(torch.tensor([7, 3, 9]), torch.tensor(lengths))[None]
    out, final = run(packed, backend, 8, seq_idx=seq_idx, return_final_state=True)
    start = 0
    for i, d in enumerate(docs):
        alone = dict(d, **shared)
        if i > 0:
            del alone["initial_state"]
        want, want_final = run(alone, "reference", return_final_state=True)
        assert_close(out[:, start:start + lengths[i]], want, name=f"doc {i}")
        start += lengths[i]
    assert_state_close(final, want_final, name="final state of the last document")


@pytest.mark.parametrize("r, g, a, interleaved", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_matches_scan(r, g, a, interleaved, dtype):
    inp = make_inputs(l=11, r=r, g=g, a=a, dtype=dtype, initial=True, mimo_o=r == 1)
    want, want_final = run(f64(inp), "reference", rotary_interleaved=interleaved, return_final_state=True)
    state = Mamba3ScanState(*(t.float() for t in inp.pop("initial_state")))
    ids = [id(t) for t in state]
    per_token = ("x", "dt", "A", "B", "C", "trap", "angles", "z")
    steps = [mamba3_step(state, **{k: (v[:, t] if k in per_token else v) for k, v in inp.items()},
                         rotary_interleaved=interleaved) for t in range(11)]
    got = torch.stack(steps, dim=1)
    assert got.dtype == dtype and got.shape == want.shape
    assert [id(t) for t in state] == ids
    assert_close(got, want, dtype, name="steps")
    assert_state_close(state, want_final, dtype)


@given(
    b=st.integers(1, 2), l=st.integers(1, 30), g=st.sampled_from([1, 2]), k=st.integers(1, 2),
    p=st.integers(1, 3), r=st.integers(1, 3), n=st.integers(1, 6), chunk=st.integers(1, 17),
    split=st.integers(0, 30), seed=st.integers(0, 2**16), interleaved=st.booleans(),
)
def test_fuzz_shapes(b, l, g, k, p, r, n, chunk, split, seed, interleaved):
    torch.manual_seed(seed)
    a = seed % (n // 2 + 1)
    inp = f64(make_inputs(b, l, g * k, p, r, g, n, a, initial=seed % 2 == 0, mimo_o=seed % 3 > 0))
    seq_idx = (torch.arange(l) >= split).expand(b, l).to(torch.int64) if seed % 4 < 2 else None
    kw = {"seq_idx": seq_idx, "return_final_state": True, "rotary_interleaved": interleaved}
    out, final = run(inp, "chunked", chunk, **kw)
    want, want_final = run(inp, "reference", **kw)
    assert_close(out, want, name="out")
    assert_state_close(final, want_final)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_behaviour(backend):
    # As documented: NaN in x at t (row 0, head 1, channel 0) reaches that channel of out from t to the
    # end of its document, maybe the rest of its chunk, never other rows, heads, channels or a
    # document that starts in a later chunk.
    inp = make_inputs(l=40, r=2, g=1, a=2, initial=True, extras=False)
    inp |= {"mimo_x": torch.randn(4, 2, 3), "mimo_o": torch.randn(4, 2, 3)}
    inp["x"][0, 12, 1, 0] = float("nan")
    seq_idx = torch.tensor([[0] * 24 + [1] * 16] * 2)  # the second document starts at chunk edge 24
    for kw in ({}, {"seq_idx": seq_idx}):
        out, final = run(inp, backend, 8, return_final_state=True, **kw)
        nan = torch.isnan(out)
        doc_end = 24 if kw else 40
        assert nan[0, 12:doc_end, 1, 0].all()
        assert not nan[0, :8].any()
        assert not nan[1].any() and not nan[:, :, [0, 2, 3]].any() and not nan[:, :, :, 1:].any()
        assert not nan[0, doc_end:].any()
        if backend == "reference":
            assert not nan[0, :12].any()
        assert torch.isnan(final.ssm[0, 1, 0]).all() == (not kw)
        assert not torch.isnan(final.ssm[1]).any() and not torch.isnan(final.ssm[0, [0, 2, 3]]).any()


def _bad(**changes):
    inp = make_inputs(b=2, l=10, h=4, p=3, r=2, g=2, n=6, a=2, initial=True)
    inp["seq_idx"] = torch.zeros(2, 10, dtype=torch.int32)
    inp.update(changes)
    return inp


S = random_state(2, 4, 3, 2, 6, 2)


@pytest.mark.parametrize(
    "changes, exc, match",
    [
        ({"x": torch.randn(2, 10, 4)}, ValueError, "x"),
        ({"x": torch.randint(0, 3, (2, 10, 4, 3))}, TypeError, "x"),
        ({"x": [[1.0]]}, TypeError, "x"),
        ({"dt": torch.randn(2, 11, 4)}, ValueError, "dt"),
        ({"dt": torch.randn(3, 10, 4)}, ValueError, "dt"),
        ({"A": torch.randn(4)}, ValueError, "A"),
        ({"B": torch.randn(2, 10, 2, 6)}, ValueError, "B"),
        ({"C": torch.randn(2, 10, 1, 2, 6)}, ValueError, "C"),
        ({"C": torch.randn(2, 10, 2, 2, 7)}, ValueError, "C"),
        ({"B": torch.randn(2, 10, 2, 3, 6), "C": torch.randn(2, 10, 2, 3, 6)}, ValueError, "divisible by groups"),
        ({"trap": torch.randn(2, 10, 5)}, ValueError, "trap"),
        ({"trap": None}, TypeError, "trap"),
        ({"angles": torch.randn(2, 10, 4, 4)}, ValueError, "angles"),
        ({"angles": torch.randn(2, 10, 4)}, ValueError, "angles"),
        ({"D": torch.randn(4, 3)}, ValueError, "D"),
        ({"z": torch.randn(2, 10, 4, 2)}, ValueError, "z"),
        ({"B_bias": torch.randn(4, 1, 6)}, ValueError, "B_bias"),
        ({"C_bias": torch.randn(4, 2)}, ValueError, "C_bias"),
        ({"mimo_x": torch.randn(4, 2, 2)}, ValueError, "mimo_x"),
        ({"mimo_o": torch.randn(3, 2, 3)}, ValueError, "mimo_o"),
        ({"initial_state": S[:3]}, TypeError, "initial_state"),
        ({"initial_state": S._replace(ssm=torch.randn(2, 4, 3, 5))}, ValueError, "initial_state.ssm"),
        ({"initial_state": S._replace(last_B=torch.randn(2, 1, 4, 6))}, ValueError, "initial_state.last_B"),
        ({"initial_state": S._replace(angle=torch.randn(2, 4, 3))}, ValueError, "initial_state.angle"),
        ({"initial_state": S._replace(last_x=torch.randn(2, 4, 3, device="meta"))}, ValueError, "device"),
        ({"seq_idx": torch.zeros(2, 10)}, TypeError, "seq_idx"),
        ({"seq_idx": torch.zeros(2, 9, dtype=torch.int32)}, ValueError, "seq_idx"),
        ({"B": torch.randn(2, 10, 2, 2, 6, device="meta")}, ValueError, "device"),
    ],
)
def test_bad_inputs(changes, exc, match):
    with pytest.raises(exc, match=match):
        run(_bad(**changes), chunk_size=4)


@pytest.mark.parametrize("dim, match", [(0, "batch"), (1, "length")])
def test_empty_batch_or_length(dim, match):
    per_token = ("x", "dt", "A", "B", "C", "trap", "angles", "z")
    inp = {k: (v.narrow(dim, 0, 0) if k in per_token else v) for k, v in make_inputs().items()}
    with pytest.raises(ValueError, match=match):
        run(inp)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"chunk_size": 4.0}, TypeError, "chunk_size"),
        ({"rotary_interleaved": 1}, TypeError, "rotary_interleaved"),
        ({"return_final_state": "yes"}, TypeError, "return_final_state"),
        ({"backend": "cuda"}, ValueError, "backend"),
        ({"backend": "triton"}, ValueError, "triton"),
    ],
)
def test_bad_options(kw, exc, match):
    kw = {"chunk_size": 4, **kw}
    with pytest.raises(exc, match=match):
        mamba3_scan(**_bad(), **kw)


def test_step_bad_inputs():
    inp = make_inputs(b=2, l=1, h=4, p=3, r=2, g=2, n=6, a=2)
    one = {k: (v[:, 0] if k in ("x", "dt", "A", "B", "C", "trap", "angles", "z") else v) for k, v in inp.items()}
    state = random_state(2, 4, 3, 2, 6, 2)
    with pytest.raises(TypeError, match="state"):
        mamba3_step(state.ssm, **one)
    with pytest.raises(ValueError, match="state.last_x"):
        mamba3_step(state._replace(last_x=torch.zeros(2, 4, 2)), **one)
    with pytest.raises(ValueError, match="x must have shape"):
        mamba3_step(state, **dict(one, x=inp["x"]))


def test_docstring_examples():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for fn in (mamba3.mamba3_scan, mamba3.mamba3_step):
        for test in finder.find(fn, globs={"torch": torch, **vars(mamba3)}):
            runner.run(test)
    assert runner.summarize(verbose=False).attempted > 0
    assert runner.failures == 0


def block_ids(b, l):
    """Documents around blocks of 24 positions (chunk 8, 3 chunks per block): row 0 starts documents at
    a block boundary (24), inside a block (30), one step before (47) and after (49) the next boundary (a
    2-token document straddles 48); row 1 at a chunk edge inside a block (16) and at a boundary (48)."""
    ids = torch.zeros(b, l, dtype=torch.int64)
    for cut in (24, 30, 47, 49):
        ids[0, cut:] += 1
    for cut in (16, 48):
        ids[1:, cut:] += 1
    return ids


def _blocked(inp, block_chunks, chunk_size=8, **kw):
    """The chunked backend called with a forced block size (mamba3_scan validates, then picks the default)."""
    return chunked.mamba3_chunked(Mamba3Inputs.from_args(dict(inp, chunk_size=chunk_size, **kw)), block_chunks=block_chunks)


@pytest.mark.parametrize("block_chunks", [1, 3])
@pytest.mark.parametrize("r, g, a, interleaved", CONFIGS)
@pytest.mark.parametrize("packed", [False, True])
def test_blocks_match_float64_reference(block_chunks, r, g, a, interleaved, packed):
    # l = 61: 8 chunks of 8 (the last one padded), blocks of 8 or 24 positions (the last one short).
    inp = make_inputs(b=2, l=61, h=4, r=r, g=g, a=a, initial=True)
    kw = {"rotary_interleaved": interleaved, "seq_idx": block_ids(2, 61) if packed else None}
    leaves = {k: Mamba3ScanState(*(t.clone().requires_grad_() for t in v)) if isinstance(v, tuple)
              else v.clone().requires_grad_() for k, v in inp.items()}
    leaves64 = {k: Mamba3ScanState(*(float64_leaf(t) for t in v)) if isinstance(v, tuple) else float64_leaf(v)
                for k, v in leaves.items()}
    out, final = _blocked(leaves, block_chunks, **kw)
    want, want_final = run(leaves64, "reference", return_final_state=True, **kw)
    assert_state_close(final, want_final, torch.float32)
    flat = {k: v for k, v in leaves.items() if not isinstance(v, tuple)}
    flat64 = {k: v for k, v in leaves64.items() if not isinstance(v, tuple)}
    flat |= {f"initial_state.{f}": t for f, t in zip(Mamba3ScanState._fields, leaves["initial_state"])}
    flat64 |= {f"initial_state.{f}": t for f, t in zip(Mamba3ScanState._fields, leaves64["initial_state"])}
    # The angle enters through cos only (its wrap at 2π must not matter); every other output as it is.
    assert_outputs_and_grads_close(
        [out, final.ssm, final.last_B, final.last_x, torch.cos(final.angle)],
        [want, want_final.ssm, want_final.last_B, want_final.last_x, torch.cos(want_final.angle)],
        flat, flat64, torch.float32, names=["out", "ssm", "last_B", "last_x", "cos(angle)"])


@pytest.mark.parametrize("block_chunks", [1, 2, 3])
@pytest.mark.parametrize("l", [8, 23, 24, 25, 61])
def test_blocks_equal_one_block_float64(block_chunks, l):
    # Blocks change only the rounding: float64 results agree with the one-block computation to 1e-10.
    inp = f64(make_inputs(b=2, l=l, r=2, g=1, a=3, initial=l % 2 == 1))
    kw = {"rotary_interleaved": False, "seq_idx": block_ids(2, l)}
    out, final = _blocked(inp, block_chunks, **kw)
    want, want_final = _blocked(inp, 8, **kw)
    assert_close(out, want, name="out")
    assert_state_close(final, want_final)


def test_block_count(monkeypatch):
    calls = []
    block = chunked._block
    monkeypatch.setattr(chunked, "_block", lambda *a, **kw: calls.append(a[0].x.shape[1]) or block(*a, **kw))
    inp = make_inputs(b=1, l=61)
    _blocked(inp, 3)
    assert calls == [24, 24, 13]
    calls.clear()
    _blocked(inp, 8)  # 61 positions fit in one block of 64: computed in one piece, without splitting
    assert calls == [61]
    # The default block holds about _BLOCK_ELEMENTS elements of b h T r max(T r, n, p) per chunk.
    calls.clear()
    monkeypatch.setattr(chunked, "_BLOCK_ELEMENTS", 2 * 1 * 4 * 8 * 1 * 8)
    out = run(inp, chunk_size=8)
    assert calls == [16] * 3 + [13]
    assert_close(out, run(f64(inp), "reference"), torch.float32, name="out with the default block")


def test_default_blocks_per_device():
    # On a CPU blocks keep temporaries small; on a GPU they only bound memory, so that the GPU
    # benchmark's training shape (batch 8, 24 heads of 64, N 128, chunk 64, L 8192) stays one block.
    cpu, gpu = (chunked.default_block_chunks(8, 24, 64, 1, 128, 64, torch.device(d)) for d in ("cpu", "cuda"))
    assert cpu == 1 and gpu * 64 >= 8192
    assert chunked.default_block_chunks(1, 4, 32, 1, 64, 64, torch.device("cpu")) * 64 <= 8192


def test_blocks_keep_nan_in_its_document():
    # NaN in the first document must not cross a reset at a block boundary (24), where the carried
    # state is replaced, nor reach the other row.
    inp = make_inputs(l=40, r=2, g=1, a=2, initial=True, extras=False)
    inp["x"][0, 12, 1, 0] = float("nan")
    seq_idx = torch.tensor([[0] * 24 + [1] * 16] * 2)
    out, final = _blocked(inp, 1, seq_idx=seq_idx)
    assert torch.isnan(out[0, 12:24, :, 1, 0]).all()
    assert not torch.isnan(out[0, 24:]).any() and not torch.isnan(out[1]).any()
    assert not any(torch.isnan(t).any() for t in final)


def test_gradcheck_blocks():
    inp = f64(make_inputs(b=2, l=11, h=2, p=2, r=2, g=1, n=4, a=1, initial=True))
    state = inp.pop("initial_state")
    names = list(inp)
    seq_idx = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2], [0] * 6 + [1] * 5])

    def fn(*tensors):
        args = dict(zip(names, tensors[:len(names)]))
        inputs = Mamba3Inputs.from_args(dict(args, chunk_size=2, seq_idx=seq_idx,
                                             initial_state=Mamba3ScanState(*tensors[len(names):])))
        out, final = chunked.mamba3_chunked(inputs, block_chunks=2)
        return out, final.ssm, final.last_B, final.last_x, torch.sin(final.angle)

    # fast_mode: random projections of the Jacobian (seconds instead of tens of seconds on a loaded CI machine).
    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (*inp.values(), *state)], fast_mode=True)
