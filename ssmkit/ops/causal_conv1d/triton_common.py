"""Shared Triton pieces of the causal convolution: source loads, document links, pre-activations and
their gradients, and the host-side launch helpers.

Each program owns a (BLOCK_L positions x BLOCK_D channels) tile of one batch row; x is addressed through
its strides, so channel-last inputs are read without a copy. Documents (seq_idx): ``link(p)`` says
position p continues the document of p - 1 (p <= 0 always does: the initial states belong to the first
document). Tap ``lag`` of output t is valid iff every link in (t - lag, t] holds.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _link(seq_ptr, stride_sl, p, length):
    """(BLOCK_L,) True where position p is in the same document as p - 1."""
    inside = (p > 0) & (p < length)
    cur = tl.load(seq_ptr + p * stride_sl, mask=inside, other=0)
    prev = tl.load(seq_ptr + (p - 1) * stride_sl, mask=inside, other=0)
    return (p <= 0) | (cur == prev)


@triton.jit
def _load_src(x_ptr, init_ptr, s, offs_d, mask_d, stride_xd, stride_xl, stride_id, stride_il, length,
              W: tl.constexpr, HAS_INIT: tl.constexpr, ACC: tl.constexpr):
    """(BLOCK, BLOCK_D) sources at positions s: x for 0 <= s < length, initial states (or 0) for s < 0."""
    in_x = (s >= 0) & (s < length)
    val = tl.load(x_ptr + s[:, None] * stride_xl + offs_d[None, :] * stride_xd,
                  mask=in_x[:, None] & mask_d[None, :], other=0.0).to(ACC)
    if HAS_INIT:
        in_init = (s < 0) & (s >= 1 - W)
        before = tl.load(init_ptr + (s + W - 1)[:, None] * stride_il + offs_d[None, :] * stride_id,
                         mask=in_init[:, None] & mask_d[None, :], other=0.0).to(ACC)
        val = tl.where(in_init[:, None], before, val)
    return val


@triton.jit
def _pre_activation(x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, t, offs_d, mask_d, length,
                    stride_xd, stride_xl, stride_wd, stride_wk, stride_id, stride_il, stride_sl,
                    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                    ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK, BLOCK_D) bias + sum_k weight[:, k] * src[t - (W - 1) + k] over the taps in t's document."""
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)[None, :]
    same = tl.full([BLOCK], 1, tl.int1)  # all taps so far in t's document
    for lag in tl.static_range(W):
        if HAS_SEQ and lag > 0:
            same = same & _link(seq_ptr, stride_sl, t - lag + 1, length)
        src = _load_src(x_ptr, init_ptr, t - lag, offs_d, mask_d, stride_xd, stride_xl, stride_id, stride_il,
                        length, W, HAS_INIT, ACC)
        wk = tl.load(w_ptr + offs_d * stride_wd + (W - 1 - lag) * stride_wk, mask=mask_d, other=0.0).to(ACC)
        term = wk[None, :] * src
        if HAS_SEQ:
            term = tl.where(same[:, None], term, 0.0)
        acc += term
    return acc



@triton.jit
def _grad_pre(x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, dout_ptr, u, offs_d, mask_d, length,
              stride_xd, stride_xl, stride_wd, stride_wk, stride_id, stride_il, stride_sl, stride_gd, stride_gl,
              W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
              SILU: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK, BLOCK_D) gradient with respect to the pre-activation at outputs u (0 outside [0, length))."""
    inside = (u >= 0) & (u < length)
    g = tl.load(dout_ptr + u[:, None] * stride_gl + offs_d[None, :] * stride_gd,
                mask=inside[:, None] & mask_d[None, :], other=0.0).to(ACC)
    if SILU:
        pre = _pre_activation(x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, u, offs_d, mask_d, length,
                              stride_xd, stride_xl, stride_wd, stride_wk, stride_id, stride_il, stride_sl,
                              W, HAS_BIAS, HAS_INIT, HAS_SEQ, ACC, BLOCK, BLOCK_D)
        sig = 1.0 / (1.0 + tl.exp(-pre))
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return g


@triton.jit
def _grad_src(x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, dout_ptr, s, offs_d, mask_d, length,
              stride_xd, stride_xl, stride_wd, stride_wk, stride_id, stride_il, stride_sl, stride_gd, stride_gl,
              W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
              SILU: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gradients of the sources at positions s, and of the pre-activation at outputs s (both (BLOCK, BLOCK_D)).

    Output s + j reads source s through tap W - 1 - j.
    """
    dsrc = tl.zeros([BLOCK, BLOCK_D], dtype=ACC)
    g_here = tl.zeros([BLOCK, BLOCK_D], dtype=ACC)
    same = tl.full([BLOCK], 1, tl.int1)
    for j in tl.static_range(W):
        if HAS_SEQ and j > 0:
            same = same & _link(seq_ptr, stride_sl, s + j, length)
        g = _grad_pre(x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, dout_ptr, s + j, offs_d, mask_d, length,
                      stride_xd, stride_xl, stride_wd, stride_wk, stride_id, stride_il, stride_sl,
                      stride_gd, stride_gl, W, HAS_BIAS, HAS_INIT, HAS_SEQ, SILU, ACC, BLOCK, BLOCK_D)
        if j == 0:
            g_here = g
        wk = tl.load(w_ptr + offs_d * stride_wd + (W - 1 - j) * stride_wk, mask=mask_d, other=0.0).to(ACC)
        term = wk[None, :] * g
        if HAS_SEQ:
            term = tl.where(same[:, None], term, 0.0)
        dsrc += term
    return dsrc, g_here



def _blocks(x: torch.Tensor, backward: bool) -> tuple[int, int]:
    """(BLOCK_L, BLOCK_D): the long side of the tile along x's contiguous dimension, for coalescing.

    The backward holds more tiles live (recomputed pre-activations), so its channel-last tile is shorter.
    """
    if x.stride(1) == 1 and x.shape[-1] > 1:
        return (16 if backward else 32), 128
    return 128, 16


def _on_device(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device), or nothing for the CPU interpreter."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _acc_dtype(*tensors: torch.Tensor | None):
    """float64 if any input is float64, else float32 (the reference's computation dtype)."""
    return tl.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else tl.float32


def _placeholder(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A dummy pointer argument for an absent optional tensor (never dereferenced: its flag is off)."""
    return t if t is not None else like


def _strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n
