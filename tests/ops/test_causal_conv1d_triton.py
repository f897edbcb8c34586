"""Triton causal convolution kernels in Triton's CPU interpreter against the float64 reference.

The interpreter has to be switched on (TRITON_INTERPRET=1) before triton is imported, so each test
runs a group of tiny cases in a subprocess (this file run as a script) and fails with the message of
every case that failed. The full grid on a GPU is tests/gpu/test_causal_conv1d.py.
"""

from __future__ import annotations

import sys

import pytest
import torch

from ssmkit.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from ssmkit.testing import (
    assert_close,
    assert_outputs_and_grads_close,
    float64_leaf,
    report_checks,
    run_checks_in_interpreter,
)

# name -> (batch, dim, length, width, dtype, channel_last, bias, seq_idx, initial_states, activation)
FN_CASES = {
    "channel_last_silu": (2, 8, 37, 4, "float32", True, True, None, False, "silu"),
    "channel_first_docs_init": (2, 6, 33, 4, "float32", False, False, "alternating", True, "silu"),
    "shorter_than_state": (2, 5, 2, 4, "float32", True, True, "alternating", True, None),
    "bfloat16_wide": (1, 8, 21, 7, "bfloat16", True, True, "sorted", True, "silu"),
    "float16_width2": (2, 4, 19, 2, "float16", False, True, "alternating", False, None),
    "float64_width1": (1, 3, 9, 1, "float64", False, True, None, False, None),
}
# name -> (dtype of x / state, state_len - (w - 1), tokens (0: x of shape (b, d)), activation,
#          cache_seqlens (a circular buffer), conv_state_indices (a pool with a padding row))
UPDATE_CASES = {
    "one_token": ("float32", 0, 0, "silu", False, False),
    "hf_state_len": ("float32", 1, 3, None, False, False),
    "bfloat16_long_state": ("bfloat16", 3, 2, "silu", False, False),
    "ring_one_token": ("float32", 2, 0, "silu", True, False),
    "ring_wraps_more_tokens_than_slots": ("float32", 1, 7, None, True, False),
    "pool_with_padding": ("float32", 1, 2, "silu", False, True),
    "pool_ring_float16": ("float16", 2, 3, "silu", True, True),
}


def _seq_idx(kind: str | None, batch: int, length: int) -> torch.Tensor | None:
    if kind is None:
        return None
    change = torch.rand(batch, length) < 0.25
    if kind == "alternating":  # document indices 0, 1, 0, 1, ...: runs, not values, separate documents
        return (change.cumsum(1) % 2).to(torch.int32)
    return change.cumsum(1)


def check_fn(batch, dim, length, width, dtype, channel_last, bias, seq, init, activation) -> None:
    """Outputs, final states and every gradient of backend='triton' against the float64 reference."""
    dtype = getattr(torch, dtype)
    x = torch.randn(batch, length, dim, dtype=dtype).transpose(1, 2) if channel_last else torch.randn(
        batch, dim, length, dtype=dtype
    )
    x.requires_grad_()
    weight = torch.randn(dim, width, dtype=dtype, requires_grad=True)
    b = torch.randn(dim, dtype=dtype, requires_grad=True) if bias else None
    h0 = torch.randn(batch, dim, width - 1, dtype=dtype, requires_grad=True) if init else None
    seq_idx = _seq_idx(seq, batch, length)
    named = {"x": x, "weight": weight, "bias": b, "initial_states": h0}
    named64 = {k: float64_leaf(t) for k, t in named.items()}
    out, final = causal_conv1d_fn(x, weight, b, seq_idx, h0, True, None, activation, backend="triton")
    exp_out, exp_final = causal_conv1d_fn(
        named64["x"], named64["weight"], named64["bias"], seq_idx, named64["initial_states"], True, None, activation,
        backend="reference",
    )
    assert out.dtype == dtype and final.dtype == dtype
    if channel_last and length > 1:
        assert out.stride(1) == 1, "the output keeps x's channel-last layout"
    assert_outputs_and_grads_close([out, final], [exp_out, exp_final], named, named64, dtype,
                                   names=["out", "final_states"])


def check_nan_stays_in_document() -> None:
    """A NaN input poisons only the outputs of its own document (where, not a multiply by 0)."""
    x = torch.randn(1, 4, 12)
    x[0, 1, 2] = float("nan")
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2]], dtype=torch.int32)
    weight, b = torch.randn(4, 4), torch.randn(4)
    out = causal_conv1d_fn(x, weight, b, seq_idx, activation="silu", backend="triton")
    exp = causal_conv1d_fn(x.double(), weight.double(), b.double(), seq_idx, activation="silu", backend="reference")
    assert torch.isnan(out).sum() == 1  # only position 2 of channel 1: the next document restarts
    assert_close(out, exp, torch.float32, name="out with NaN")


def check_update(dtype, extra_state, tokens, activation, circular, pooled) -> None:
    """Outputs and the in-place state update of backend='triton' against the float64 reference."""
    dtype = getattr(torch, dtype)
    batch, dim, width = 3 if pooled else 2, 8, 4
    state_len = width - 1 + extra_state
    state = torch.randn(5 if pooled else batch, dim, state_len, dtype=dtype)
    state64 = state.double()
    x = torch.randn(batch, dim, tokens, dtype=dtype) if tokens else torch.randn(batch, dim, dtype=dtype)
    weight, b = torch.randn(dim, width, dtype=dtype), torch.randn(dim, dtype=dtype)
    seqlens = torch.tensor([0, state_len - 1, 2 * state_len + 1][:batch], dtype=torch.int32) if circular else None
    indices = torch.tensor([4, -1, 1], dtype=torch.int32) if pooled else None
    for _ in range(2):  # twice: the second step reads what the first one wrote
        out = causal_conv1d_update(x, state, weight, b, activation, seqlens, indices, backend="triton")
        exp = causal_conv1d_update(x.double(), state64, weight.double(), b.double(), activation, seqlens, indices,
                                   backend="reference")
        if circular:
            seqlens = seqlens + max(tokens, 1)
        assert out.dtype == dtype and out.shape == x.shape
        assert_close(out, exp, dtype, name="out")
        assert_close(state, state64, dtype, name="conv_state")


@pytest.mark.parametrize(
    "kwargs", [{"kernel": "shifed"}, {"block_l": 24}, {"block_d": 0}, {"num_warps": 3}, {"programs": 0}]
)
def test_backward_launch_refuses_bad_settings(kwargs):
    from ssmkit.ops.causal_conv1d.triton_backward import BackwardLaunch

    with pytest.raises(ValueError):
        BackwardLaunch(**kwargs)


def check_first_order_only() -> None:
    """The backward is first-order only: a gradient penalty through it fails, not with the convolution's terms
    left out (its gradients would come back as constants and cut the chain for every node before it)."""
    x = torch.randn(2, 4, 9, requires_grad=True)
    out = causal_conv1d_fn(x, torch.randn(4, 3), torch.randn(4), activation="silu", backend="triton")
    dx, = torch.autograd.grad(out.pow(2).sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (dx.pow(2).sum() + x.sum()).backward()


@pytest.mark.parametrize(
    "group", ["fn_f32", "fn_low_precision", "fn_shifted_backward", "fn_generic_backward", "update"]
)
def test_triton_matches_reference_in_interpreter(group):
    run_checks_in_interpreter(__file__, group)


def _main(group: str) -> None:
    if group == "update":
        checks = {name: (check_update, case) for name, case in UPDATE_CASES.items()}
    elif group == "fn_shifted_backward":
        # The width <= 4 backward (widths above fall back to the generic one), with 16-position tiles and
        # few programs, so a program walks several tiles and tiles straddle document and state edges.
        from ssmkit.ops.causal_conv1d import triton_backward

        triton_backward.LAUNCH = triton_backward.BackwardLaunch(kernel="shifted", block_l=16, block_d=4, programs=3)
        checks = {name: (check_fn, case) for name, case in FN_CASES.items()}
        checks["width3_docs_init"] = (check_fn, (2, 6, 41, 3, "float32", True, True, "alternating", True, "silu"))
        # The narrow widths with SiLU (taps 1..3 switched off at compile time) across documents and states.
        checks["width2_silu_docs_init"] = (check_fn, (2, 5, 35, 2, "float32", True, True, "alternating", True, "silu"))
        checks["width1_silu_docs"] = (check_fn, (2, 5, 23, 1, "float32", False, True, "alternating", False, "silu"))
        checks["nan_stays_in_document"] = (check_nan_stays_in_document, ())
    elif group == "fn_generic_backward":
        # The generic backward (the default for widths > 4) on the narrow widths too, at its default tiles.
        from ssmkit.ops.causal_conv1d import triton_backward

        triton_backward.LAUNCH = triton_backward.BackwardLaunch(kernel="generic")
        checks = {name: (check_fn, case) for name, case in FN_CASES.items() if case[4] in ("float32", "float64")}
    else:
        low = group == "fn_low_precision"
        checks = {
            name: (check_fn, case) for name, case in FN_CASES.items() if (case[4] in ("float32", "float64")) != low
        }
        if not low:
            checks["nan_stays_in_document"] = (check_nan_stays_in_document, ())
            checks["first_order_only"] = (check_first_order_only, ())
    report_checks(checks)


if __name__ == "__main__":
    _main(sys.argv[1])
