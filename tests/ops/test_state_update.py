"""Tests for ssmkit.ops.state_update: decode steps against the full scan and a hand-written recurrence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.ops.selective_scan import selective_scan_fn
from ssmkit.ops.state_update import selective_state_update
from ssmkit.testing import assert_close


def _mamba1(b, d, n, l, dtype=torch.float32, groups=None):
    bc = (b, n, l) if groups is None else (b, groups, n, l)
    return dict(
        u=torch.randn(b, d, l, dtype=dtype),
        delta=torch.randn(b, d, l, dtype=dtype) - 1,
        A=-torch.rand(d, n, dtype=dtype) * 3,
        B=torch.randn(bc, dtype=dtype),
        C=torch.randn(bc, dtype=dtype),
        D=torch.randn(d, dtype=dtype),
        z=torch.randn(b, d, l, dtype=dtype),
        delta_bias=torch.randn(d, dtype=dtype) * 0.5,
    )


def _decode_mamba1(kw, state):
    ys = []
    for t in range(kw["u"].shape[-1]):
        ys.append(
            selective_state_update(
                state, kw["u"][..., t], kw["delta"][..., t], kw["A"], kw["B"][..., t], kw["C"][..., t],
                D=kw["D"], z=kw["z"][..., t], dt_bias=kw["delta_bias"], dt_softplus=True,
            )
        )
    return torch.stack(ys, dim=-1)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("groups", [None, 1, 3])
@pytest.mark.parametrize(
    "dtype, state_dtype",
    [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
     (torch.float16, torch.float32), (torch.float32, torch.float64)],
)
def test_mamba1_steps_equal_the_scan(dtype, state_dtype, groups, backend):
    b, d, n, l = 2, 6, 4, 13
    kw = _mamba1(b, d, n, l, dtype, groups)
    h0 = torch.randn(b, d, n, dtype=state_dtype)
    state = h0.clone()
    ys = _decode_mamba1(kw, state)
    f64 = {k: v.double() for k, v in kw.items()}
    out, last = selective_scan_fn(
        **f64, delta_softplus=True, return_last_state=True, initial_state=h0.double(), backend=backend
    )
    assert ys.dtype == dtype and state.dtype == state_dtype
    assert_close(ys, out, dtype, name="y")
    assert_close(state, last, state_dtype, name="state")


def _ssd_recurrence(state, xs, dts, A, B, C, D, z, dt_bias):
    """Hand-written Mamba-2 recurrence with one scalar decay per head, one step at a time (float64).

    state (b, h, p, n); xs, z (b, l, h, p); dts (b, l, h); A, D, dt_bias (h,); B, C (b, l, g, n).
    """
    b, l, h, p = xs.shape
    rep = h // B.shape[2]
    ys = []
    for t in range(l):
        dt = F.softplus(dts[:, t] + dt_bias)  # (b, h)
        Bh = B[:, t].repeat_interleave(rep, dim=1)  # (b, h, n)
        Ch = C[:, t].repeat_interleave(rep, dim=1)
        for i in range(h):
            a = torch.exp(dt[:, i] * A[i])[:, None, None]
            state[:, i] = a * state[:, i] + (dt[:, i, None] * xs[:, t, i])[:, :, None] * Bh[:, i, None, :]
        y = torch.einsum("bhpn,bhn->bhp", state, Ch) + D[:, None] * xs[:, t]
        ys.append(y * F.silu(z[:, t]))
    return torch.stack(ys, dim=1)


@pytest.mark.parametrize("form", ["compact", "full"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_mamba2_steps_equal_a_hand_written_recurrence(dtype, form):
    b, l, h, p, g, n = 2, 5, 6, 3, 2, 4
    xs, z = torch.randn(b, l, h, p, dtype=dtype), torch.randn(b, l, h, p, dtype=dtype)
    dts = torch.randn(b, l, h, dtype=dtype) - 1
    A, D, dt_bias = -torch.rand(h, dtype=dtype) * 4, torch.randn(h, dtype=dtype), torch.randn(h, dtype=dtype)
    B, C = torch.randn(b, l, g, n, dtype=dtype), torch.randn(b, l, g, n, dtype=dtype)
    h0 = torch.randn(b, h, p, n, dtype=torch.float64)
    f64 = [t.double() for t in (xs, dts, A, B, C, D, z, dt_bias)]
    expected_state = h0.clone()
    expected = _ssd_recurrence(expected_state, *f64)
    state = h0.to(torch.float32 if dtype != torch.float64 else torch.float64)
    if form == "full":
        # mamba_ssm's Mamba-2 decode path: per-head values repeated over p (and n).
        A_, D_, bias_ = A[:, None, None].expand(h, p, n), D[:, None].expand(h, p), dt_bias[:, None].expand(h, p)
    else:
        A_, D_, bias_ = A, D, dt_bias
    ys = []
    for t in range(l):
        dt = dts[:, t, :, None].expand(b, h, p) if form == "full" else dts[:, t]
        ys.append(selective_state_update(state, xs[:, t], dt, A_, B[:, t], C[:, t], D_, z[:, t], bias_, True))
    ys = torch.stack(ys, dim=1)
    assert ys.dtype == dtype
    assert_close(ys, expected, dtype, name="y")
    assert_close(state, expected_state, torch.promote_types(dtype, torch.float32), name="state")


def test_mamba2_full_form_allows_per_element_decay():
    b, h, p, n = 1, 2, 3, 4
    state = torch.randn(b, h, p, n, dtype=torch.float64)
    x, dt = torch.randn(b, h, p, dtype=torch.float64), torch.rand(b, h, p, dtype=torch.float64)
    A = -torch.rand(h, p, n, dtype=torch.float64)
    B, C = torch.randn(b, 1, n, dtype=torch.float64), torch.randn(b, 1, n, dtype=torch.float64)
    expected_state = torch.exp(dt[..., None] * A) * state + (dt * x)[..., None] * B[:, :, None, :]
    y = selective_state_update(state, x, dt, A, B, C)
    assert_close(state, expected_state, name="state")
    assert_close(y, (expected_state * C[:, :, None, :]).sum(-1), name="y")


def test_state_is_updated_in_place_even_as_a_cache_slice():
    cache = torch.zeros(3, 2, 4, 5)  # (layers, b, d, n)
    state = cache[1]
    ptr = state.data_ptr()
    x, dt = torch.randn(2, 4), torch.rand(2, 4)
    B, C = torch.randn(2, 5), torch.randn(2, 5)
    y = selective_state_update(state, x, dt, -torch.rand(4, 5), B, C)
    assert state.data_ptr() == ptr and torch.equal(cache[1], state)
    assert_close(cache[1], (dt * x)[..., None] * B[:, None, :], name="state")
    assert_close(y, ((dt * x)[..., None] * B[:, None, :] * C[:, None, :]).sum(-1), name="y")
    assert cache[0].abs().sum() == 0 and cache[2].abs().sum() == 0
    strided = torch.zeros(2, 5, 4).transpose(1, 2)  # a non-contiguous (b, d, n) state
    selective_state_update(strided, x, dt, -torch.rand(4, 5), B, C)
    assert_close(strided, (dt * x)[..., None] * B[:, None, :], name="strided state")


def test_dt_limit_clamps_after_softplus():
    b, d, n = 2, 3, 2
    x, dt = torch.randn(b, d), torch.randn(b, d) * 5
    A, B, C = -torch.rand(d, n), torch.randn(b, n), torch.randn(b, n)
    s1, s2 = torch.zeros(b, d, n), torch.zeros(b, d, n)
    y1 = selective_state_update(s1, x, dt, A, B, C, dt_softplus=True, dt_limit=(0.1, 0.5))
    y2 = selective_state_update(s2, x, F.softplus(dt).clamp(0.1, 0.5), A, B, C)
    assert_close(y1, y2, name="y")
    assert_close(s1, s2, name="state")


def test_nan_poisons_only_its_channel_and_its_state():
    b, d, n = 1, 4, 3
    state = torch.zeros(b, d, n)
    x = torch.randn(b, d)
    x[0, 2] = float("nan")
    args = (torch.rand(b, d), -torch.rand(d, n), torch.randn(b, n), torch.randn(b, n))
    y = selective_state_update(state, x, *args)
    assert torch.equal(torch.isnan(y[0]), torch.tensor([False, False, True, False]))
    assert torch.isnan(state[0, 2]).all() and torch.isfinite(state[0, [0, 1, 3]]).all()
    y = selective_state_update(state, torch.randn(b, d), *args)
    assert torch.isnan(y[0, 2]) and torch.isfinite(y[0, [0, 1, 3]]).all()
    z = torch.randn(b, d)
    z[0, 0] = float("nan")
    state = torch.zeros(b, d, n)
    y = selective_state_update(state, torch.randn(b, d), *args, z=z)
    assert torch.isnan(y[0, 0]) and torch.isfinite(y[0, 1:]).all() and torch.isfinite(state).all()


@given(b=st.integers(1, 3), g=st.integers(1, 3), hg=st.integers(1, 3), p=st.integers(1, 3), n=st.integers(1, 4))
def test_fuzz_mamba2_compact_equals_full(b, g, hg, p, n):
    h = g * hg
    x, z = torch.randn(b, h, p), torch.randn(b, h, p)
    dt, A, D, bias = torch.randn(b, h), -torch.rand(h), torch.randn(h), torch.randn(h)
    B, C = torch.randn(b, g, n), torch.randn(b, g, n)
    s1 = torch.randn(b, h, p, n, dtype=torch.float64)
    s2 = s1.clone()
    y1 = selective_state_update(s1, x, dt, A, B, C, D, z, bias, True)
    full = (dt[..., None].expand(b, h, p), A[:, None, None].expand(h, p, n), D[:, None].expand(h, p))
    y2 = selective_state_update(s2, x, full[0], full[1], B, C, full[2], z, bias[:, None].expand(h, p), True)
    assert_close(y1, y2, name="y")
    assert_close(s1, s2, name="state")


def _bad1(**changes):
    b, d, n, g = 2, 4, 3, 2
    kw = dict(
        state=torch.zeros(b, d, n), x=torch.randn(b, d), dt=torch.rand(b, d), A=-torch.rand(d, n),
        B=torch.randn(b, g, n), C=torch.randn(b, g, n), D=torch.randn(d), z=torch.randn(b, d),
        dt_bias=torch.randn(d),
    )
    kw.update(changes)
    return kw


def _bad2(**changes):
    b, h, p, n, g = 2, 4, 2, 3, 2
    kw = dict(
        state=torch.zeros(b, h, p, n), x=torch.randn(b, h, p), dt=torch.rand(b, h), A=-torch.rand(h),
        B=torch.randn(b, g, n), C=torch.randn(b, g, n), D=torch.randn(h), z=torch.randn(b, h, p),
        dt_bias=torch.randn(h),
    )
    kw.update(changes)
    return kw


@pytest.mark.parametrize(
    "kw, error, name",
    [
        (_bad1(state=torch.zeros(2, 4, 3, dtype=torch.int64)), TypeError, "state"),
        (_bad1(state=torch.zeros(2, 4)), ValueError, "state"),
        (_bad1(state=torch.zeros(0, 4, 3), x=torch.randn(0, 4)), ValueError, "x has an empty batch"),
        (_bad1(x=torch.randn(3, 4)), ValueError, "x"),
        (_bad1(x=torch.ones(2, 4, dtype=torch.int32)), TypeError, "x"),
        (_bad1(dt=torch.rand(2, 4, 1)), ValueError, "dt"),
        (_bad1(A=-torch.rand(4)), ValueError, "A"),
        (_bad1(A=-torch.rand(5, 3)), ValueError, "A"),
        (_bad1(B=torch.randn(2, 3, 3), C=torch.randn(2, 3, 3)), ValueError, "g=3"),
        (_bad1(C=torch.randn(2, 3)), ValueError, "C"),
        (_bad1(D=torch.randn(4, 1)), ValueError, "D"),
        (_bad1(z=torch.randn(2, 5)), ValueError, "z"),
        (_bad1(dt_bias=torch.randn(3)), ValueError, "dt_bias"),
        (_bad1(dt_bias="0.5"), TypeError, "dt_bias"),
        (_bad1(x=torch.randn(2, 4, device="meta")), ValueError, "device"),
        (_bad2(x=torch.randn(2, 4, 3)), ValueError, "x"),
        (_bad2(dt=torch.rand(2, 5)), ValueError, "dt"),
        (_bad2(A=-torch.rand(4, 2)), ValueError, "A"),
        (_bad2(B=torch.randn(2, 3, 3), C=torch.randn(2, 3, 3)), ValueError, "g=3"),
        (_bad2(D=torch.randn(4, 3)), ValueError, "D"),
        (_bad2(dt_bias=torch.randn(2, 2)), ValueError, "dt_bias"),
        (_bad2(z=torch.randn(2, 4)), ValueError, "z"),
        (_bad2(state=torch.zeros(2, 4, 2, 3, 1)), ValueError, "state"),
    ],
)
def test_bad_inputs_name_the_argument(kw, error, name):
    with pytest.raises(error, match=name):
        selective_state_update(**kw)


@pytest.mark.parametrize(
    "limit, error", [((0.5, 0.1), ValueError), (0.1, TypeError), ((0.0, float("nan")), ValueError)]
)
def test_bad_dt_limit(limit, error):
    with pytest.raises(error, match="dt_limit"):
        selective_state_update(**_bad1(), dt_limit=limit)


def _pool_case(mamba2: bool, b: int = 4, slots: int = 6, dtype=torch.float32):
    """Inputs of one step for b rows over a pool of ``slots`` states (Mamba-1 or grouped Mamba-2 shapes)."""
    if mamba2:
        h, p, n, g = 4, 3, 5, 2
        pool = torch.randn(slots, h, p, n)
        args = (torch.randn(b, h, p, dtype=dtype), torch.randn(b, h, dtype=dtype), -torch.rand(h) * 2,
                torch.randn(b, g, n, dtype=dtype), torch.randn(b, g, n, dtype=dtype))
        kw = dict(D=torch.randn(h), z=torch.randn(b, h, p, dtype=dtype), dt_bias=torch.randn(h), dt_softplus=True)
    else:
        d, n = 6, 4
        pool = torch.randn(slots, d, n)
        args = (torch.randn(b, d, dtype=dtype), torch.randn(b, d, dtype=dtype), -torch.rand(d, n) * 2,
                torch.randn(b, n, dtype=dtype), torch.randn(b, n, dtype=dtype))
        kw = dict(D=torch.randn(d), z=torch.randn(b, d, dtype=dtype), dt_bias=torch.randn(d), dt_softplus=True)
    return pool, args, kw


@pytest.mark.parametrize("pad_slot_id", [-1, 99])
@pytest.mark.parametrize("mamba2", [False, True])
def test_state_batch_indices_step_the_named_slots_and_skip_padding(mamba2, pad_slot_id):
    pool, args, kw = _pool_case(mamba2)
    indices = torch.tensor([5, pad_slot_id, 0, -3], dtype=torch.int32)
    before = pool.clone()
    y = selective_state_update(pool, *args, **kw, state_batch_indices=indices, pad_slot_id=pad_slot_id)
    for row, slot in enumerate(indices.tolist()):
        if slot < 0 or slot == pad_slot_id:
            assert torch.equal(y[row], torch.zeros_like(y[row]))
            continue
        # The same row stepped alone on its own state, in float64.
        one = before[slot : slot + 1].double()
        row_args = [a[row : row + 1].double() if a.shape[0] == indices.shape[0] and a.dim() > 1 else a.double()
                    for a in args]
        row_kw = {k: (v[row : row + 1].double() if k == "z" else v.double()) if isinstance(v, torch.Tensor) else v
                  for k, v in kw.items()}
        expected = selective_state_update(one, *row_args, **row_kw)
        assert_close(y[row : row + 1], expected, torch.float32, name=f"y row {row}")
        assert_close(pool[slot : slot + 1], one, torch.float32, name=f"slot {slot}")
    untouched = [s for s in range(pool.shape[0]) if s not in (5, 0)]
    assert torch.equal(pool[untouched], before[untouched])


def test_state_batch_indices_are_checked():
    pool, args, kw = _pool_case(True)
    with pytest.raises(ValueError, match="< the 6 state slots"):
        selective_state_update(pool, *args, **kw, state_batch_indices=torch.tensor([0, 1, 6, 2]))
    with pytest.raises(ValueError, match="state_batch_indices must have shape"):
        selective_state_update(pool, *args, **kw, state_batch_indices=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        selective_state_update(pool, *args, **kw, state_batch_indices=torch.tensor([0.0, 1, 2, 3]))
    # Without indices the state's batch must be x's.
    with pytest.raises(ValueError, match="x must have shape"):
        selective_state_update(pool, *args, **kw)


@pytest.mark.parametrize("state_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mamba2", [False, True])
def test_half_precision_states_step_in_float32_and_round_once(mamba2, state_dtype):
    pool, args, kw = _pool_case(mamba2, b=3, slots=3)
    state = pool.to(state_dtype)
    expected_state = state.double()
    up = [a.double() for a in args]
    kw64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    expected = selective_state_update(expected_state, *up, **kw64)
    ptr = state.data_ptr()
    y = selective_state_update(state, *args, **kw)
    assert state.dtype == state_dtype and state.data_ptr() == ptr
    assert_close(state, expected_state, state_dtype, name="state")
    # y reads the float32 state before rounding: only x's dtype limits it.
    assert_close(y, expected, torch.float32, name="y")


def test_matches_transformers_torch_step():
    """transformers' Mamba decode fallback (its own torch function) gives the same step."""
    modeling = pytest.importorskip("transformers.models.mamba.modeling_mamba")
    fallback = getattr(modeling, "mamba_selective_state_update", None)
    if fallback is None:
        pytest.skip("this transformers has no mamba_selective_state_update (older than 5.x)")
    b, d, n = 2, 6, 4
    x, dt, z = torch.randn(b, d), torch.randn(b, d), torch.randn(b, d)
    A, B, C, D, bias = -torch.rand(d, n), torch.randn(b, n), torch.randn(b, n), torch.randn(d), torch.randn(d)
    s1 = torch.randn(b, d, n)
    s2 = s1.clone()
    y1 = fallback(s1, x, dt, A, B, C, D, dt_bias=bias, dt_softplus=True, z=z)
    y2 = selective_state_update(s2, x, dt, A, B, C, D, z, bias, True)
    assert_close(y2, y1, torch.float32, name="y")
    assert_close(s2, s1, torch.float32, name="state")
