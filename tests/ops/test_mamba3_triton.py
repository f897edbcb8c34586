"""``mamba3_scan(backend="triton")`` (single-input Mamba-3 through the SSD op's Triton kernels) in Triton's CPU
interpreter against the float64 recurrence: outputs, the final state and every gradient.

The interpreter has to be switched on before triton is imported, so the cases run in a subprocess (this
file as a script). The GPU version is tests/gpu/test_mamba3.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ssmkit.ops.mamba3 import Mamba3ScanState, mamba3_scan
from ssmkit.testing import assert_close, report_checks, run_checks_in_interpreter

if __name__ == "__main__":  # run as a script (in the interpreter's subprocess): `tests` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.ops.test_mamba3 import assert_state_close, f64, make_inputs, packed_ids

# name -> (l, g, a, interleaved, dtype, packed): tiny, the interpreter is slow.
CASES = {
    "interleaved_packed_fp32": (37, 1, 2, True, "float32", True),
    "halves_groups_bf16": (21, 2, 4, False, "bfloat16", False),
}


def check_case(l, g, a, interleaved, dtype, packed) -> None:
    inp = make_inputs(b=2, l=l, h=4, r=1, g=g, a=a, dtype=getattr(torch, dtype), initial=True)
    kw = {"rotary_interleaved": interleaved, "seq_idx": packed_ids(2, l) if packed else None,
          "return_final_state": True, "chunk_size": 16}

    def run(inputs, backend):
        leaves = {k: Mamba3ScanState(*(t.detach().clone().requires_grad_() for t in v)) if isinstance(v, tuple)
                  else v.detach().clone().requires_grad_() for k, v in inputs.items()}
        out, final = mamba3_scan(**leaves, backend=backend, **kw)
        gen = torch.Generator().manual_seed(1)
        loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
                   for o in (out, final.ssm, torch.cos(final.angle)))
        loss.backward()
        flat = {k: v for k, v in leaves.items() if isinstance(v, torch.Tensor)}
        flat |= {f"initial_state.{f}": t for f, t in zip(Mamba3ScanState._fields, leaves["initial_state"])}
        return out, final, {k: v.grad for k, v in flat.items()}

    out, final, grads = run(inp, "triton")
    want, want_final, want_grads = run(f64(inp), "reference")
    tol = getattr(torch, dtype)
    assert out.dtype == inp["x"].dtype
    assert_close(out, want, tol, name="out")
    assert_state_close(final, want_final, torch.float32)
    for name, grad in grads.items():
        assert_close(grad, want_grads[name], tol, name=f"grad {name}")


def test_triton_route_matches_reference_in_interpreter():
    run_checks_in_interpreter(__file__, "all")


if __name__ == "__main__":
    report_checks({name: (check_case, case) for name, case in CASES.items()})
