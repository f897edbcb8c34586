"""Triton causal depthwise convolution: fused forward, fused backward, and the decode step.

Layering: kernels -> launchers -> ``_CausalConv1dTriton`` (autograd) -> ``causal_conv1d_triton`` with
the chunked backend's signature. Each program owns a (BLOCK_L positions x BLOCK_D channels) tile of
one batch row; x is addressed through its strides, so channel-last inputs (x = y.transpose(1, 2)) are
read without a copy and the output keeps x's layout. The w taps re-read the tile shifted by one
position: those loads hit the cache, so x crosses HBM once and the output once.

Documents (seq_idx): see ``triton_common.py``; invalid taps are dropped with ``where`` so that NaN in
another document cannot leak in. The backward kernels are in ``triton_backward.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ssmkit.ops.causal_conv1d.inputs import ConvInputs, ConvStepInputs
from ssmkit.ops.causal_conv1d.triton_backward import backward
from ssmkit.ops.causal_conv1d.triton_common import (
    _acc_dtype,
    _blocks,
    _on_device,
    _placeholder,
    _pre_activation,
    _strides,
)


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, out_ptr, length, dim,
                     stride_xb, stride_xd, stride_xl, stride_wd, stride_wk, stride_ib, stride_id, stride_il,
                     stride_sb, stride_sl, stride_ob, stride_od, stride_ol,
                     W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                     SILU: tl.constexpr, ACC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_l, pid_d = tl.program_id(0), tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)  # batch offsets can pass 2**31
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    x_ptr += pid_b * stride_xb
    init_ptr += pid_b * stride_ib
    seq_ptr += pid_b * stride_sb
    acc = _pre_activation(x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, t, offs_d, mask_d, length,
                          stride_xd, stride_xl, stride_wd, stride_wk, stride_id, stride_il, stride_sl,
                          W, HAS_BIAS, HAS_INIT, HAS_SEQ, ACC, BLOCK_L, BLOCK_D)
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    out_ptrs = out_ptr + pid_b * stride_ob + t[:, None] * stride_ol + offs_d[None, :] * stride_od
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(t < length)[:, None] & mask_d[None, :])



def _forward(x, weight, bias, init, seq_idx, silu: bool) -> torch.Tensor:
    batch, dim, length = x.shape
    out = torch.empty_like(x)  # keeps x's layout (channel-last stays channel-last)
    block_l, block_d = _blocks(x, backward=False)
    grid = (triton.cdiv(length, block_l), triton.cdiv(dim, block_d), batch)
    with _on_device(x):
        _conv_fwd_kernel[grid](
            x, weight, _placeholder(bias, weight), _placeholder(init, x), _placeholder(seq_idx, x), out, length, dim,
            *x.stride(), *weight.stride(), *_strides(init, 3), *_strides(seq_idx, 2), *out.stride(),
            W=weight.shape[1], HAS_BIAS=bias is not None, HAS_INIT=init is not None, HAS_SEQ=seq_idx is not None,
            SILU=silu, ACC=_acc_dtype(x, weight, bias, init), BLOCK_L=block_l, BLOCK_D=block_d, num_warps=4,
        )
    return out



class _CausalConv1dTriton(torch.autograd.Function):
    """out = act(conv(x, weight, bias)) with initial states and document boundaries; x's dtype and layout."""

    @staticmethod
    def forward(ctx, x, weight, bias, init, seq_idx, silu):
        ctx.save_for_backward(x, weight, bias, init, seq_idx)
        ctx.silu = silu
        return _forward(x, weight, bias, init, seq_idx, silu)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, weight, bias, init, seq_idx = ctx.saved_tensors
        need_dinit = init is not None and ctx.needs_input_grad[3] and weight.shape[1] > 1
        dx, dinit, dweight, dbias = backward(x, weight, bias, init, seq_idx, ctx.silu, dout, need_dinit)
        if init is not None and ctx.needs_input_grad[3] and dinit is None:
            dinit = torch.zeros_like(init)
        return dx, dweight, dbias if ctx.needs_input_grad[2] else None, dinit, None, None


def _final_states(x: torch.Tensor, init: torch.Tensor | None, seq_idx: torch.Tensor | None, width: int):
    """(b, d, w - 1) last inputs of the last document (zeros before its start), differentiable."""
    batch, dim, length = x.shape
    if length >= width - 1:
        final = x[..., length - (width - 1) :]
    else:
        before = init[..., length:].to(x.dtype) if init is not None else x.new_zeros(batch, dim, width - 1 - length)
        final = torch.cat([before, x], dim=-1)
    if seq_idx is not None and width > 1:
        pos = torch.arange(length, device=x.device)
        new_doc = torch.zeros(batch, length, dtype=torch.bool, device=x.device)
        new_doc[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        last_start = torch.where(new_doc, pos, 0).amax(dim=1, keepdim=True)  # 0: one document
        final_pos = length - (width - 1) + torch.arange(width - 1, device=x.device)
        keep = (last_start == 0) | (final_pos >= last_start)
        final = torch.where(keep[:, None, :], final, 0.0)
    # A copy: the final states must not alias the caller's x.
    return final.to(x.dtype, copy=True)


def causal_conv1d_triton(inputs: ConvInputs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton path of :func:`ssmkit.ops.causal_conv1d.causal_conv1d_fn` (same arguments and results)."""
    x, weight, bias, seq_idx, initial_states, return_final_states, activation = inputs.unpack()
    silu = activation in ("silu", "swish")
    out = _CausalConv1dTriton.apply(x, weight, bias, initial_states, seq_idx, silu)
    if not return_final_states:
        return out
    return out, _final_states(x, initial_states, seq_idx, weight.shape[1])


@triton.jit
def _conv_update_kernel(x_ptr, state_ptr, w_ptr, b_ptr, out_ptr, slot_ptr, seqlens_ptr, dim, length, state_len, n_slots,
                        stride_xb, stride_xd, stride_xl, stride_sb, stride_sd, stride_sl, stride_wd, stride_wk,
                        stride_ob, stride_od, stride_ol,
                        W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_SLOTS: tl.constexpr,
                        CIRCULAR: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d, pid_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    out_ptr += pid_b * stride_ob
    slot = pid_b
    if HAS_SLOTS:
        slot = tl.load(slot_ptr + pid_b).to(tl.int64)
    if (slot < 0) | (slot >= n_slots):
        # A padding row (or, under CUDA-graph capture where the host cannot check, a slot out of range):
        # outputs 0, no state is touched.
        for t in range(length):
            tl.store(out_ptr + t * stride_ol + offs_d * stride_od, tl.zeros([BLOCK_D], dtype=ACC).to(
                out_ptr.dtype.element_ty), mask=mask_d)
        return
    # The state's entries in time order are at (start + i) % state_len: a ring when CIRCULAR.
    start = pid_b * 0
    if CIRCULAR:
        start = tl.load(seqlens_ptr + pid_b).to(tl.int64) % state_len
    x_ptr += pid_b * stride_xb
    state_ptr += slot * stride_sb
    # Positions index the concatenation [state (state_len, time order), x (length)].
    for t in range(length):
        acc = tl.zeros([BLOCK_D], dtype=ACC)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
        for k in tl.static_range(W):
            p = state_len + t - (W - 1) + k
            in_state = (p + 0 * offs_d) < state_len  # a vector: masks must be tensors
            slot_pos = (start + p) % state_len
            v_state = tl.load(state_ptr + slot_pos * stride_sl + offs_d * stride_sd, mask=mask_d & in_state,
                              other=0.0)
            v_x = tl.load(x_ptr + (p - state_len) * stride_xl + offs_d * stride_xd, mask=mask_d & ~in_state,
                          other=0.0)
            v = tl.where(in_state, v_state.to(ACC), v_x.to(ACC))
            wk = tl.load(w_ptr + offs_d * stride_wd + k * stride_wk, mask=mask_d, other=0.0).to(ACC)
            acc += wk * v
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc))
        tl.store(out_ptr + t * stride_ol + offs_d * stride_od, acc.to(out_ptr.dtype.element_ty), mask=mask_d)
    j = tl.arange(0, BLOCK_S)
    tile_mask = mask_d[None, :] & (j < state_len)[:, None]
    if CIRCULAR:
        # Entry j receives the last token i < length with (start + i) % state_len == j, if any.
        first = (j - start + state_len) % state_len
        written = first < length
        last = first + state_len * ((length - 1 - first) // state_len)
        old = tl.load(state_ptr + j[:, None] * stride_sl + offs_d[None, :] * stride_sd,
                      mask=tile_mask & ~written[:, None], other=0.0)
        new = tl.load(x_ptr + last[:, None] * stride_xl + offs_d[None, :] * stride_xd,
                      mask=tile_mask & written[:, None], other=0.0).to(state_ptr.dtype.element_ty)
        new = tl.where(written[:, None], new, old)
    else:
        # New state: positions length .. length + state_len - 1 of the concatenation. Read all, then write.
        p = j + length
        from_state = p < state_len
        old = tl.load(state_ptr + p[:, None] * stride_sl + offs_d[None, :] * stride_sd,
                      mask=tile_mask & from_state[:, None], other=0.0)
        new = tl.load(x_ptr + (p - state_len)[:, None] * stride_xl + offs_d[None, :] * stride_xd,
                      mask=tile_mask & ~from_state[:, None], other=0.0).to(state_ptr.dtype.element_ty)
        new = tl.where(from_state[:, None], old, new)
    tl.debug_barrier()
    tl.store(state_ptr + j[:, None] * stride_sl + offs_d[None, :] * stride_sd, new, mask=tile_mask)


def causal_conv1d_update_triton(inputs: ConvStepInputs) -> torch.Tensor:
    """Triton path of :func:`ssmkit.ops.causal_conv1d.causal_conv1d_update` (same arguments and results)."""
    x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices = inputs.unpack()
    xs = x.unsqueeze(-1) if x.dim() == 2 else x
    batch, dim, length = xs.shape
    state_len = conv_state.shape[-1]
    out = torch.empty_like(xs)
    block_d = 128
    with _on_device(x):
        _conv_update_kernel[(triton.cdiv(dim, block_d), batch)](
            xs, conv_state, weight, _placeholder(bias, weight), out,
            _placeholder(conv_state_indices, xs), _placeholder(cache_seqlens, xs), dim, length, state_len,
            conv_state.shape[0],
            *xs.stride(), *conv_state.stride(), *weight.stride(), *out.stride(),
            W=weight.shape[1], HAS_BIAS=bias is not None, SILU=activation in ("silu", "swish"),
            HAS_SLOTS=conv_state_indices is not None, CIRCULAR=cache_seqlens is not None,
            ACC=_acc_dtype(xs, weight, bias, conv_state), BLOCK_S=triton.next_power_of_2(max(state_len, 1)),
            BLOCK_D=block_d, num_warps=4,
        )
    return out.squeeze(-1) if x.dim() == 2 else out
