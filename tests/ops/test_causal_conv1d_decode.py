"""causal_conv1d's serving arguments: the conv state as a ring (cache_seqlens), a pool of states
(conv_state_indices), causal_conv1d_varlen_states, final_states_out and padding in seq_idx.

Each is checked against what it must equal: decoding token by token through a ring gives the outputs of
one causal_conv1d_fn over the whole sequence; a pooled row equals that row stepped alone.
"""

from __future__ import annotations

import pytest
import torch

from ssmkit.ops.causal_conv1d import (
    causal_conv1d_fn,
    causal_conv1d_update,
    causal_conv1d_varlen_states,
)
from ssmkit.ops.causal_conv1d.reference import causal_conv1d_varlen_states_ref
from ssmkit.testing import assert_close

BACKENDS = ("reference", "chunked")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens_per_step", [1, 3, 8])
def test_decoding_through_a_ring_equals_the_whole_sequence(backend, tokens_per_step):
    batch, dim, width, state_len, length = 2, 5, 4, 6, 24
    x = torch.randn(batch, dim, length, dtype=torch.float64)
    weight, bias = torch.randn(dim, width, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)
    expected = causal_conv1d_fn(x, weight, bias, activation="silu", backend="reference")
    # Rows start at different ring offsets: the ring's contents are what matters, not where it starts.
    offsets = torch.tensor([0, 4], dtype=torch.int32)
    ring = torch.zeros(batch, dim, state_len, dtype=torch.float64)
    seqlens = offsets.clone()
    outs = []
    for t in range(0, length, tokens_per_step):
        chunk = x[..., t : t + tokens_per_step]
        step = chunk[..., 0] if tokens_per_step == 1 else chunk
        out = causal_conv1d_update(step, ring, weight, bias, "silu", seqlens, backend=backend)
        outs.append(out[..., None] if tokens_per_step == 1 else out)
        seqlens = seqlens + chunk.shape[-1]
    assert_close(torch.cat(outs, dim=-1), expected, name="outputs")
    # The ring holds the last state_len inputs, the newest just before position seqlens % state_len.
    for row in range(batch):
        order = [(int(seqlens[row]) + i) % state_len for i in range(state_len)]
        assert_close(ring[row][:, order], x[row, :, -state_len:], name=f"ring of row {row}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("circular", [False, True])
def test_pooled_rows_step_their_slots_and_padding_rows_give_zero(backend, circular):
    slots, dim, width, state_len, tokens = 6, 4, 3, 4, 2
    pool = torch.randn(slots, dim, state_len)
    before = pool.clone()
    indices = torch.tensor([5, -1, 0], dtype=torch.int32)
    x = torch.randn(3, dim, tokens)
    weight, bias = torch.randn(dim, width), torch.randn(dim)
    seqlens = torch.tensor([1, 7, 6], dtype=torch.int32) if circular else None
    out = causal_conv1d_update(x, pool, weight, bias, "silu", seqlens, indices, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for row, slot in ((0, 5), (2, 0)):
        alone = before[slot : slot + 1].clone()
        lens = None if seqlens is None else seqlens[row : row + 1]
        expected = causal_conv1d_update(x[row : row + 1], alone, weight, bias, "silu", lens, backend="reference")
        assert_close(out[row : row + 1], expected, name=f"row {row}")
        assert_close(pool[slot : slot + 1], alone, name=f"slot {slot}")
    assert torch.equal(pool[1:5], before[1:5])


def test_update_arguments_are_checked():
    pool, x, weight = torch.zeros(3, 4, 3), torch.randn(2, 4), torch.randn(4, 3)
    with pytest.raises(ValueError, match="< the 3 slots"):
        causal_conv1d_update(x, pool, weight, conv_state_indices=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="cache_seqlens must have shape"):
        causal_conv1d_update(x, torch.zeros(2, 4, 3), weight, cache_seqlens=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        causal_conv1d_update(x, torch.zeros(2, 4, 3), weight, cache_seqlens=torch.tensor([0.0, 1.0]))


def test_update_matches_transformers_torch_fallback():
    modeling = pytest.importorskip("transformers.models.mamba.modeling_mamba")
    fallback = getattr(modeling, "causal_conv1d_update", None)
    if fallback is None:
        pytest.skip("this transformers has no causal_conv1d_update fallback (older than 5.x)")
    state = torch.randn(2, 6, 4)
    ours = state.clone()
    x, weight, bias = torch.randn(2, 6, 1), torch.randn(6, 4), torch.randn(6)
    expected = fallback(x, state, weight, bias, activation="silu")
    got = causal_conv1d_update(x, ours, weight, bias, "silu")
    assert_close(got, expected, name="out")
    assert_close(ours, state, name="conv_state")


def test_varlen_states_equal_each_sequence_final_states():
    dim, width = 5, 4
    lengths = [5, 1, 0, 9, 2]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    x = torch.randn(int(cu[-1]), dim)
    for state_len in (width - 1, width, 12):
        states = causal_conv1d_varlen_states(x, cu, state_len)
        assert states.shape == (len(lengths), dim, state_len) and states.stride(1) == 1
        assert torch.equal(states, causal_conv1d_varlen_states_ref(x, cu, state_len))
    # With state_len = w - 1 they are what causal_conv1d_fn leaves behind for each sequence alone.
    states = causal_conv1d_varlen_states(x, cu, width - 1)
    weight = torch.randn(dim, width)
    for i, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if end > start:
            _, final = causal_conv1d_fn(x[start:end].T[None], weight, return_final_states=True)
            assert torch.equal(states[i], final[0])
        else:
            assert not states[i].any()
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        causal_conv1d_varlen_states(x, torch.tensor([0, 4, 2]), 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_final_states_out_is_written_and_returned(backend):
    x, weight = torch.randn(2, 4, 10, requires_grad=True), torch.randn(4, 3)
    buffer = torch.full((2, 4, 2), float("nan"))
    out, final = causal_conv1d_fn(x, weight, None, None, None, True, buffer, "silu", backend=backend)
    assert final is buffer
    assert torch.equal(buffer, x.detach()[..., -2:])
    expected = causal_conv1d_fn(x, weight, activation="silu", backend="reference")
    assert_close(out, expected, name="out")
    out.sum().backward()  # the output stays differentiable
    with pytest.raises(ValueError, match="return_final_states"):
        causal_conv1d_fn(x, weight, final_states_out=buffer)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_seq_idx_marks_padding_with_zero_output(backend):
    x, weight, bias = torch.randn(1, 3, 8), torch.randn(3, 4), torch.randn(3)
    seq_idx = torch.tensor([[0, 0, 0, -1, -1, 1, 1, 1]], dtype=torch.int32)
    out = causal_conv1d_fn(x, weight, bias, seq_idx, activation="silu", backend=backend)
    assert not out[..., 3:5].any()
    second = causal_conv1d_fn(x[..., 5:], weight, bias, activation="silu", backend="reference")
    assert_close(out[..., 5:], second, name="document after padding")
    first = causal_conv1d_fn(x[..., :3], weight, bias, activation="silu", backend="reference")
    assert_close(out[..., :3], first, name="document before padding")
