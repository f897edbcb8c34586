"""Attention layer: parallel pass == a float64 one-query-at-a-time reference; decode with a cache (one token
or any chunks) == parallel, for full and sliding-window attention, with and without RoPE, with GQA; the
ring buffer keeps its size over a long stream; packed documents never attend across; state handling."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from ssmkit.layers.attention import Attention, AttentionState
from ssmkit.layers.state import STATE_TYPES
from ssmkit.testing import assert_close


def reference_attention(layer: Attention, x: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """The definition, in float64, one query at a time: a query at position t of a document sees the keys
    of that document at positions t - W < s <= t; RoPE as complex rotation of pairs (i, i + r/2)."""
    w = {name: p.detach().double() for name, p in layer.named_parameters()}
    x = x.double()
    b, l, _ = x.shape
    h, hk, p, r = layer.num_heads, layer.num_heads_kv, layer.head_dim, layer.rotary_emb_dim

    def proj(name):
        y = x @ w[f"{name}.weight"].T
        return y + w[f"{name}.bias"] if f"{name}.bias" in w else y

    q, k, v = proj("q_proj").view(b, l, h, p), proj("k_proj").view(b, l, hk, p), proj("v_proj").view(b, l, hk, p)
    doc = torch.zeros(b, l, dtype=torch.long) if seq_idx is None else seq_idx.cpu()
    seg = torch.zeros(b, l, dtype=torch.long)
    pos = torch.zeros(b, l, dtype=torch.long)
    for i in range(b):
        for t in range(1, l):
            new = bool(doc[i, t] != doc[i, t - 1])
            seg[i, t] = seg[i, t - 1] + new
            pos[i, t] = 0 if new else pos[i, t - 1] + 1
    if r:
        freq = layer.rotary_emb_base ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
        rot = torch.polar(torch.ones(b, l, r // 2, dtype=torch.float64), pos[..., None].double() * freq)[:, :, None]

        def rope(t):
            z = torch.complex(t[..., : r // 2], t[..., r // 2 : r]) * rot
            return torch.cat([z.real, z.imag, t[..., r:]], dim=-1)

        q, k = rope(q), rope(k)
    window = layer.window or l
    out = [[None] * l for _ in range(b)]
    kv_head = torch.arange(h) // (h // hk)
    for i in range(b):
        for t in range(l):
            s = torch.tensor([j for j in range(t + 1) if seg[i, j] == seg[i, t] and t - j < window])
            scores = torch.einsum("hp,shp->hs", q[i, t], k[i, s][:, kv_head]) * layer.softmax_scale
            out[i][t] = torch.einsum("hs,shp->hp", scores.softmax(-1), v[i, s][:, kv_head])
    y = torch.stack([torch.stack(row) for row in out]).reshape(b, l, h * p) @ w["o_proj.weight"].T
    return y + w["o_proj.bias"] if "o_proj.bias" in w else y


def decode(layer: Attention, x: torch.Tensor, chunks: list[int], state: AttentionState | None = None):
    """Feed x through a cache in chunks of the given sizes; returns (outputs, state)."""
    state = layer.allocate_state(x.shape[0]) if state is None else state
    out, start = [], 0
    for n in chunks:
        out.append(layer(x[:, start : start + n], cache=state))
        start += n
    assert start == x.shape[1]
    return torch.cat(out, dim=1), state


CONFIGS = [  # (num_heads, num_heads_kv, window, rotary_emb_dim)
    (4, 4, None, 0),
    (4, 2, None, 8),
    (4, 1, 5, 0),
    (4, 2, 5, 8),
    (4, 2, 1, 4),
    (2, 2, 16, 8),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,heads_kv,window,rotary", CONFIGS)
@pytest.mark.parametrize("length", [1, 13, 63])
def test_parallel_matches_reference(dtype, heads, heads_kv, window, rotary, length):
    layer = Attention(32, num_heads=heads, num_heads_kv=heads_kv, head_dim=8, window=window, rotary_emb_dim=rotary, dtype=dtype)
    x = torch.randn(2, length, 32, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    assert_close(y, reference_attention(layer, x), dtype, name="attention")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("heads,heads_kv,window,rotary", CONFIGS)
def test_decode_matches_parallel(dtype, heads, heads_kv, window, rotary):
    """Token by token, and in uneven chunks (some longer than the window), through the cache."""
    layer = Attention(32, num_heads=heads, num_heads_kv=heads_kv, head_dim=8, window=window, rotary_emb_dim=rotary, dtype=dtype)
    x = torch.randn(2, 40, 32, dtype=dtype)
    y = layer(x)
    stepped, state = decode(layer, x, [1] * 40)
    assert_close(stepped, y, dtype, name="one token per call")
    assert state.length.tolist() == [40, 40]
    chunked, _ = decode(layer, x, [7, 1, 12, 1, 19])
    assert_close(chunked, y, dtype, name="chunks")


def test_bf16_decode_matches_parallel():
    layer = Attention(32, num_heads=4, num_heads_kv=2, window=6, rotary_emb_dim=8, dtype=torch.bfloat16)
    x = torch.randn(1, 20, 32, dtype=torch.bfloat16)
    stepped, state = decode(layer, x, [5] + [1] * 15)
    assert state.k.dtype == torch.bfloat16 and stepped.dtype == torch.bfloat16
    assert_close(stepped, reference_attention(layer, x), torch.bfloat16)


def test_ring_buffer_constant_memory_over_long_stream():
    """1,000 tokens through a window of 8: the state never grows, and every output equals the masked
    attention of the whole stream."""
    layer = Attention(16, num_heads=2, num_heads_kv=1, window=8, rotary_emb_dim=8, dtype=torch.float64)
    x = torch.randn(1, 1000, 16, dtype=torch.float64)
    state = layer.allocate_state(1)
    nbytes, ptr = state.nbytes, state.k.data_ptr()
    out = []
    for t in range(1000):
        out.append(layer(x[:, t : t + 1], cache=state))
        assert state.nbytes == nbytes and state.capacity == 8
    assert state.k.data_ptr() == ptr
    assert int(state.length) == 1000
    assert_close(torch.cat(out, 1), layer(x), name="stream vs parallel")
    assert_close(torch.cat(out, 1)[:, -100:], reference_attention(layer, x[:, -100 - 7 :])[:, 7:], name="tail")


def test_full_cache_grows_by_blocks_or_is_preallocated():
    layer = Attention(16, num_heads=2, dtype=torch.float64)
    x = torch.randn(2, 600, 16, dtype=torch.float64)
    state = layer.allocate_state(2)
    assert state.capacity == 256
    y, _ = decode(layer, x, [200, 100, 1, 299], state)
    assert state.capacity == 1024  # 200 fits in 256; 300 doubles it to 512; 600 doubles that to 1024
    assert state.nbytes == 2 * (2 * 2 * 1024 * 8) * 8 + 2 * 8  # k and v (b, hk, c, p) float64 + length
    assert_close(y, layer(x))
    pre = layer.allocate_state(2, max_length=600)
    ptr = pre.k.data_ptr()
    decode(layer, x, [300, 1, 1, 298], pre)
    assert pre.k.data_ptr() == ptr and pre.capacity == 768  # 600 rounded up to whole blocks


def test_packed_documents_equal_each_document_alone():
    layer = Attention(32, num_heads=4, num_heads_kv=2, head_dim=8, window=6, rotary_emb_dim=8, dtype=torch.float64)
    lengths = [[5, 17, 1, 9], [32]]
    x = torch.randn(2, 32, 32, dtype=torch.float64)
    # Indices only need to change at boundaries: reuse a value non-adjacently to check that.
    seq_idx = torch.tensor([[0] * 5 + [1] * 17 + [0] + [3] * 9, [7] * 32], dtype=torch.int32)
    y = layer(x, seq_idx=seq_idx)
    for row, parts in enumerate(lengths):
        start = 0
        for n in parts:
            alone = layer(x[row : row + 1, start : start + n])
            assert_close(y[row : row + 1, start : start + n], alone, name=f"row {row} doc at {start}")
            start += n
    assert_close(y, reference_attention(layer, x, seq_idx))
    # Full attention too, and a document's output does not move when another document changes.
    full = Attention(32, num_heads=4, num_heads_kv=2, head_dim=8, rotary_emb_dim=8, dtype=torch.float64)
    y = full(x, seq_idx=seq_idx)
    assert_close(y, reference_attention(full, x, seq_idx))
    x2 = x.clone()
    x2[0, :5] += 1.0
    y2 = full(x2, seq_idx=seq_idx)
    assert_close(y2[0, 5:], y[0, 5:])
    assert not torch.allclose(y2[0, :5], y[0, :5])


@pytest.mark.parametrize("window", [None, 4])
def test_seq_idx_with_cache_continues_first_document_and_keeps_last(window):
    layer = Attention(16, num_heads=2, num_heads_kv=1, window=window, rotary_emb_dim=8, dtype=torch.float64)
    a, rest = torch.randn(1, 10, 16, dtype=torch.float64), torch.randn(1, 12, 16, dtype=torch.float64)
    state = layer.allocate_state(1)
    layer(a[:, :6], cache=state)
    seq_idx = torch.tensor([[0] * 4 + [1] * 3 + [2] * 5])
    y = layer(torch.cat([a[:, 6:], rest[:, :8]], 1), seq_idx=seq_idx, cache=state)
    assert_close(y[:, :4], layer(a)[:, 6:], name="first document continues the cache")
    assert_close(y[:, 4:7], layer(rest[:, :3]), name="middle document alone")
    assert_close(y[:, 7:], layer(rest[:, 3:8]), name="last document alone")
    assert int(state.length) == 5
    y_next = layer(rest[:, 8:], cache=state)
    assert_close(y_next, layer(rest[:, 3:])[:, 5:], name="cache holds the last document")


def test_rows_with_different_lengths_and_reset():
    """zero_(rows) restarts one row; the other keeps its stream; both decode correctly."""
    layer = Attention(16, num_heads=2, num_heads_kv=2, rotary_emb_dim=4, dtype=torch.float64)
    ring = Attention(16, num_heads=2, num_heads_kv=2, window=3, rotary_emb_dim=4, dtype=torch.float64)
    ring.load_state_dict(layer.state_dict())
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    for lay in (layer, ring):
        state = lay.allocate_state(2)
        lay(x[:, :8], cache=state)
        state.zero_(torch.tensor([False, True]))
        assert state.length.tolist() == [8, 0]
        y = torch.cat([lay(x[:, 8:10], cache=state), lay(x[:, 10:11], cache=state), lay(x[:, 11:], cache=state)], 1)
        assert_close(y[0], lay(x[:1])[0, 8:], name="untouched row")
        assert_close(y[1], lay(x[1:, 8:])[0], name="restarted row")


def test_initial_state_is_read_only_and_equals_cache_path():
    layer = Attention(16, num_heads=4, num_heads_kv=2, window=5, rotary_emb_dim=4, dtype=torch.float64)
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    state = layer.allocate_state(2)
    layer(x[:, :7], cache=state)
    before = state.clone()
    y = layer(x[:, 7:], initial_state=state)
    for name, t in state.tensors().items():
        assert torch.equal(t, getattr(before, name)), name
    assert_close(y, layer(x)[:, 7:])
    with pytest.raises(ValueError, match="either cache"):
        layer(x, cache=state, initial_state=before)


def test_state_value_semantics_and_safetensors_roundtrip(tmp_path):
    layer = Attention(16, num_heads=4, num_heads_kv=2, window=4, rotary_emb_dim=4, dtype=torch.float64)
    x = torch.randn(2, 15, 16, dtype=torch.float64)
    state = layer.allocate_state(2)
    layer(x[:, :9], cache=state)
    fork = state.clone()
    y_main = layer(x[:, 9:], cache=state)
    assert_close(layer(x[:, 9:], cache=fork), y_main, name="fork decodes the same")
    assert STATE_TYPES["attention"] is AttentionState
    path = tmp_path / "state.safetensors"
    snapshot = layer.allocate_state(2)
    layer(x[:, :9], cache=snapshot)
    save_file(snapshot.tensors(), str(path))
    loaded = AttentionState(**load_file(str(path)))
    assert_close(layer(x[:, 9:], cache=loaded), y_main, name="loaded state")
    # copy_ takes over a full-attention cache of another capacity.
    full = Attention(16, num_heads=4, num_heads_kv=2, dtype=torch.float64)
    big, small = full.allocate_state(2, max_length=1000), full.allocate_state(2)
    full(x[:, :9], cache=small)
    big.copy_(small)
    assert big.capacity == small.capacity
    assert_close(full(x[:, 9:], cache=big), full(x)[:, 9:])


def test_gradients():
    layer = Attention(8, num_heads=2, num_heads_kv=1, head_dim=4, window=3, rotary_emb_dim=4, dtype=torch.float64)
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    seq_idx = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]])
    assert torch.autograd.gradcheck(lambda t: layer(t, seq_idx=seq_idx), (x,))
    full = Attention(8, num_heads=2, num_heads_kv=2, head_dim=4, rotary_emb_dim=2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: full(t), (x,))
    state = layer.allocate_state(2)
    layer(x[:, :3].detach(), cache=state)
    assert torch.autograd.gradcheck(lambda t: layer(t, initial_state=state), (x[:, 3:].detach().requires_grad_(),))
    # fp32 gradients of the parallel path vs the float64 reference's.
    layer32 = Attention(16, num_heads=4, num_heads_kv=2, window=5, rotary_emb_dim=4)
    x32 = torch.randn(2, 20, 16, requires_grad=True)
    layer32(x32).square().sum().backward()
    x64 = x32.detach().double().requires_grad_()
    reference_attention(layer32, x64).square().sum().backward()
    assert_close(x32.grad, x64.grad, torch.float32, name="dx")


def test_matches_transformers_jamba_attention():
    from transformers import JambaConfig
    from transformers.models.jamba.modeling_jamba import JambaAttention

    config = JambaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=16)
    config._attn_implementation = "eager"
    theirs = JambaAttention(config, layer_idx=0)
    ours = Attention(32, num_heads=4, num_heads_kv=2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 11, 32)
    mask = torch.full((11, 11), float("-inf")).triu(1)[None, None]
    assert_close(ours(x), theirs(x, attention_mask=mask)[0], torch.float32)


def test_nan_propagates_forward():
    """Documented: NaN at position t reaches t and every later position that attends to it."""
    layer = Attention(16, num_heads=2, num_heads_kv=1, window=4, dtype=torch.float64)
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    x[0, 5, 3] = math.nan
    y = layer(x)
    assert torch.isnan(y[0, 5:9]).all()
    stepped, _ = decode(layer, x, [1] * 12)
    assert not torch.isnan(stepped[0, :5]).any() and torch.isnan(stepped[0, 5:9]).all()
    assert not torch.isnan(stepped[0, 9:]).any()  # the window has moved past the NaN token


@given(
    b=st.integers(1, 3), l=st.integers(1, 30), hk=st.integers(1, 3), g=st.integers(1, 3), half=st.integers(1, 4),
    window=st.one_of(st.none(), st.integers(1, 9)), rotary=st.sampled_from(["none", "half", "full"]),
    cuts=st.lists(st.integers(1, 12), min_size=1, max_size=6),
)
def test_fuzz_shapes(b, l, hk, g, half, window, rotary, cuts):
    p = 2 * half
    r = {"none": 0, "half": 2 * (half // 2), "full": p}[rotary]
    layer = Attention(12, num_heads=hk * g, num_heads_kv=hk, head_dim=p, window=window, rotary_emb_dim=r, dtype=torch.float64)
    x = torch.randn(b, l, 12, dtype=torch.float64)
    y = layer(x)
    assert_close(y, reference_attention(layer, x))
    chunks, left = [], l
    for c in cuts:
        chunks.append(min(c, left))
        left -= chunks[-1]
        if not left:
            break
    if left:
        chunks.append(left)
    assert_close(decode(layer, x, chunks)[0], y)


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible by num_heads_kv"):
        Attention(32, num_heads=4, num_heads_kv=3)
    with pytest.raises(ValueError, match="d_model .* divisible by num_heads"):
        Attention(30, num_heads=4)
    for window in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window"):
            Attention(32, num_heads=4, window=window)
    with pytest.raises(ValueError, match="rotary_emb_dim"):
        Attention(32, num_heads=4, rotary_emb_dim=3)
    with pytest.raises(ValueError, match="rotary_emb_dim"):
        Attention(32, num_heads=4, rotary_emb_dim=10)
    with pytest.raises(ValueError, match="num_heads_kv"):
        Attention(32, num_heads=4, num_heads_kv=0)
    with pytest.raises(ValueError, match="max_length"):
        Attention(32, num_heads=4).allocate_state(1, max_length=0)
    with pytest.raises(ValueError, match="batch_size"):
        Attention(32, num_heads=4).allocate_state(0)


def test_bad_inputs():
    layer = Attention(16, num_heads=4, num_heads_kv=2, window=3)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(5, 16))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        layer(torch.ones(2, 5, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch"):
        layer(torch.randn(0, 5, 16))
    with pytest.raises(ValueError, match="empty length"):
        layer(torch.randn(2, 0, 16))
    with pytest.raises(TypeError, match="seq_idx must be an integer"):
        layer(x, seq_idx=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="seq_idx must have shape"):
        layer(x, seq_idx=torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="one device"):
        layer(x, seq_idx=torch.zeros(2, 5, dtype=torch.int32, device="meta"))
    with pytest.raises(TypeError, match="AttentionState"):
        layer(x, cache=(torch.zeros(1), torch.zeros(1)))
    with pytest.raises(ValueError, match="state.k must have shape"):
        layer(x, cache=layer.allocate_state(3))
    with pytest.raises(ValueError, match="ring of 3 slots"):
        layer(x, cache=Attention(16, num_heads=4, num_heads_kv=2, window=4).allocate_state(2))
    with pytest.raises(ValueError, match="one device"):
        layer(x, cache=layer.allocate_state(2, device="meta"))
    full = Attention(16, num_heads=4, num_heads_kv=2)
    ring = layer.allocate_state(2)
    layer(x, cache=ring)
    with pytest.raises(ValueError, match="wrapped sliding-window ring"):
        full(x, cache=ring)
