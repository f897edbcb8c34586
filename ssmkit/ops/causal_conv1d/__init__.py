"""Causal depthwise 1-D convolution (the short convolution of Mamba / Mamba-2) and its decode step.

Drop-in for the ``causal_conv1d`` package's ``causal_conv1d_fn`` / ``causal_conv1d_update`` /
``causal_conv1d_varlen_states`` (same positional arguments), on any device, any width and
float16/bfloat16/float32/float64, with packed documents (``seq_idx``) combined with initial and final
states, which ``causal_conv1d`` refuses.
"""

from __future__ import annotations

import itertools

import torch

from ssmkit.ops._checks import (
    Dims,
    check_choice,
    check_nonempty,
    check_same_device,
    check_tensor,
)
from ssmkit.ops.backend import resolve_backend
from ssmkit.ops.causal_conv1d.chunked import (
    causal_conv1d_chunked,
    causal_conv1d_update_chunked,
    causal_conv1d_varlen_states_chunked,
)
from ssmkit.ops.causal_conv1d.inputs import ConvInputs, ConvStepInputs
from ssmkit.ops.causal_conv1d.reference import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
)

ACTIVATIONS = (None, "silu", "swish")

__all__ = ["causal_conv1d_fn", "causal_conv1d_update", "causal_conv1d_varlen_states"]


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    final_states_out: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution ``out[b, d, t] = act(bias[d] + sum_k weight[d, k] x[b, d, t - (w-1) + k])``.

    Args:
        x: (b, d, l) input; any strides (channel-last, i.e. a transposed (b, l, d) tensor, is fastest
            on CPU and keeps that layout in the output).
        weight: (d, w) one filter per channel; weight[:, -1] multiplies the current input.
        bias: (d,) or None.
        seq_idx: (b, l) integer document index of each position (packed sequences). The convolution
            restarts wherever seq_idx changes from one position to the next: no tap reads another
            document. Only the first document of each row sees ``initial_states``. Positions with a
            negative index are padding: their output is 0 (as causal_conv1d; checking for them is a
            host sync).
        initial_states: (b, d, w - 1) the inputs before position 0 (zeros when None); differentiable.
        return_final_states: also return the (b, d, w - 1) last inputs, i.e. the state from which the
            last document continues (``causal_conv1d_update`` with it gives the next outputs). Entries
            before the last document's start are zeros, except that the first document continues
            ``initial_states`` (so with l < w - 1 and one document they come from there).
        activation: None, "silu" or "swish" (the same thing).
        backend: "auto" | "reference" | "chunked" | "triton" ("auto": Triton on CUDA when installed).

    Returns:
        out (b, d, l) in x's dtype, or (out, final_states) with final_states (b, d, w - 1) in x's dtype.
        Gradients flow to x, weight, bias and initial_states (also through final_states).

    Computation is in the wider of x's and weight's dtypes and at least float32 (float16/bfloat16
    inputs are upcast, float64 stays float64). With seq_idx the chunked backend locates the document
    starts with one ``nonzero`` (a host-device synchronisation on GPU).

    Differences from ``causal_conv1d.causal_conv1d_fn`` (the same positional arguments): causal_conv1d
    asserts that ``seq_idx`` comes without ``initial_states`` and without ``return_final_states``; both
    work here as described above, and its channel-last-only restriction on ``return_final_states`` does
    not exist here. Its kernel compares seq_idx values
    (a tap is used iff seq_idx is equal at both ends), this compares runs: the results differ only if a
    document index reappears within w - 1 positions after another document. Any width w >= 1 works
    (causal_conv1d: 2 to 4).

    NaN: a NaN in x[b, d, s] makes out[b, d, t] NaN for the positions t = s ... s + w - 1 of the same
    document only (other channels, rows and documents stay finite), and the final states where it is
    one of the last w - 1 inputs. A NaN in weight[d] or bias[d] makes channel d NaN; other channels
    stay finite.

    Example:
        >>> x = torch.randn(2, 64, 100)
        >>> out = causal_conv1d_fn(x, torch.randn(64, 4), torch.zeros(64), activation="silu")
    """
    dims = Dims()
    check_tensor("x", x, ("b", "d", "l"), dims)
    check_tensor("weight", weight, ("d", "w"), dims)
    check_nonempty("x", dims["b"], "batch")
    check_nonempty("x", dims["d"], "channel")
    check_nonempty("x", dims["l"], "length")
    check_nonempty("weight", dims["w"], "width")
    if bias is not None:
        check_tensor("bias", bias, ("d",), dims)
    if seq_idx is not None:
        check_tensor("seq_idx", seq_idx, ("b", "l"), dims, floating=False, integer=True)
    if initial_states is not None:
        dims["w-1"] = dims["w"] - 1
        check_tensor("initial_states", initial_states, ("b", "d", "w-1"), dims)
    if not isinstance(return_final_states, bool):
        raise TypeError(f"return_final_states must be a bool, got {type(return_final_states).__name__}")
    if final_states_out is not None:
        if not return_final_states:
            raise ValueError("final_states_out is written only with return_final_states=True")
        dims["w-1"] = dims["w"] - 1
        check_tensor("final_states_out", final_states_out, ("b", "d", "w-1"), dims)
    check_choice("activation", activation, ACTIVATIONS)
    device = check_same_device(x=x, weight=weight, bias=bias, seq_idx=seq_idx, initial_states=initial_states,
                               final_states_out=final_states_out)
    resolved = resolve_backend(backend, device, has_triton=True)
    if resolved == "triton":
        from ssmkit.ops.causal_conv1d.triton import causal_conv1d_triton as impl
    else:
        impl = causal_conv1d_ref if resolved == "reference" else causal_conv1d_chunked
    result = impl(ConvInputs(x, weight, bias, seq_idx, initial_states, return_final_states, activation))
    if seq_idx is not None and bool((seq_idx < 0).any()):
        # Padding positions (seq_idx < 0) give 0, as causal_conv1d's kernel. The clone keeps x's layout.
        pad = (seq_idx < 0)[:, None, :]
        out = (result[0] if return_final_states else result).clone().masked_fill_(pad, 0.0)
        result = (out, result[1]) if return_final_states else out
    if final_states_out is not None:
        with torch.no_grad():
            final_states_out.copy_(result[1])
        result = (result[0], final_states_out)
    return result


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    cache_seqlens: torch.Tensor | None = None,
    conv_state_indices: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode step: feed new inputs to a convolution state, updating ``conv_state`` in place.

    Args:
        x: (b, d) one token, or (b, d, l) several tokens in order.
        conv_state: (b, d, state_len) with state_len >= w - 1, the last state_len inputs (oldest first);
            shifted left by l and the new inputs appended, in place. Hugging Face's Mamba caches use
            state_len = w, ``causal_conv1d_fn(..., return_final_states=True)`` gives state_len = w - 1;
            only the last w - 1 entries are read. With ``conv_state_indices`` its first dimension is a
            pool of s slots instead of b.
        weight: (d, w); bias: (d,) or None; activation: None, "silu" or "swish".
        cache_seqlens: (b,) non-negative integers: the state of row i is a circular buffer whose oldest
            entry is at ``cache_seqlens[i] % state_len``; the new tokens are written at
            ``(cache_seqlens[i] + t) % state_len`` (nothing is shifted). The caller advances
            cache_seqlens by l afterwards (as with causal_conv1d).
        conv_state_indices: (b,) integers: row i reads and updates slot ``conv_state_indices[i]`` of
            conv_state (continuous batching). A negative index marks a padding row: its outputs are 0
            and no slot is touched. Two rows must not name the same slot. Slots >= s raise (one
            host sync, skipped during CUDA-graph capture, where the Triton kernel treats them as
            padding instead of writing out of bounds).
        backend: "auto" | "reference" | "chunked" | "triton".

    Returns:
        out of x's shape and dtype: the outputs ``causal_conv1d_fn`` would give at those positions.
        Computation is in float32 at least; the new inputs are stored in conv_state's dtype.

    Same as ``causal_conv1d.causal_conv1d_update`` (same positional arguments), for any width (it
    takes 2 to 4, up to 8 in 16-bit). A NaN in x[b, d] makes out[b, d] NaN for that token and,
    through the state, the next w - 1 tokens; NaN in weight[d] or bias[d] makes channel d NaN.

    Example:
        >>> state = torch.zeros(1, 64, 4)
        >>> y = causal_conv1d_update(torch.randn(1, 64), state, torch.randn(64, 4), activation="silu")
    """
    dims = Dims()
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (b, d) or (b, d, l), got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must have shape (b, d) or (b, d, l), got {tuple(x.shape)}")
    check_tensor("x", x, ("b", "d") if x.dim() == 2 else ("b", "d", "l"), dims)
    check_tensor("weight", weight, ("d", "w"), dims)
    pooled = conv_state_indices is not None
    check_tensor("conv_state", conv_state, ("s" if pooled else "b", "d", "state_len"), dims)
    check_nonempty("x", dims["b"], "batch")
    check_nonempty("x", dims["d"], "channel")
    check_nonempty("weight", dims["w"], "width")
    check_nonempty("conv_state", dims["state_len"], "length")
    if x.dim() == 3:
        check_nonempty("x", dims["l"], "length")
    if dims["state_len"] < dims["w"] - 1:
        raise ValueError(
            f"conv_state must hold at least w - 1 = {dims['w'] - 1} inputs, got state_len {dims['state_len']}"
        )
    if bias is not None:
        check_tensor("bias", bias, ("d",), dims)
    if cache_seqlens is not None:
        check_tensor("cache_seqlens", cache_seqlens, ("b",), dims, floating=False, integer=True)
    if pooled:
        check_tensor("conv_state_indices", conv_state_indices, ("b",), dims, floating=False, integer=True)
    check_choice("activation", activation, ACTIVATIONS)
    device = check_same_device(x=x, conv_state=conv_state, weight=weight, bias=bias, cache_seqlens=cache_seqlens,
                               conv_state_indices=conv_state_indices)
    if pooled and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        top = int(conv_state_indices.max())
        if top >= dims["s"]:
            raise ValueError(f"conv_state_indices must be < the {dims['s']} slots of conv_state (or < 0), got {top}")
    resolved = resolve_backend(backend, device, has_triton=True)
    if resolved == "triton":
        from ssmkit.ops.causal_conv1d.triton import causal_conv1d_update_triton as impl
    else:
        impl = causal_conv1d_update_ref if resolved == "reference" else causal_conv1d_update_chunked
    return impl(ConvStepInputs(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices))


def causal_conv1d_varlen_states(x: torch.Tensor, cu_seqlens: torch.Tensor, state_len: int) -> torch.Tensor:
    """The convolution states that packed sequences leave behind, as causal_conv1d's function of this name.

    Args:
        x: (total, d) the inputs of s sequences packed along the first dimension.
        cu_seqlens: (s + 1,) integer, non-decreasing cumulative boundaries from 0 (sequence i is
            ``x[cu_seqlens[i]:cu_seqlens[i + 1]]``; empty sequences are allowed).
        state_len: how many trailing inputs each state keeps (w - 1 for ``causal_conv1d_fn``'s
            initial_states, w for Hugging Face's caches).

    Returns:
        (s, d, state_len) in x's dtype, channel-last in memory as causal_conv1d's: the last
        ``state_len`` inputs of each sequence, zeros before the sequence's start. Forward only (no
        gradient, as causal_conv1d's), on every device.
    """
    dims = Dims()
    check_tensor("x", x, ("total", "d"), dims)
    check_tensor("cu_seqlens", cu_seqlens, ("s+1",), dims, floating=False, integer=True)
    if isinstance(state_len, bool) or not isinstance(state_len, int) or state_len < 0:
        raise ValueError(f"state_len must be a non-negative int, got {state_len!r}")
    check_same_device(x=x, cu_seqlens=cu_seqlens)
    if cu_seqlens.numel() == 0:
        raise ValueError("cu_seqlens must hold at least one boundary (0)")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] > dims["total"] or any(e < s for s, e in itertools.pairwise(bounds)):
        raise ValueError(f"cu_seqlens must rise from 0 to at most x's {dims['total']} rows, got {bounds}")
    with torch.no_grad():
        return causal_conv1d_varlen_states_chunked(x, cu_seqlens, state_len)

