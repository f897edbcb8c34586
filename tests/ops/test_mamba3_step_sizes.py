"""Mamba-3's per-(position, head) scalars (``ssmkit/ops/mamba3/step_sizes.py``): the fused Triton kernels in
Triton's CPU interpreter against the PyTorch forms evaluated in float64 (values and every gradient), on strided
inputs as the layer passes them, with packed documents; and the SSD route without a final state against the
same route with one.

The interpreter has to be switched on before triton is imported, so the cases run in a subprocess (this file
as a script).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ssmkit.ops.mamba3 import mamba3_scan
from ssmkit.ops.mamba3.step_sizes import dt_and_decay, step_weights
from ssmkit.testing import assert_close, report_checks, run_checks_in_interpreter

if __name__ == "__main__":  # run as a script (in the interpreter's subprocess): `tests` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.ops.test_mamba3 import make_inputs, packed_ids


def _strided(b: int, l: int, h: int, dtype: torch.dtype, scale: float = 3.0) -> torch.Tensor:
    """A (b, l, h) slice of a wider (b, l, 3h) tensor, as the in-projection's split gives."""
    return (torch.randn(b, l, 3 * h) * scale).to(dtype)[..., h:2 * h]


# name -> (b, l, h, dtype, activation, A_floor): the floor clamps some entries in the last two.
DT_DECAY_CASES = {
    "heavy_tail_bf16": (2, 37, 5, "bfloat16", "heavy_tail", 1e-4),
    "softplus_fp32": (1, 1030, 3, "float32", "softplus", 1e-4),
    "heavy_tail_floor_fp32": (2, 9, 4, "float32", "heavy_tail", 0.8),
    "softplus_floor_bf16": (1, 21, 2, "bfloat16", "softplus", 0.5),
}


def check_dt_decay(b, l, h, dtype, activation, A_floor) -> None:
    dtype = getattr(torch, dtype)
    dd_dt, dd_A = _strided(b, l, h, dtype), _strided(b, l, h, dtype)
    dd_dt[0, 0, 0] = 25.0  # past softplus's threshold
    dd_A[0, -1, -1] = 0.0  # heavy tail's gradient at exactly 0 is 1
    bias = torch.randn(h)
    got_in = [t.detach().clone().requires_grad_() for t in (dd_dt, dd_A, bias)]
    want_in = [t.detach().double().requires_grad_() for t in (dd_dt, dd_A, bias)]
    dt, A = dt_and_decay(*got_in, A_floor, activation, backend="triton")
    want_dt, want_A = dt_and_decay(*want_in, A_floor, activation, backend="chunked")
    assert dt.dtype == A.dtype == torch.float32 and dt.shape == A.shape == (b, l, h)
    assert_close(dt, want_dt, torch.float32, name="dt")
    assert_close(A, want_A, torch.float32, name="A")
    assert (A <= -A_floor).all()
    cot = torch.randn(2, b, l, h, dtype=torch.float64)
    (dt.double() * cot[0] + A.double() * cot[1]).sum().backward()
    (want_dt * cot[0] + want_A * cot[1]).sum().backward()
    for name, t, w in zip(("dd_dt", "dd_A", "dt_bias"), got_in, want_in):
        assert t.grad.dtype == t.dtype, name
        assert_close(t.grad, w.grad, dtype if name != "dt_bias" else torch.float32, name=f"grad {name}")


# name -> (b, l, h, trap dtype, packed)
STEP_WEIGHT_CASES = {
    "plain_fp32": (2, 19, 3, "float32", False),
    "packed_bf16": (2, 300, 5, "bfloat16", True),
    "one_position": (1, 1, 2, "float32", False),
    "packed_long_fp32": (1, 1500, 2, "float32", True),
}


def check_step_weights(b, l, h, dtype, packed) -> None:
    dt = torch.rand(b, l, h) * 0.5 + 0.01
    A = -torch.rand(b, l, h) * 2
    trap = _strided(b, l, h, getattr(torch, dtype), scale=2.0)
    seq_idx = packed_ids(b, l) if packed else None
    got_in = [t.detach().clone().requires_grad_() for t in (dt, A, trap)]
    want_in = [t.detach().double().requires_grad_() for t in (dt, A, trap)]
    got = step_weights(*got_in, seq_idx, dtype=torch.float32, backend="triton")
    want = step_weights(*want_in, seq_idx, dtype=torch.float64, backend="chunked")
    cot = torch.randn(3, b, l, h, dtype=torch.float64)
    for name, g, w in zip(("-dt A", "w", "next share"), got, want):
        assert g.dtype == torch.float32 and g.shape == (b, l, h)
        assert_close(g, w, torch.float32, name=name)
    sum(g.double() * c for g, c in zip(got, cot)).sum().backward()
    sum(w * c for w, c in zip(want, cot)).sum().backward()
    for name, t, w in zip(("dt", "A", "trap"), got_in, want_in):
        assert t.grad.dtype == t.dtype, name
        assert_close(t.grad, w.grad, getattr(torch, dtype) if name == "trap" else torch.float32, name=f"grad {name}")


def check_without_final_state(dtype, packed) -> None:
    """The SSD route skips the final state's pieces when not asked: same output and gradients."""
    inp = make_inputs(b=2, l=23, h=4, r=1, g=1, a=2, dtype=getattr(torch, dtype), initial=True)
    for k in ("mimo_x", "mimo_z", "mimo_o"):
        inp.pop(k)
    kw = {"seq_idx": packed_ids(2, 23) if packed else None, "chunk_size": 16, "backend": "triton"}
    results = []
    for final in (True, False):
        leaves = {k: tuple(t.detach().clone().requires_grad_() for t in v) if isinstance(v, tuple)
                  else v.detach().clone().requires_grad_() for k, v in inp.items()}
        out = mamba3_scan(**leaves, return_final_state=final, **kw)
        out = out[0] if final else out
        (out.double() * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape)).sum().backward()
        flat = [v for v in leaves.values() if isinstance(v, torch.Tensor)] + list(leaves["initial_state"])
        results.append((out, [t.grad for t in flat]))
    (out_f, grads_f), (out_n, grads_n) = results
    assert torch.equal(out_f, out_n)
    for g_f, g_n in zip(grads_f, grads_n):
        # The final state's pieces add nothing to these gradients when the loss does not read them.
        assert g_f is not None and g_n is not None and torch.allclose(g_f, g_n, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("activation", ["heavy_tail", "softplus"])
def test_pytorch_form_is_the_layers_formula(activation):
    """On CPU (auto: PyTorch) the pair is the layer's former two lines, bit for bit."""
    from ssmkit.ops.mamba3.step_sizes import decay_rate

    dd_dt, dd_A, bias = _strided(2, 5, 3, torch.bfloat16), _strided(2, 5, 3, torch.bfloat16), torch.randn(3)
    dt, A = dt_and_decay(dd_dt, dd_A, bias, 1e-4, activation)
    assert torch.equal(dt, torch.nn.functional.softplus(dd_dt.float() + bias))
    assert torch.equal(A, decay_rate(dd_A, 1e-4, activation))
    with pytest.raises(ValueError, match="decay activation"):
        dt_and_decay(dd_dt, dd_A, bias, 1e-4, "relu")


def test_fused_step_sizes_match_pytorch_in_interpreter():
    run_checks_in_interpreter(__file__, "all")


if __name__ == "__main__":
    report_checks({name: (check_dt_decay, case) for name, case in DT_DECAY_CASES.items()}
                  | {name: (check_step_weights, case) for name, case in STEP_WEIGHT_CASES.items()}
                  | {"no_final_state_fp32_packed": (check_without_final_state, ("float32", True)),
                     "no_final_state_bf16": (check_without_final_state, ("bfloat16", False))})
