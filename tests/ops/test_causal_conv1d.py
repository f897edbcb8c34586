"""Tests for ssmkit.ops.causal_conv1d: every backend against the sequential reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from ssmkit.testing import assert_close

BACKENDS = ("reference", "chunked")


def _x(batch, dim, length, dtype=torch.float32, layout="contiguous"):
    """x (b, d, l) in the given memory layout."""
    if layout == "channel_last":
        return torch.randn(batch, length, dim, dtype=dtype).transpose(1, 2)
    if layout == "strided":
        return torch.randn(batch, dim, 2 * length, dtype=dtype)[..., ::2]
    return torch.randn(batch, dim, length, dtype=dtype)


def _packed_seq_idx(batch, length, generator=None):
    """Sorted document indices with short documents (length 1 included) mixed with long ones."""
    cuts = torch.rand(batch, length, generator=generator) < 0.15
    cuts[:, 0] = False
    return cuts.long().cumsum(dim=1).to(torch.int32) + 3


def _inputs(batch, dim, length, width, dtype, *, layout="contiguous", packed=False, init=False):
    x = _x(batch, dim, length, dtype, layout)
    weight = torch.randn(dim, width, dtype=dtype) / width**0.5
    bias = torch.randn(dim, dtype=dtype)
    seq_idx = _packed_seq_idx(batch, length) if packed else None
    initial_states = torch.randn(batch, dim, width - 1, dtype=dtype) if init else None
    return x, weight, bias, seq_idx, initial_states


def _to(t, dtype):
    return t.to(dtype) if t is not None and t.is_floating_point() else t


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("length", [1, 63, 257])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_backends_match_reference(dtype, length, width, packed, init, activation):
    layout = "channel_last" if (length + width) % 2 else "contiguous"
    x, weight, bias, seq_idx, initial_states = _inputs(
        2, 8, length, width, dtype, layout=layout, packed=packed, init=init
    )
    args = (x, weight, bias, seq_idx, initial_states)
    exp_out, exp_final = causal_conv1d_fn(
        *(_to(a, torch.float64) for a in args), True, None, activation, backend="reference"
    )
    for backend in BACKENDS:
        out, final = causal_conv1d_fn(*args, return_final_states=True, activation=activation, backend=backend)
        assert out.dtype == dtype and final.dtype == dtype
        assert_close(out, exp_out, dtype, name=f"{backend} out")
        assert_close(final, exp_final, dtype, name=f"{backend} final_states")
    auto = causal_conv1d_fn(*args, activation=activation)
    assert torch.equal(auto, causal_conv1d_fn(*args, activation=activation, backend="chunked"))


def test_definition_on_a_hand_example():
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    weight = torch.tensor([[10.0, 1.0]])
    init = torch.tensor([[[5.0]]])
    for backend in BACKENDS:
        out, final = causal_conv1d_fn(
            x, weight, torch.tensor([0.5]), initial_states=init, return_final_states=True, backend=backend
        )
        assert out.tolist() == [[[51.5, 12.5, 23.5, 34.5]]]
        assert final.tolist() == [[[4.0]]]
        packed = causal_conv1d_fn(x, weight, seq_idx=torch.tensor([[0, 0, 1, 1]]), backend=backend)
        assert packed.tolist() == [[[1.0, 12.0, 3.0, 34.0]]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_final_states_are_the_last_inputs(backend):
    width = 5
    x, weight, bias, _, init = _inputs(2, 3, 10, width, torch.float64, init=True)
    _, final = causal_conv1d_fn(x, weight, bias, initial_states=init, return_final_states=True, backend=backend)
    assert torch.equal(final, x[..., -(width - 1):])
    # Shorter than the state: the initial states fill the front.
    _, final = causal_conv1d_fn(x[..., :2], weight, bias, None, init, True, backend=backend)
    assert torch.equal(final, torch.cat([init[..., 2:], x[..., :2]], dim=-1))
    _, final = causal_conv1d_fn(x[..., :2], weight, bias, return_final_states=True, backend=backend)
    assert torch.equal(final, torch.cat([torch.zeros_like(init[..., 2:]), x[..., :2]], dim=-1))
    _, final = causal_conv1d_fn(x, weight[:, :1], return_final_states=True, backend=backend)
    assert final.shape == (2, 3, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width", [3, 4])
def test_packed_equals_each_document_alone(backend, width):
    lengths = [5, 1, 2, 17]  # documents shorter than the filter included
    length = sum(lengths)
    x, weight, bias, _, init = _inputs(2, 6, length, width, torch.float64, layout="channel_last", init=True)
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).repeat(2, 1)
    seq_idx[1] = 7  # the second row is one document
    out, final = causal_conv1d_fn(x, weight, bias, seq_idx, init, True, None, "silu", backend=backend)
    start = 0
    for i, n in enumerate(lengths):
        alone, alone_final = causal_conv1d_fn(
            x[:1, :, start : start + n], weight, bias, None, init[:1] if i == 0 else None, True, None, "silu", backend=backend
        )
        assert_close(out[:1, :, start : start + n], alone, name=f"document {i}")
        start += n
    assert_close(final[:1], alone_final, name="final state of the last document")
    whole, whole_final = causal_conv1d_fn(x[1:], weight, bias, None, init[1:], True, None, "silu", backend=backend)
    assert_close(out[1:], whole, name="unpacked row")
    assert_close(final[1:], whole_final, name="unpacked row final")


@pytest.mark.parametrize("backend", BACKENDS)
def test_last_document_shorter_than_state_gets_zeros(backend):
    x, weight, _, _, init = _inputs(1, 2, 6, 4, torch.float64, init=True)
    _, final = causal_conv1d_fn(x, weight, seq_idx=torch.tensor([[0, 0, 0, 0, 1, 1]]), initial_states=init,
                                return_final_states=True, backend=backend)
    assert torch.equal(final[..., 0], torch.zeros(1, 2))
    assert torch.equal(final[..., 1:], x[..., 4:])


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend, init, packed):
    x, weight, bias, seq_idx, initial_states = _inputs(2, 3, 9, 3, torch.float64, packed=packed, init=True)
    if packed:
        # Documents starting at 1 and 2 have windows reaching before position 0.
        seq_idx = torch.tensor([[0, 1, 1, 1, 2, 2, 2, 2, 3], [5, 5, 6, 6, 6, 6, 6, 7, 7]])
    tensors = [t.requires_grad_() for t in (x, weight, bias, initial_states)]
    if not init:
        tensors = tensors[:3]

    def fn(x, weight, bias, initial_states=None):
        return causal_conv1d_fn(x, weight, bias, seq_idx, initial_states, True, None, "silu", backend=backend)

    assert torch.autograd.gradcheck(fn, tuple(tensors))


@pytest.mark.parametrize("grad_layout", ["contiguous", "channel_last"])
@pytest.mark.parametrize("layout", ["contiguous", "channel_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_gradients_match_reference(dtype, layout, grad_layout):
    batch, dim, length, width = 3, 16, 63, 4
    x, weight, bias, seq_idx, init = _inputs(batch, dim, length, width, dtype, layout=layout, packed=True, init=True)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias, init)]
    grad_out = _x(batch, dim, length, dtype, grad_layout)
    grad_final = torch.randn(batch, dim, width - 1, dtype=dtype)
    results = {}
    for backend in BACKENDS:
        ins = leaves if backend == "chunked" else [t.detach().double().requires_grad_() for t in leaves]
        out, final = causal_conv1d_fn(ins[0], ins[1], ins[2], seq_idx, ins[3], True, None, "silu", backend=backend)
        grads = torch.autograd.grad((out, final), ins, (grad_out.to(out.dtype), grad_final.to(out.dtype)))
        results[backend] = grads
    for name, got, want in zip(("x", "weight", "bias", "initial_states"), results["chunked"], results["reference"]):
        assert got.dtype == dtype
        assert_close(got, want, dtype, name=f"d{name}")


def test_output_keeps_channel_last_layout_and_can_be_modified_in_place():
    x, weight, bias, seq_idx, _ = _inputs(2, 8, 20, 4, torch.float32, layout="channel_last", packed=True)
    x.requires_grad_()
    out = causal_conv1d_fn(x, weight, bias, seq_idx)
    assert out.stride(1) == 1
    out.mul_(2)
    out.sum().backward()
    expected = torch.autograd.grad(2 * causal_conv1d_fn(x, weight, bias, seq_idx, backend="reference").sum(), x)[0]
    assert_close(x.grad, expected)


@given(
    batch=st.integers(1, 3),
    dim=st.integers(1, 5),
    length=st.integers(1, 40),
    width=st.integers(1, 5),
    packed=st.booleans(),
    init=st.booleans(),
    activation=st.sampled_from([None, "silu", "swish"]),
    layout=st.sampled_from(["contiguous", "channel_last", "strided"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_chunked_matches_reference(batch, dim, length, width, packed, init, activation, layout, seed):
    torch.manual_seed(seed)
    x, weight, bias, seq_idx, initial_states = _inputs(batch, dim, length, width, torch.float64, layout=layout,
                                                       packed=packed, init=init)
    x.requires_grad_()
    weight.requires_grad_()
    results = {}
    for backend in BACKENDS:
        out, final = causal_conv1d_fn(x, weight, bias, seq_idx, initial_states, True, None, activation, backend=backend)
        cotangent = torch.ones_like(out).cumsum(-1)
        results[backend] = (out, final, *torch.autograd.grad(out, (x, weight), cotangent))
    for name, got, want in zip(("out", "final", "dx", "dweight"), results["chunked"], results["reference"]):
        assert_close(got, want, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_x_stays_in_its_window_and_document(backend):
    width, length = 4, 16
    x, weight, bias, _, _ = _inputs(2, 3, length, width, torch.float64)
    seq_idx = torch.tensor([[0] * 7 + [1] * 9, [0] * 16])
    x[0, 1, 5] = float("nan")  # two positions before a document boundary
    x[1, 2, length - 2] = float("nan")  # inside the final state
    out, final = causal_conv1d_fn(x, weight, bias, seq_idx, None, True, None, "silu", backend=backend)
    expected = torch.zeros_like(out, dtype=torch.bool)
    expected[0, 1, 5:7] = True
    expected[1, 2, length - 2 :] = True
    assert torch.equal(out.isnan(), expected)
    expected_final = torch.zeros_like(final, dtype=torch.bool)
    expected_final[1, 2, 1] = True
    assert torch.equal(final.isnan(), expected_final)


def test_nan_in_weight_poisons_only_its_channel():
    x, weight, bias, seq_idx, init = _inputs(2, 4, 30, 4, torch.float64, packed=True, init=True)
    weight[2, 0] = float("nan")
    outs = [causal_conv1d_fn(x, weight, bias, seq_idx, init, backend=b) for b in BACKENDS]
    assert outs[0][:, 2].isnan().any()
    assert not outs[0][:, [0, 1, 3]].isnan().any()
    assert_close(outs[1], outs[0], name="same NaN pattern")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra", [0, 1, 3])
def test_update_steps_match_full_sequence(backend, extra):
    """Prefill with causal_conv1d_fn, then decode token by token; extra = state_len - (w - 1)."""
    batch, dim, length, width, prefix = 2, 5, 12, 4, 5
    x, weight, bias, _, init = _inputs(batch, dim, length, width, torch.float64, init=True)
    full = causal_conv1d_fn(x, weight, bias, None, init, activation="silu", backend="reference")
    _, final = causal_conv1d_fn(x[..., :prefix], weight, bias, None, init, True, None, "silu", backend=backend)
    # Entries older than w - 1 are never read: fill them with garbage to prove it.
    state = torch.cat([torch.full((batch, dim, extra), 1e6, dtype=torch.float64), final], dim=-1)
    state_ptr = state.data_ptr()
    steps = [
        causal_conv1d_update(x[..., t], state, weight, bias, "silu", backend=backend) for t in range(prefix, length)
    ]
    assert all(s.shape == (batch, dim) for s in steps)
    assert_close(torch.stack(steps, dim=-1), full[..., prefix:], name="decoded outputs")
    assert state.data_ptr() == state_ptr
    assert torch.equal(state, torch.cat([init, x], dim=-1)[..., -(width - 1 + extra):])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("new_tokens", [2, 7])
def test_multi_token_update_equals_single_steps(backend, new_tokens):
    batch, dim, width = 2, 6, 4
    weight, bias = torch.randn(dim, width), torch.randn(dim)
    x = torch.randn(batch, dim, new_tokens)
    for state_len in (width - 1, width):
        state_a = torch.randn(batch, dim, state_len)
        state_b = state_a.clone()
        multi = causal_conv1d_update(x, state_a, weight, bias, "silu", backend=backend)
        single = torch.stack(
            [causal_conv1d_update(x[..., t], state_b, weight, bias, "silu", backend=backend)
             for t in range(new_tokens)],
            dim=-1,
        )
        assert multi.shape == x.shape
        assert_close(multi, single, name="outputs")
        assert torch.equal(state_a, state_b)


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32])
def test_update_low_precision_matches_reference(state_dtype):
    batch, dim, width = 3, 16, 4
    weight, bias = torch.randn(dim, width, dtype=torch.bfloat16), torch.randn(dim, dtype=torch.bfloat16)
    x = torch.randn(batch, dim, 3, dtype=torch.bfloat16)
    state = torch.randn(batch, dim, width, dtype=state_dtype)
    expected_state = state.double()
    expected = causal_conv1d_update(
        x.double(), expected_state, weight.double(), bias.double(), "silu", backend="reference"
    )
    out = causal_conv1d_update(x, state, weight, bias, "silu", backend="chunked")
    assert out.dtype == torch.bfloat16 and state.dtype == state_dtype
    assert_close(out, expected, torch.bfloat16)
    assert_close(state, expected_state, state_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_nan_lasts_w_steps(backend):
    width = 3
    weight, bias = torch.randn(2, width), torch.randn(2)
    state = torch.zeros(1, 2, width)
    tokens = torch.randn(1, 2, 6)
    tokens[0, 0, 1] = float("nan")
    outs = torch.stack(
        [causal_conv1d_update(tokens[..., t], state, weight, bias, backend=backend) for t in range(6)], dim=-1
    )
    assert outs[0, 0].isnan().tolist() == [False, True, True, True, False, False]
    assert not outs[0, 1].isnan().any()


def _bad_fn_cases():
    x, weight, bias = torch.randn(2, 4, 10), torch.randn(4, 3), torch.randn(4)
    ok = dict(x=x, weight=weight, bias=bias)
    return [
        (dict(ok, x=torch.randn(4, 10)), ValueError, "x must have shape"),
        (dict(ok, x=torch.randn(2, 4, 10).long()), TypeError, "x must be a floating"),
        (dict(ok, x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
        (dict(ok, weight=torch.randn(5, 3)), ValueError, "weight must have shape"),
        (dict(ok, weight=torch.randn(4, 3, 1)), ValueError, "weight must have shape"),
        (dict(ok, weight=torch.randn(4, 0)), ValueError, "weight has an empty width"),
        (dict(ok, bias=torch.randn(3)), ValueError, "bias must have shape"),
        (dict(ok, seq_idx=torch.zeros(2, 10)), TypeError, "seq_idx must be an integer"),
        (dict(ok, seq_idx=torch.zeros(2, 9, dtype=torch.int32)), ValueError, "seq_idx must have shape"),
        (dict(ok, seq_idx=torch.zeros(3, 10, dtype=torch.int32)), ValueError, "seq_idx must have shape"),
        (dict(ok, initial_states=torch.randn(2, 4, 3)), ValueError, "initial_states must have shape"),
        (dict(ok, initial_states=torch.randn(1, 4, 2)), ValueError, "initial_states must have shape"),
        (dict(ok, x=torch.randn(0, 4, 10)), ValueError, "x has an empty batch"),
        (dict(ok, x=torch.randn(2, 4, 0)), ValueError, "x has an empty length"),
        (dict(ok, weight=torch.randn(4, 3, device="meta")), ValueError, "weight"),
        (dict(ok, bias=torch.randn(4, device="meta")), ValueError, "bias"),
        (dict(ok, activation="relu"), ValueError, "activation must be one of"),
        (dict(ok, return_final_states="yes"), TypeError, "return_final_states must be a bool"),
        (dict(ok, backend="cuda"), ValueError, "backend must be one of"),
        (dict(ok, backend="triton"), ValueError, "backend='triton'"),
    ]


@pytest.mark.parametrize("kwargs, error, message", _bad_fn_cases())
def test_fn_bad_inputs(kwargs, error, message):
    with pytest.raises(error, match=message):
        causal_conv1d_fn(**kwargs)


def _bad_update_cases():
    x, state, weight = torch.randn(2, 4), torch.randn(2, 4, 3), torch.randn(4, 3)
    ok = dict(x=x, conv_state=state, weight=weight)
    return [
        (dict(ok, x=torch.randn(2, 4, 1, 1)), ValueError, r"x must have shape \(b, d\) or \(b, d, l\)"),
        (dict(ok, x=torch.randn(2, 5)), ValueError, "weight must have shape"),
        (dict(ok, x=torch.randn(2, 4, 0)), ValueError, "x has an empty length"),
        (dict(ok, x=torch.randn(0, 4), conv_state=torch.randn(0, 4, 3)), ValueError, "x has an empty batch"),
        (dict(ok, x="token"), TypeError, "x must be a torch.Tensor"),
        (dict(ok, conv_state=torch.randn(2, 4, 1)), ValueError, "conv_state must hold at least"),
        (dict(ok, conv_state=torch.randn(3, 4, 3)), ValueError, "conv_state must have shape"),
        (dict(ok, conv_state=torch.zeros(2, 4, 3, dtype=torch.int64)), TypeError, "conv_state must be a floating"),
        (dict(ok, conv_state=torch.randn(2, 4, 3, device="meta")), ValueError, "conv_state"),
        (dict(ok, bias=torch.randn(5)), ValueError, "bias must have shape"),
        (dict(ok, activation="gelu"), ValueError, "activation must be one of"),
        (dict(ok, backend="fast"), ValueError, "backend must be one of"),
    ]


@pytest.mark.parametrize("kwargs, error, message", _bad_update_cases())
def test_update_bad_inputs(kwargs, error, message):
    with pytest.raises(error, match=message):
        causal_conv1d_update(**kwargs)


def test_chunked_with_documents_under_cpu_bf16_autocast():
    """The chunked path with seq_idx under autocast: the convolution runs in bf16 while the taps recomputed at
    document starts stay in x's dtype; output and every gradient within bf16 rounding of float64."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 8, 20), torch.randn(8, 4), torch.randn(8)
    seq = torch.tensor([[0] * 7 + [1] * 13, [0] * 3 + [1] * 17], dtype=torch.int32)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = causal_conv1d_fn(*leaves, seq, activation="silu", backend="chunked")
    y.float().sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in (x, w, b)]
    ref = causal_conv1d_fn(*ref_leaves, seq, activation="silu", backend="reference")
    ref.sum().backward()
    for ours, theirs in zip([y, *(t.grad for t in leaves)], [ref, *(t.grad for t in ref_leaves)]):
        assert (ours.double() - theirs).abs().max() <= 0.02 * theirs.abs().max()
