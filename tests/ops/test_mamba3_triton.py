"""``mamba3_scan(backend="triton")`` (single-input Mamba-3 through the SSD op's Triton kernels) in Triton's CPU
interpreter against the float64 recurrence: outputs and the final state (the route is inference only).

The interpreter has to be switched on before triton is imported, so the cases run in a subprocess (this
file as a script). The GPU version is tests/gpu/test_mamba3.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ssmkit.ops.mamba3 import mamba3_scan
from ssmkit.testing import assert_close, report_checks, run_checks_in_interpreter

if __name__ == "__main__":  # run as a script (in the interpreter's subprocess): `tests` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.ops.test_mamba3 import assert_state_close, f64, make_inputs, packed_ids

# name -> (l, g, a, interleaved, dtype, packed): tiny, the interpreter is slow.
CASES = {
    "interleaved_packed_fp32": (37, 1, 2, True, "float32", True),
    "halves_groups_bf16": (21, 2, 4, False, "bfloat16", False),
}


@torch.no_grad()
def check_case(l, g, a, interleaved, dtype, packed) -> None:
    inp = make_inputs(b=2, l=l, h=4, r=1, g=g, a=a, dtype=getattr(torch, dtype), initial=True)
    kw = {"rotary_interleaved": interleaved, "seq_idx": packed_ids(2, l) if packed else None,
          "return_final_state": True, "chunk_size": 16}
    out, final = mamba3_scan(**inp, backend="triton", **kw)
    want, want_final = mamba3_scan(**f64(inp), backend="reference", **kw)
    assert out.dtype == inp["x"].dtype
    assert_close(out, want, getattr(torch, dtype), name="out")
    assert_state_close(final, want_final, torch.float32)


def test_triton_route_matches_reference_in_interpreter():
    run_checks_in_interpreter(__file__, "all")


if __name__ == "__main__":
    report_checks({name: (check_case, case) for name, case in CASES.items()})
