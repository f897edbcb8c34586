"""Parallel causal depthwise convolution: one library convolution, no copy of the input.

The input is convolved with w - 1 zeros of padding on each side (the library pads, so no padded copy
is made) and the first l outputs kept; only the first w - 1 outputs are recomputed when there are
initial states, and packed documents (seq_idx) are handled by recomputing the few outputs whose window
crosses a document start (at most w - 1 per document). The dense work is one convolution whatever the
packing, and the backward is one convolution plus w reductions.

Layout matters on CPU: inputs that are channel-last in memory (x = y.transpose(1, 2) with y (b, l, d),
what a Linear layer produces) go through a channels-last 2-D convolution, which oneDNN runs several
times faster than the (b, d, l) one and which spares the transposing copy. The backward is written
out because PyTorch's depthwise weight gradient on CPU is slow. Fresh multi-megabyte buffers cost page
faults on CPU, so the forward allocates little: the convolution's output, then SiLU in place when no
gradient is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops.causal_conv1d.inputs import ConvInputs, ConvStepInputs


def _conv(inp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """Depthwise correlation of inp (b, d, L) with weight (d, w) along L, ``padding`` zeros on both sides."""
    dim = weight.shape[0]
    # Under autocast the forward ran in the input's low precision; the backward (outside autocast)
    # must too, and the library convolutions refuse mixed dtypes.
    weight = weight.to(inp.dtype)
    bias = bias.to(inp.dtype) if bias is not None else None
    if inp.stride(1) == 1 and inp.shape[-1] > 1 and inp.dtype != torch.float64:
        # (b, d, 1, L) viewed from a (b, L, d) buffer is already channels-last: no copy.
        out = F.conv2d(inp.unsqueeze(2), weight[:, None, None, :], bias, padding=(0, padding), groups=dim)
        return out.squeeze(2)
    return F.conv1d(inp, weight.unsqueeze(1), bias, padding=padding, groups=dim)


def _windows(
    x: torch.Tensor, init: torch.Tensor | None, fix_b: torch.Tensor, fix_t: torch.Tensor, width: int
) -> torch.Tensor:
    """(P, w, d): the sources src[fix_b, :, fix_t - (w - 1) + k] (init, or zeros, before position 0)."""
    pos = fix_t[:, None] - (width - 1) + torch.arange(width, device=x.device)
    window = x.transpose(1, 2)[fix_b[:, None], pos.clamp(min=0)]
    before = 0.0
    if init is not None:
        before = init.transpose(1, 2)[fix_b[:, None], (pos + width - 1).clamp(0, width - 2)]
    return torch.where((pos < 0)[:, :, None], before, window)


class _CausalDepthwiseConv(torch.autograd.Function):
    """pre[b, d, t] = bias[d] + sum_k weight[d, k] * src[b, d, t - (w - 1) + k].

    src is x, preceded by ``init`` (zeros when None). Outputs ``fix_b, fix_t`` (P,) use only the taps
    ``fix_valid`` (P, w) (the others read another document): they are recomputed from their windows,
    and the backward removes the gradient of the invalid taps.
    """

    @staticmethod
    def forward(ctx, x, init, weight, bias, fix_b, fix_t, fix_valid):
        width, length = weight.shape[1], x.shape[-1]
        pre = _conv(x, weight, bias, padding=width - 1)[..., :length]
        if init is not None and width > 1:
            head = min(length, width - 1)
            pre[..., :head] = _conv(torch.cat([init, x[..., :head]], dim=-1), weight, bias, padding=0)
        if fix_b is not None:
            # where, not a multiply by the mask: a NaN in the other document must not leak in.
            taps = torch.where(fix_valid[:, :, None], _windows(x, init, fix_b, fix_t, width) * weight.t(), 0.0)
            vals = taps.sum(dim=1)
            # In pre's dtype: under autocast the convolution runs in bf16 while these taps stay in x's.
            pre.transpose(1, 2)[fix_b, fix_t] = (vals + bias if bias is not None else vals).to(pre.dtype)
        ctx.save_for_backward(x, init, weight, fix_b, fix_t, fix_valid)
        ctx.has_bias = bias is not None
        # A plain tensor rather than a view of the convolution's result, so that callers may modify
        # the output in place (autograd forbids that on views created inside a Function).
        return pre.detach()

    @staticmethod
    def backward(ctx, grad):
        x, init, weight, fix_b, fix_t, fix_valid = ctx.saved_tensors
        width, length = weight.shape[1], grad.shape[-1]
        dx = dinit = dweight = dbias = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            # Gradient for the source [init, x]: the transposed (flipped, fully padded) convolution.
            dsrc = _conv(grad, weight.flip(1), None, padding=width - 1)
            if fix_b is not None:
                g = grad.transpose(1, 2)[fix_b, fix_t]  # (P, d)
                wrong = torch.where(~fix_valid[:, :, None], g[:, None] * weight.t(), 0.0)
                pos = fix_t[:, None] + torch.arange(width, device=grad.device)
                dsrc.transpose(1, 2).index_put_((fix_b[:, None].expand_as(pos), pos), -wrong.to(dsrc.dtype),
                                                accumulate=True)
            dx = dsrc[..., width - 1 :]
            dinit = dsrc[..., : width - 1] if init is not None else None
        if ctx.needs_input_grad[2]:
            dweight = grad.new_zeros(weight.shape)
            for k in range(width):
                lag = width - 1 - k  # tap k reads x[t - lag]
                if lag < length:
                    dweight[:, k] = (grad[..., lag:] * x[..., : length - lag]).sum(dim=(0, 2))
                if init is not None and lag > 0:
                    head = min(lag, length)
                    dweight[:, k] += (grad[..., :head] * init[..., k : k + head]).sum(dim=(0, 2))
            if fix_b is not None:
                g = grad.transpose(1, 2)[fix_b, fix_t]  # (P, d)
                window = torch.where(~fix_valid[:, :, None], _windows(x, init, fix_b, fix_t, width), 0.0)
                dweight -= torch.einsum("pd,pwd->dw", g.to(window.dtype), window)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            dbias = grad.sum(dim=(0, 2))
        return dx, dinit, dweight, dbias, None, None, None


def _boundaries(seq_idx: torch.Tensor, width: int):
    """Outputs whose window crosses a document start, and which of their taps stay in the document.

    Returns (fix_b, fix_t, fix_valid, keep_final): keep_final (b, w - 1) marks which entries of the
    final state belong to the last document (the first document owns the initial states too).
    """
    batch, length = seq_idx.shape
    pos = torch.arange(length, device=seq_idx.device)
    new_doc = torch.zeros(batch, length, dtype=torch.bool, device=seq_idx.device)
    new_doc[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    start = torch.cummax(torch.where(new_doc, pos, 0), dim=1).values
    in_first = start == 0
    offset = pos - start  # position inside the document
    fix = ~in_first & (offset < width - 1)
    fix_b, fix_t = fix.nonzero(as_tuple=True)
    # Tap k reads lag w - 1 - k: inside the document iff the lag is at most the offset.
    lag = width - 1 - torch.arange(width, device=seq_idx.device)
    fix_valid = lag <= offset[fix_b, fix_t][:, None]
    final_pos = length - (width - 1) + torch.arange(width - 1, device=seq_idx.device)
    keep_final = in_first[:, -1:] | (final_pos >= start[:, -1:])
    return fix_b, fix_t, fix_valid, keep_final


def causal_conv1d_chunked(inputs: ConvInputs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fast path of :func:`ssmkit.ops.causal_conv1d.causal_conv1d_fn` (same arguments and results)."""
    x, weight, bias, seq_idx, initial_states, return_final_states, activation = inputs.unpack()
    length, width = x.shape[-1], weight.shape[1]
    cdtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    xc = x.to(cdtype)
    init = initial_states.to(cdtype) if initial_states is not None else None
    fix_b = fix_t = fix_valid = keep_final = None
    if seq_idx is not None:
        fix_b, fix_t, fix_valid, keep_final = _boundaries(seq_idx, width)
        if fix_b.numel() == 0:
            fix_b = fix_t = fix_valid = None
    b = bias.to(cdtype) if bias is not None else None
    out = _CausalDepthwiseConv.apply(xc, init, weight.to(cdtype), b, fix_b, fix_t, fix_valid)
    if activation in ("silu", "swish"):
        out = F.silu(out, inplace=not out.requires_grad)
    out = out.to(x.dtype)
    if not return_final_states:
        return out
    if length >= width - 1:
        final = x[..., length - (width - 1) :]
    else:
        if initial_states is not None:
            before = initial_states[..., length:].to(x.dtype)
        else:
            before = x.new_zeros(*x.shape[:2], width - 1 - length)
        final = torch.cat([before, x], dim=-1)
    if keep_final is not None:
        final = torch.where(keep_final[:, None, :], final, 0.0)
    # A copy: the final states must not alias the caller's x.
    return out, final.to(x.dtype, copy=True)


def causal_conv1d_update_chunked(inputs: ConvStepInputs) -> torch.Tensor:
    """Fast path of :func:`ssmkit.ops.causal_conv1d.causal_conv1d_update` (same arguments and results)."""
    x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices = inputs.unpack()
    squeeze = x.dim() == 2
    xs = x.unsqueeze(-1) if squeeze else x
    length = xs.shape[-1]
    width = weight.shape[1]
    state_len = conv_state.shape[-1]
    cdtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    live = slots = None
    state = conv_state
    if conv_state_indices is not None:
        # Gather the live rows' slots (padding rows, slot < 0, give 0 and update nothing).
        live = (conv_state_indices >= 0).nonzero().squeeze(1)
        slots = conv_state_indices[live].long()
        state = conv_state.index_select(0, slots)
        xs_all, xs = xs, xs.index_select(0, live)
        if cache_seqlens is not None:
            cache_seqlens = cache_seqlens.index_select(0, live)
    if cache_seqlens is not None:
        # The ring's entries in time order: the oldest sits at cache_seqlens % state_len.
        start = cache_seqlens.long().remainder(state_len)[:, None]
        order = (start + torch.arange(state_len, device=x.device)).remainder(state_len)
        history = state.gather(-1, order[:, None, :].expand(-1, state.shape[1], -1))
    else:
        history = state
    window = torch.cat([history[..., state_len - (width - 1) :].to(cdtype), xs.to(cdtype)], dim=-1)
    # A few tokens: the windows times the taps, summed. (A library convolution costs a primitive set-up
    # per call on CPU that dwarfs this arithmetic.)
    out = (window.unfold(-1, width, 1) * weight.to(cdtype)[:, None, :]).sum(-1)
    if bias is not None:
        out = out + bias.to(cdtype)[:, None]
    if cache_seqlens is None:
        # The concatenation is a copy, so writing it back over the state cannot read overwritten values.
        state = torch.cat([state, xs.to(state.dtype)], dim=-1)[..., length:]
        if slots is None:
            conv_state.copy_(state)
    else:
        # Token t goes to (cache_seqlens + t) % state_len; only the last state_len tokens survive. The
        # history read above is a copy, so this may write the state's own memory.
        kept = min(length, state_len)
        pos = (start + torch.arange(length - kept, length, device=x.device)).remainder(state_len)
        state.scatter_(-1, pos[:, None, :].expand(-1, state.shape[1], -1), xs[..., length - kept :].to(state.dtype))
    if slots is not None:
        conv_state.index_copy_(0, slots, state)
    if activation in ("silu", "swish"):
        out = F.silu(out)
    if live is not None:
        full = torch.zeros(xs_all.shape, dtype=out.dtype, device=out.device)
        full[live] = out
        out = full
    out = out.to(x.dtype)
    return out.squeeze(-1) if squeeze else out


def causal_conv1d_varlen_states_chunked(x: torch.Tensor, cu_seqlens: torch.Tensor, state_len: int) -> torch.Tensor:
    """Fast path of :func:`ssmkit.ops.causal_conv1d.causal_conv1d_varlen_states` (one gather)."""
    ends = cu_seqlens[1:].long()
    starts = cu_seqlens[:-1].long()
    pos = ends[:, None] - state_len + torch.arange(state_len, device=x.device)  # (s, state_len)
    valid = pos >= starts[:, None]
    states = x[pos.clamp(min=0)]  # (s, state_len, d)
    states = torch.where(valid[:, :, None], states, torch.zeros((), dtype=x.dtype, device=x.device))
    # (s, d, state_len) with the channel-last layout of causal_conv1d's result.
    return states.transpose(1, 2)
