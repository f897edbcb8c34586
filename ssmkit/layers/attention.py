"""Causal attention mixer for hybrid models: grouped-query heads, optional rotary embeddings, full or
sliding-window, with a KV cache that is a ring buffer of W entries for sliding windows.

Dimensions: b batch, l new tokens, d model width, h query heads, hk key/value heads (g = h / hk query heads
share a key/value head; head i uses key/value head i // g, as transformers' ``repeat_kv``), p head dim,
r rotary dims, W window, c cache capacity (slots), K keys attended.

A window W means the query at position t sees the keys at positions t - W < s <= t (W keys, itself
included), as transformers' Mistral ``sliding_window``. Every path runs ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmkit.layers.configs import AttentionConfig, layer_settings
from ssmkit.layers.state import LayerState
from ssmkit.ops._checks import Dims, check_nonempty, check_same_device, check_tensor

# A full-attention cache grows in whole blocks of this many tokens (at least doubling each time).
CACHE_BLOCK = 256
# Without a cache, masked attention runs over blocks of this many queries, each seeing only the keys its
# window can reach, so a mask holds at most b x QUERY_BLOCK x (QUERY_BLOCK + W - 1) booleans.
QUERY_BLOCK = 1024
# With a cache, queries are blocked so that one block's mask holds at most this many booleans.
MASK_BUDGET = 1 << 24


@dataclasses.dataclass(eq=False)
class AttentionState(LayerState):
    """KV cache of one :class:`Attention` layer: keys (rotary embedding applied) and values.

    k, v: (b, hk, c, p) in the model's dtype; length: (b,) int64, tokens each row has consumed (the
    position of its next token). Position t of a row lives in slot t % c:

    - full attention: c >= length always, so slot = position. The cache is **grown by blocks**: when a
      forward needs room, c becomes max(needed, 2c) rounded up to a multiple of ``CACHE_BLOCK`` (256) and
      ``k``/``v`` are replaced (the state object is updated in place). ``Attention.allocate_state(...,
      max_length=n)`` preallocates room for n tokens so that decoding never reallocates.
    - sliding window: c = W, a ring buffer; the state has the same size at token 10 and token 10**7.

    Rows may have different lengths (``zero_(rows)`` restarts some rows).

    Example::

        state = attn.allocate_state(batch_size=2)
        y = attn(prompt, cache=state)          # consumes the prompt
        y = attn(next_tokens, cache=state)     # one decode step per call, (2, 1, d)
    """

    kind = "attention"
    k: Tensor
    v: Tensor
    length: Tensor

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def slot_positions(self) -> Tensor:
        """(b, c) int64: the position each slot holds, negative where the slot is empty."""
        last = self.length[:, None] - 1
        slots = torch.arange(self.capacity, device=self.k.device)
        return last - torch.remainder(last - slots, self.capacity)

    def reserve(self, needed: int) -> None:
        """Grow a full-attention cache (no-op when it has room for ``needed`` tokens per row)."""
        if needed <= self.capacity:
            return
        capacity = _round_up(max(needed, 2 * self.capacity), CACHE_BLOCK)
        k = self.k.new_zeros(*self.k.shape[:2], capacity, self.k.shape[3])
        v = torch.zeros_like(k)
        k[:, :, : self.capacity] = self.k
        v[:, :, : self.capacity] = self.v
        self.k, self.v = k, v

    def copy_(self, other: LayerState) -> AttentionState:
        """Overwrite with ``other``'s values; a full-attention cache of another capacity is taken over
        with ``other``'s capacity (a clone of its tensors, in this state's dtype and device)."""
        if type(other) is not type(self):
            raise TypeError(f"cannot copy a {type(other).__name__} into a {type(self).__name__}")
        if other.k.shape[:2] != self.k.shape[:2] or other.k.shape[3] != self.k.shape[3]:
            raise ValueError(f"AttentionState.k: shape {tuple(other.k.shape)} does not fit {tuple(self.k.shape)}")
        if other.capacity == self.capacity:
            self.k.copy_(other.k)
            self.v.copy_(other.v)
        else:
            self.k = other.k.to(device=self.k.device, dtype=self.k.dtype, copy=True)
            self.v = other.v.to(device=self.v.device, dtype=self.v.dtype, copy=True)
        self.length.copy_(other.length)
        return self

    def write(self, k: Tensor, v: Tensor, positions: Tensor, segments: Tensor | None) -> None:
        """Store new keys/values k, v (b, hk, l, p) at ``positions`` (b, l) and set each row's length to its
        last position + 1. Only the row's last document (``segments`` (b, l)) is kept, and of it only the
        last c tokens, which is all a ring can hold."""
        b, l = positions.shape
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        last = positions[:, -1]
        if l == 1:
            rows, cols = torch.arange(b, device=k.device), torch.zeros(b, dtype=torch.long, device=k.device)
        else:
            keep = positions > last[:, None] - self.capacity
            if segments is not None:
                keep &= segments == segments[:, -1:]
            rows, cols = keep.nonzero(as_tuple=True)
        slots = positions[rows, cols] % self.capacity
        self.k[rows, :, slots] = k[rows, :, cols]
        self.v[rows, :, slots] = v[rows, :, cols]
        self.length.copy_(last + 1)


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query heads, optional RoPE and a sliding window.

    Parameters ``q_proj`` [h·p, d], ``k_proj``/``v_proj`` [hk·p, d], ``o_proj`` [d, h·p] (transformers'
    Jamba names; biases only with ``bias``); argument names follow mamba_ssm's ``MHA``.

    Args:
        d_model: model width d.
        config: an :class:`AttentionConfig` (its fields may also be given as keywords):
        num_heads: query heads h.
        num_heads_kv: key/value heads hk (default h); h must be divisible by hk.
        head_dim: p (default d / h).
        window: sliding window W >= 1 of this layer; None (the default) is full causal attention.
        rotary_emb_dim: r, the leading r dims of each head rotated by RoPE (GPT-NeoX / transformers
            ``rotate_half`` layout: pairs (i, i + r/2)); 0 = no positional encoding (Jamba), p = whole
            heads (Samba).
        rotary_emb_base: RoPE base θ (frequencies θ^(-2i/r)).
        softmax_scale: scale of the query-key products (default ``config.softmax_scale``, else p^-1/2).
        layer_idx: only for error messages.

    Example::

        attn = Attention(512, num_heads=8, num_heads_kv=2, window=2048, rotary_emb_dim=64)
        x = torch.randn(2, 100, 512)
        y = attn(x)                                            # (2, 100, 512)
        state = attn.allocate_state(2)
        y_prompt = attn(x[:, :99], cache=state)
        y_last = attn(x[:, 99:], cache=state)                 # == y[:, 99:]
    """

    def __init__(self, d_model: int, config: AttentionConfig | None = None, *, window: int | None = None,
                 softmax_scale: float | None = None, layer_idx: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 **settings: Any) -> None:
        super().__init__()
        # config.window is the window of a model's W layers; this layer slides only when given ``window``.
        self.config = config = layer_settings(AttentionConfig, config, settings, "Attention")
        num_heads, num_heads_kv, head_dim = config.num_heads, config.num_heads_kv, config.head_dim
        rotary_emb_dim, rotary_emb_base, bias = config.rotary_emb_dim, config.rotary_emb_base, config.bias
        num_heads_kv = num_heads if num_heads_kv is None else num_heads_kv
        for name, value in (("d_model", d_model), ("num_heads", num_heads), ("num_heads_kv", num_heads_kv)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_heads % num_heads_kv:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_heads_kv ({num_heads_kv})")
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads}) "
                                 "unless head_dim is given")
            head_dim = d_model // num_heads
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
            raise ValueError(f"window must be None (full attention) or an int >= 1, got {window!r}")
        if not 0 <= rotary_emb_dim <= head_dim or rotary_emb_dim % 2:
            raise ValueError(f"rotary_emb_dim must be even and in [0, head_dim={head_dim}], got {rotary_emb_dim}")
        if rotary_emb_base <= 0:
            raise ValueError(f"rotary_emb_base must be > 0, got {rotary_emb_base}")
        self.d_model, self.num_heads, self.num_heads_kv, self.head_dim = d_model, num_heads, num_heads_kv, head_dim
        self.window, self.rotary_emb_dim, self.rotary_emb_base = window, rotary_emb_dim, rotary_emb_base
        if softmax_scale is None:
            softmax_scale = config.softmax_scale
        self.softmax_scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
        self.layer_idx = layer_idx
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, **kw)
        self.k_proj = nn.Linear(d_model, num_heads_kv * head_dim, **kw)
        self.v_proj = nn.Linear(d_model, num_heads_kv * head_dim, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, d_model, **kw)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_heads_kv={self.num_heads_kv}, head_dim={self.head_dim}, "
                f"window={self.window}, rotary_emb_dim={self.rotary_emb_dim}")

    def _name(self) -> str:
        return "Attention" if self.layer_idx is None else f"Attention (layer {self.layer_idx})"

    @property
    def decode_graph_blocker(self) -> str | None:
        """None for a sliding window (a fixed ring of keys); full attention reads its cache length on the host
        and grows its cache, so its decode step cannot be captured in a CUDA graph."""
        return None if self.window is not None else "full attention (its KV cache length is read on the host each step)"

    def allocate_state(self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None,
                       *, max_length: int | None = None) -> AttentionState:
        """An empty :class:`AttentionState` (dtype/device default to the weights'): W slots for a sliding
        window; room for ``max_length`` tokens (default one block of 256, grown on demand) otherwise."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        weight = self.k_proj.weight
        dtype, device = dtype or weight.dtype, device or weight.device
        capacity = self.window or _round_up(max_length or CACHE_BLOCK, CACHE_BLOCK)
        k = torch.zeros(batch_size, self.num_heads_kv, capacity, self.head_dim, dtype=dtype, device=device)
        return AttentionState(k, torch.zeros_like(k), torch.zeros(batch_size, dtype=torch.int64, device=device))

    def forward(self, x: Tensor, *, seq_idx: Tensor | None = None, initial_state: AttentionState | None = None,
                cache: AttentionState | None = None) -> Tensor:
        """Causal attention: x (b, l, d) -> (b, l, d) in x's dtype.

        Args:
            x: (b, l, d) floating input.
            seq_idx: (b, l) integer document index (packing). A document is a run of equal indices (a new
                one starts at every change, as in the ops); queries only see keys of their own document and
                rotary positions restart at 0 in each. With a state, the cached tokens belong to the
                document of ``seq_idx[:, 0]``, and afterwards the cache holds the last document only.
            initial_state: an :class:`AttentionState` to attend to, read only (like the SSM mixers').
            cache: an :class:`AttentionState`, read and updated in place: the l tokens take positions
                ``length, length + 1, ...`` of each row, attend to the cached tokens within the window,
                and are stored. Any l works: a prompt in parallel, then one token per call.

        NaN in ``x`` is not checked for: the outputs at that position and at every later position that
        attends to it become NaN. Where SDPA gets a mask (window, ``seq_idx``, a non-empty state) it
        multiplies a masked key's zero probability by its NaN value, so queries of the same query block that
        cannot see it (earlier positions, other documents) become NaN as well.
        """
        b, l, segments, within, state = self._prepare(x, seq_idx, initial_state, cache)

        q = self.q_proj(x).view(b, l, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, l, self.num_heads_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, l, self.num_heads_kv, self.head_dim).transpose(1, 2)
        positions = torch.arange(l, device=x.device) if within is None else within
        if state is not None:
            # The first document continues the cached stream; later ones start at position 0.
            continued = state.length[:, None] + torch.arange(l, device=x.device)
            positions = continued if segments is None else torch.where(segments == 1, continued, within)
        if self.rotary_emb_dim:
            q = _rotary(q, positions, self.rotary_emb_dim, self.rotary_emb_base)
            k = _rotary(k, positions, self.rotary_emb_dim, self.rotary_emb_base)
        if state is None:
            y = _causal_attention(q, k, v, window=self.window, segments=segments, scale=self.softmax_scale)
        else:
            y = self._attend_state(q, k, v, positions, segments, state)
        return self.o_proj(y.transpose(1, 2).reshape(b, l, self.num_heads * self.head_dim))

    def _attend_state(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, segments: Tensor | None,
                      state: AttentionState) -> Tensor:
        """Attention of new tokens (positions (b, l)) over the state and themselves; updates the state."""
        l, window, scale = q.shape[2], self.window, self.softmax_scale
        cached = state.capacity
        if window is None:
            cached = int(state.length.max())
            if cached > state.capacity:
                raise ValueError(f"{self._name()}: the cache holds a wrapped sliding-window ring "
                                 f"({cached} tokens in {state.capacity} slots); this layer has full attention")
            state.reserve(cached + l)
        if l > 1 and not bool(state.length.any()):
            # An empty state (a prompt): the parallel path, then store.
            y = _causal_attention(q, k, v, window=window, segments=segments, scale=scale)
            state.write(k, v, positions, segments)
            return y
        store_first = l == 1 or (window is None and segments is None)
        if store_first:
            # Nothing this call needs gets overwritten: store, then attend over the cache in place.
            state.write(k, v, positions, segments)
            # Keys in whole blocks: decode then sees one key length per 256 steps, so backends that plan
            # per shape (cuDNN attention re-plans, ~90 ms on an H100) are not re-planned every token.
            used = state.capacity if window is not None else min(state.capacity, _round_up(cached + l, CACHE_BLOCK))
            keys, values = state.k[:, :, :used], state.v[:, :, :used]
            key_pos, key_seg = state.slot_positions()[:, :used], None
        else:
            # A ring would overwrite keys that earlier new queries need, and other documents must not see
            # the cache: attend over (cached tokens, new tokens), then store.
            keys = torch.cat([state.k[:, :, :cached], k.to(state.k.dtype)], 2)
            values = torch.cat([state.v[:, :, :cached], v.to(state.v.dtype)], 2)
            key_pos = torch.cat([state.slot_positions()[:, :cached], positions], 1)
            key_seg = None if segments is None else torch.cat([torch.ones_like(key_pos[:, :cached]), segments], 1)
        y = _masked_attention(q, keys.to(q.dtype), values.to(q.dtype), positions, key_pos, window=window,
                              query_seg=None if key_seg is None else segments, key_seg=key_seg, scale=scale)
        if not store_first:
            state.write(k, v, positions, segments)
        return y

    def _prepare(self, x: Tensor, seq_idx: Tensor | None, initial_state: AttentionState | None,
                 cache: AttentionState | None) -> tuple[int, int, Tensor | None, Tensor | None, AttentionState | None]:
        """Checks of a forward's arguments; (b, l, segments, within, state): ``segments`` (b, l) numbers each
        document of ``seq_idx``, ``within`` (b, l) is each position's offset in its document (both None without
        ``seq_idx``); ``state`` is ``cache`` (updated in place), a copy of ``initial_state`` (read only) or None."""
        bound = Dims(d=self.d_model)
        check_tensor("x", x, ("b", "l", "d"), bound)
        b, l, _ = x.shape
        check_nonempty("x", b, "batch")
        check_nonempty("x", l, "length")
        if cache is not None and initial_state is not None:
            raise ValueError(f"{self._name()}: pass either cache (updated) or initial_state (read only), not both")
        segments = within = None
        if seq_idx is not None:
            check_tensor("seq_idx", seq_idx, ("b", "l"), bound, floating=False, integer=True)
            check_same_device(x=x, seq_idx=seq_idx)
            change = torch.ones_like(seq_idx, dtype=torch.bool)
            change[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
            segments = change.cumsum(-1)
            arange = torch.arange(l, device=x.device).expand(b, l)
            within = arange - torch.where(change, arange, 0).cummax(-1).values
        state = cache if cache is not None else initial_state
        if state is not None:
            self._check_state(state, x)
            if cache is None:
                state = state.clone()
        return b, l, segments, within, state

    def _check_state(self, state: object, x: Tensor) -> None:
        if not isinstance(state, AttentionState):
            raise TypeError(f"{self._name()}: cache/initial_state must be an AttentionState, "
                            f"got {type(state).__name__}")
        b = x.shape[0]
        expected = (b, self.num_heads_kv, self.head_dim)
        if state.k.dim() != 4 or (state.k.shape[0], state.k.shape[1], state.k.shape[3]) != expected:
            raise ValueError(f"{self._name()}: state.k must have shape (b={b}, hk={self.num_heads_kv}, slots, "
                             f"p={self.head_dim}), got {tuple(state.k.shape)}")
        if state.v.shape != state.k.shape:
            raise ValueError(f"{self._name()}: state.v has shape {tuple(state.v.shape)}, "
                             f"state.k {tuple(state.k.shape)}")
        if tuple(state.length.shape) != (b,) or state.length.is_floating_point():
            raise ValueError(f"{self._name()}: state.length must be an integer tensor of shape ({b},), "
                             f"got {state.length.dtype} {tuple(state.length.shape)}")
        if self.window is not None and state.capacity != self.window:
            raise ValueError(f"{self._name()}: a window-{self.window} layer needs a ring of {self.window} slots, "
                             f"the state has {state.capacity}")
        check_same_device(x=x, state_k=state.k, state_v=state.v, state_length=state.length)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _rotary(x: Tensor, positions: Tensor, dim: int, base: float) -> Tensor:
    """RoPE on the first ``dim`` features of each head of x (b, h, l, p) at ``positions`` (l,) or (b, l):
    pairs (i, i + dim/2) rotate by position · base^(-2i/dim). Angles in float32 (float64 for float64)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = base ** (-torch.arange(0, dim, 2, device=x.device, dtype=dtype) / dim)
    angles = positions.to(dtype)[..., None] * inv_freq
    if angles.dim() == 3:
        angles = angles[:, None]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., : dim // 2].to(dtype), x[..., dim // 2 : dim].to(dtype)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, x[..., dim:]], dim=-1)


def _causal_attention(q: Tensor, k: Tensor, v: Tensor, *, window: int | None, segments: Tensor | None,
                      scale: float) -> Tensor:
    """Causal SDPA of q (b, h, l, p) over k, v (b, hk, l, p) of the same l tokens, within the window and,
    with ``segments`` (b, l), within each segment. Returns (b, h, l, p)."""
    l, gqa = q.shape[2], q.shape[1] != k.shape[1]
    if segments is None and window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    out = []
    for s in range(0, l, QUERY_BLOCK):
        e = min(s + QUERY_BLOCK, l)
        lo = 0 if window is None else max(0, s - window + 1)
        query_pos = torch.arange(s, e, device=q.device)[:, None]
        key_pos = torch.arange(lo, e, device=q.device)
        mask = key_pos <= query_pos
        if window is not None:
            mask = mask & (key_pos > query_pos - window)
        if segments is not None:
            mask = mask & (segments[:, None, s:e, None] == segments[:, None, None, lo:e])
        out.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, lo:e], v[:, :, lo:e], attn_mask=mask,
                                                  scale=scale, enable_gqa=gqa))
    return torch.cat(out, dim=2) if len(out) > 1 else out[0]


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, query_pos: Tensor, key_pos: Tensor, *,
                      window: int | None, query_seg: Tensor | None, key_seg: Tensor | None, scale: float) -> Tensor:
    """SDPA of q (b, h, l, p) over k, v (b, hk, K, p) where each row's keys and queries carry positions
    (query_pos (b, l), key_pos (b, K), negative = empty slot): a query sees the keys at positions in
    (pos - W, pos] and, with segments, of its own segment. Returns (b, h, l, p)."""
    b, l, n_keys = query_pos.shape[0], query_pos.shape[1], key_pos.shape[1]
    gqa = q.shape[1] != k.shape[1]
    rows = max(1, MASK_BUDGET // (b * n_keys))
    out = []
    for s in range(0, l, rows):
        e = min(s + rows, l)
        qp, kp = query_pos[:, s:e, None], key_pos[:, None, :]
        mask = (kp >= 0) & (kp <= qp)
        if window is not None:
            mask &= kp > qp - window
        if query_seg is not None:
            mask &= query_seg[:, s:e, None] == key_seg[:, None, :]
        out.append(F.scaled_dot_product_attention(q[:, :, s:e], k, v, attn_mask=mask[:, None], scale=scale,
                                                  enable_gqa=gqa))
    return torch.cat(out, dim=2) if len(out) > 1 else out[0]
