"""Single-input Mamba-3 through the Mamba-2 SSD op (``ssmkit/ops/mamba3/via_ssd.py``) against the float64
recurrence: outputs, final state and every gradient, with the SSD op's chunked backend (its Triton backend:
test_mamba3_triton.py in the interpreter, tests/gpu/test_mamba3.py on a GPU); MIMO as r sub-steps per position."""

from __future__ import annotations

import pytest
import torch

from ssmkit.ops.mamba3 import Mamba3Inputs
from ssmkit.ops.mamba3.reference import mamba3_reference
from ssmkit.ops.mamba3.via_ssd import mamba3_via_ssd
from ssmkit.testing import assert_close
from tests.ops.test_mamba3 import (
    F64,
    _grads,
    assert_state_close,
    f64,
    make_inputs,
    packed_ids,
)

# (groups g, rotary angles a of n = 8, interleaved pairs, mimo projections of rank 1 given)
SISO = [(1, 2, True, False), (2, 4, False, True)]


def via_ssd(inp, chunk_size=16, **kw):
    return mamba3_via_ssd(Mamba3Inputs.from_args(dict(inp, chunk_size=chunk_size, **kw)), ssd_backend="chunked")


def reference(inp, **kw):
    return mamba3_reference(Mamba3Inputs.from_args(dict(f64(inp), chunk_size=1, **kw)))


def siso_inputs(l, g, a, mimo, dtype=torch.float32, **kw):
    inp = make_inputs(b=2, l=l, h=4, r=1, g=g, a=a, dtype=dtype, initial=True, **kw)
    if not mimo:
        for k in ("mimo_x", "mimo_z", "mimo_o"):
            inp.pop(k, None)
    return inp


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("l", [1, 63, 257])
@pytest.mark.parametrize("g, a, interleaved, mimo", SISO)
@pytest.mark.parametrize("packed", [False, True])
def test_matches_float64_reference(dtype, l, g, a, interleaved, mimo, packed):
    inp = siso_inputs(l, g, a, mimo, dtype)
    kw = {"rotary_interleaved": interleaved, "seq_idx": packed_ids(2, l) if packed else None}
    out, final = via_ssd(inp, **kw)
    want, want_final = reference(inp, **kw)
    assert out.dtype == dtype and out.shape == want.shape
    assert final.ssm.dtype == (F64 if dtype == F64 else torch.float32)
    assert_close(out, want, dtype, name="out")
    assert_state_close(final, want_final, dtype)


@pytest.mark.parametrize("g, a, interleaved, mimo", SISO)
def test_gradients_fp32_match_float64_reference(g, a, interleaved, mimo):
    inp = siso_inputs(45, g, a, mimo)
    kw = {"rotary_interleaved": interleaved, "seq_idx": packed_ids(2, 45)}
    got, want = _grads(inp, via_ssd, **kw), _grads(f64(inp), "reference", **kw)
    assert len(got) == (18 if mimo else 15) and all(v is not None for v in got.values())
    for name in got:
        assert_close(got[name], want[name], torch.float32, name=f"grad {name}")


def test_vanishing_and_zero_decay_steps():
    """Δ A = 0 (A = 0, or Δ = 0) and tiny |A|: the decay and the input weight are separate SSD inputs, so
    nothing is divided by Δ A; outputs and the A and dt gradients stay at float32 accuracy."""
    inp = siso_inputs(40, 1, 2, False)
    inp["A"][:, 5:9] = 0.0
    inp["A"][:, 12:18] = -1e-6
    inp["dt"][:, 20:23] = 0.0
    inp["x"] = inp["x"] * 1e9
    out, final = via_ssd(inp)
    want, want_final = reference(inp)
    assert torch.isfinite(out).all()
    assert_close(out, want, torch.float32, name="out")
    assert_state_close(final, want_final, torch.float32)
    inp["x"] = inp["x"] / 1e9
    got, want = _grads(inp, via_ssd), _grads(f64(inp), "reference")
    for name in ("A", "dt", "trap", "x"):
        assert_close(got[name], want[name], torch.float32, name=f"grad {name}")


def test_growing_heads_keep_their_sign():
    """A > 0 (a state that grows, accepted by the op) is a negative SSD step, not a floored one."""
    inp = siso_inputs(30, 1, 2, False)
    inp["A"] = inp["A"].abs() * 0.1
    out, final = via_ssd(inp)
    want, want_final = reference(inp)
    assert_close(out, want, torch.float32, name="out")
    assert_state_close(final, want_final, torch.float32)


# (rank r, groups g, rotary angles a, interleaved pairs)
MIMO = [(2, 2, 4, False), (4, 1, 2, True)]


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("l", [1, 30])
@pytest.mark.parametrize("r, g, a, interleaved", MIMO)
@pytest.mark.parametrize("packed", [False, True])
def test_mimo_matches_float64_reference(dtype, l, r, g, a, interleaved, packed):
    """Rank > 1 as r sub-steps per position: outputs and the final state of the recurrence."""
    inp = make_inputs(b=2, l=l, h=4, r=r, g=g, a=a, dtype=dtype, initial=True)
    kw = {"rotary_interleaved": interleaved, "seq_idx": packed_ids(2, l) if packed else None}
    out, final = via_ssd(inp, chunk_size=8, **kw)
    want, want_final = reference(inp, **kw)
    assert out.dtype == dtype and out.shape == want.shape
    assert_close(out, want, dtype, name="out")
    assert_state_close(final, want_final, dtype)


@pytest.mark.parametrize("without", [(), ("mimo_o",), ("mimo_x", "mimo_z", "mimo_o")])
def test_mimo_gradients_fp32_match_float64_reference(without):
    inp = make_inputs(b=2, l=23, h=4, r=3, g=2, a=4, initial=True)
    for k in without:
        inp.pop(k)
    kw = {"seq_idx": packed_ids(2, 23)}
    got, want = _grads(inp, via_ssd, **kw), _grads(f64(inp), "reference", **kw)
    assert all(v is not None for v in got.values())
    for name in got:
        assert_close(got[name], want[name], torch.float32, name=f"grad {name}")

