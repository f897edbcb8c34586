"""Sequential definition of the causal depthwise convolution (the ground truth for the other backends).

Glossary:
    b  batch                      d  channels (one filter per channel, depthwise)
    l  sequence length            w  filter width (taps); the state holds the last w - 1 inputs
    t  output position            k  tap index, k = w - 1 reads the current input x[t]

    out[b, d, t] = act(bias[d] + sum_k weight[d, k] * src(b, d, t - (w - 1) + k))

where src(b, d, s) = x[b, d, s] for s >= 0 and initial_states[b, d, w - 1 + s] (zero when not given)
for s < 0. With seq_idx a tap only reads positions of the same document (a maximal run of equal
seq_idx values); positions before 0 belong to the first document.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ssmkit.ops.causal_conv1d.inputs import ConvInputs, ConvStepInputs


def _document_runs(seq_idx: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """(b, l) run number of each position: 0 for the first document, +1 at every change of seq_idx."""
    if seq_idx is None:
        return torch.zeros(batch, length, dtype=torch.long, device=device)
    change = torch.zeros(batch, length, dtype=torch.long, device=device)
    change[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
    return change.cumsum(dim=1)


def causal_conv1d_ref(inputs: ConvInputs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Loop over output positions; see :func:`ssmkit.ops.causal_conv1d.causal_conv1d_fn` for the contract.

    Computes in float32 at least (float64 inputs stay float64); returns x's dtype.
    """
    x, weight, bias, seq_idx, initial_states, return_final_states, activation = inputs.unpack()
    batch, dim, length = x.shape
    width = weight.shape[1]
    cdtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    xs = x.to(cdtype)
    w = weight.to(cdtype)
    init = (
        initial_states.to(cdtype)
        if initial_states is not None
        else torch.zeros(batch, dim, width - 1, dtype=cdtype, device=x.device)
    )
    runs = _document_runs(seq_idx, batch, length, x.device)

    outs = []
    for t in range(length):
        acc = torch.zeros(batch, dim, dtype=cdtype, device=x.device)
        if bias is not None:
            acc = acc + bias.to(cdtype)
        for k in range(width):
            s = t - (width - 1) + k
            if s >= 0:
                src, same_doc = xs[:, :, s], runs[:, s] == runs[:, t]
            else:
                src, same_doc = init[:, :, width - 1 + s], runs[:, t] == 0
            # where, not a multiply by 0: a NaN in another document must not leak into this one.
            acc = acc + torch.where(same_doc[:, None], w[:, k] * src, 0.0)
        outs.append(acc)
    out = torch.stack(outs, dim=-1)
    if activation in ("silu", "swish"):
        out = F.silu(out)
    out = out.to(x.dtype)
    if not return_final_states:
        return out

    # The state the last document would continue from: its last w - 1 inputs, zeros before its start.
    last = runs[:, -1]
    finals = []
    for i in range(width - 1):
        s = length - (width - 1) + i
        if s >= 0:
            src, same_doc = xs[:, :, s], runs[:, s] == last
        else:
            src, same_doc = init[:, :, width - 1 + s], last == 0
        finals.append(torch.where(same_doc[:, None], src, 0.0))
    final = torch.stack(finals, dim=-1) if finals else xs.new_zeros(batch, dim, 0)
    return out, final.to(x.dtype)


def causal_conv1d_update_ref(inputs: ConvStepInputs) -> torch.Tensor:
    """One row and one token at a time: append x[..., t] to the row's state, convolve the last w inputs.

    x: (b, d) or (b, d, l); conv_state (s, d, state_len), state_len >= w - 1, updated in place. Row i
    uses slot ``conv_state_indices[i]`` (i without indices; a negative slot: outputs 0, no update).
    Without ``cache_seqlens`` a slot holds the last inputs oldest first and shifts left; with it, the
    slot is a ring whose oldest entry sits at ``cache_seqlens[i] % state_len``, and token t is written
    at ``(cache_seqlens[i] + t) % state_len``.
    """
    x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices = inputs.unpack()
    squeeze = x.dim() == 2
    xs = x.unsqueeze(-1) if squeeze else x
    batch, _, length = xs.shape
    width, state_len = weight.shape[1], conv_state.shape[-1]
    cdtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    w = weight.to(cdtype)
    out = torch.zeros(xs.shape, dtype=cdtype, device=x.device)
    for row in range(batch):
        slot = row if conv_state_indices is None else int(conv_state_indices[row])
        if slot < 0:
            continue
        start = 0 if cache_seqlens is None else int(cache_seqlens[row]) % state_len
        ring = [(start + i) % state_len for i in range(state_len)]
        history = conv_state[slot][:, ring].to(cdtype)  # (d, state_len), oldest first
        for t in range(length):
            xt = xs[row, :, t].to(cdtype)
            window = torch.cat([history[:, state_len - (width - 1) :], xt[:, None]], dim=-1)
            acc = (window * w).sum(dim=-1)
            out[row, :, t] = acc + bias.to(cdtype) if bias is not None else acc
            history = torch.cat([history, xt[:, None]], dim=-1)[:, 1:]
            if cache_seqlens is not None:
                conv_state[slot, :, (start + t) % state_len] = xs[row, :, t].to(conv_state.dtype)
        if cache_seqlens is None:
            conv_state[slot] = history.to(conv_state.dtype)
    if activation in ("silu", "swish"):
        out = F.silu(out)
    # Padding rows give exactly 0 (not silu of the bias).
    if conv_state_indices is not None:
        out = out * (conv_state_indices >= 0).to(cdtype)[:, None, None]
    out = out.to(x.dtype)
    return out.squeeze(-1) if squeeze else out


def causal_conv1d_varlen_states_ref(x: torch.Tensor, cu_seqlens: torch.Tensor, state_len: int) -> torch.Tensor:
    """(s, d, state_len): the last ``state_len`` inputs of each sequence of x (total, d), zeros before its start."""
    bounds = cu_seqlens.tolist()
    states = x.new_zeros(len(bounds) - 1, x.shape[1], state_len)
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        take = min(state_len, end - start)
        if take:
            states[i, :, state_len - take :] = x[end - take : end].T
    return states
