"""Mamba-1's native CPU scan (``ssmkit/ops/selective_scan/native.py``, ``scan.c``) against the float64 reference:
outputs and the last state on a grid of shapes (channels not a multiple of 16, groups whose channels straddle a
block of 16, one step), with every option, time-major and channel-major inputs, bf16 inputs; where ``auto``
takes it, and where it must not (gradients, float64)."""

from __future__ import annotations

import pytest
import torch

from ssmkit.ops import native
from ssmkit.ops.selective_scan import ScanInputs, selective_scan_fn
from ssmkit.ops.selective_scan import native as scan_native
from ssmkit.testing import assert_close

_lib = native.library()
pytestmark = pytest.mark.skipif(_lib is None or not _lib.ssmkit_selective_scan_vectorized(),
                                reason="the native kernels are not built here with AVX-512 (no compiler, "
                                       "SSMKIT_NATIVE=0, or another CPU): selective_scan_fn keeps torch's form")


def _inputs(b, d, l, n, g, dtype, time_major, options):
    u = torch.randn(b, l, d).transpose(1, 2) if time_major else torch.randn(b, d, l)
    delta = (torch.randn(b, l, d).transpose(1, 2) if time_major else torch.randn(b, d, l)) * 0.5
    args = {"u": u, "delta": delta, "A": -torch.rand(d, n) * 2, "B": torch.randn(b, g, n, l),
            "C": torch.randn(b, g, n, l)}
    kw = {"delta_softplus": "softplus" in options, "return_last_state": True}
    if "softplus" not in options:
        args["delta"] = delta.abs()
    if "D" in options:
        kw["D"] = torch.randn(d)
    if "z" in options:
        kw["z"] = torch.randn(b, l, d).transpose(1, 2) if time_major else torch.randn(b, d, l)
    if "bias" in options:
        kw["delta_bias"] = torch.randn(d) * 0.5
    if "init" in options:
        kw["initial_state"] = torch.randn(b, d, n)
    if "docs" in options:
        seq = torch.zeros(b, l, dtype=torch.long)
        seq[0, l // 3:] = 1
        seq[0, 2 * l // 3:] = 5
        kw["seq_idx"] = seq
    args = {k: v.to(dtype) for k, v in args.items()}
    kw = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "initial_state" else v
          for k, v in kw.items()}
    return args, kw


CASES = {
    "all_options": (2, 40, 37, 16, 2, "float32", True, "softplus D z bias init docs"),
    "channel_major": (2, 40, 37, 16, 2, "float32", False, "softplus D z bias init docs"),
    "groups_straddle_blocks": (1, 24, 19, 8, 3, "float32", True, "softplus D"),
    "one_step": (3, 17, 1, 16, 1, "float32", True, "z init"),
    "wide_state_plain": (1, 33, 50, 40, 1, "float32", False, ""),
    "bfloat16": (2, 48, 29, 16, 1, "bfloat16", True, "softplus D z bias"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_native_scan_matches_float64_reference(case):
    b, d, l, n, g, dtype, time_major, options = case
    torch.manual_seed(0)
    args, kw = _inputs(b, d, l, n, g, getattr(torch, dtype), time_major, options)
    with torch.no_grad():
        assert scan_native.applies(ScanInputs.from_args(args | kw))
        out, state = selective_scan_fn(**args, **kw)
        f64 = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
               for k, v in (args | kw).items()}
        want, want_state = selective_scan_fn(**f64, backend="reference")
    assert out.dtype == args["u"].dtype and state.dtype == torch.float32
    assert out.shape == (b, d, l) and state.shape == (b, d, n)
    assert (out.stride(1) == 1) == time_major  # the chunked backend's layout
    tol = getattr(torch, dtype)
    assert_close(out, want, tol, name="out")
    assert_close(state, want_state, tol if tol != torch.bfloat16 else torch.float32, name="last state")


def test_auto_takes_it_only_without_gradients_and_float64(monkeypatch):
    calls = []
    monkeypatch.setattr("ssmkit.ops.selective_scan.selective_scan_native",
                        lambda inputs: calls.append(1) or scan_native.selective_scan_native(inputs))
    args, kw = _inputs(1, 20, 9, 4, 1, torch.float32, True, "softplus D")
    with torch.no_grad():
        selective_scan_fn(**args, **kw)
    assert len(calls) == 1
    selective_scan_fn(**{k: v.requires_grad_() for k, v in args.items()}, **kw)  # needs a gradient: chunked
    with torch.no_grad():
        selective_scan_fn(**{k: v.detach().double() for k, v in args.items()}, **kw)  # float64: chunked
        selective_scan_fn(**{k: v.detach() for k, v in args.items()}, **kw, backend="chunked")  # asked for
    assert len(calls) == 1


def test_a_nan_in_u_stays_in_its_channel_and_document():
    args, kw = _inputs(1, 20, 30, 8, 1, torch.float32, True, "softplus D docs")
    args["u"] = args["u"].clone()
    args["u"][0, 3, 5] = float("nan")
    kw["seq_idx"] = torch.zeros(1, 30, dtype=torch.long)
    kw["seq_idx"][0, 12:] = 1
    with torch.no_grad():
        out, _ = selective_scan_fn(**args, **kw)
    nan = torch.isnan(out[0])
    assert nan[3, 5:12].all() and not nan[3, 12:].any() and not nan[3, :5].any()
    assert not nan[torch.arange(20) != 3].any()
