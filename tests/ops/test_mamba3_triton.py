"""``mamba3_scan(backend="triton")`` (single-input Mamba-3 through the SSD op's Triton kernels) in Triton's CPU
interpreter against the float64 recurrence: outputs, the final state and every gradient; and the fused B̃/C̃
kernel (``triton_rotary.py``) alone against its PyTorch form.

The interpreter has to be switched on before triton is imported, so the cases run in a subprocess (this
file as a script). The GPU version is tests/gpu/test_mamba3.py.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from ssmkit.ops.mamba3 import Mamba3ScanState, mamba3_scan
from ssmkit.testing import assert_close, report_checks, run_checks_in_interpreter

if __name__ == "__main__":  # run as a script (in the interpreter's subprocess): `tests` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.ops.test_mamba3 import assert_state_close, f64, make_inputs, packed_ids

# name -> (l, g, a, interleaved, dtype, packed, mimo, rank): tiny, the interpreter is slow. Without MIMO
# projections the rank-1 route's output is the fused kernel of triton_output.py, with them PyTorch. Rank > 1 (r
# sub-steps per position through the SSD kernels): test_mamba3_triton_mimo.py.
CASES = {
    "interleaved_packed_fp32": (37, 1, 2, True, "float32", True, False, 1),
    "halves_groups_bf16_mimo": (21, 2, 4, False, "bfloat16", False, True, 1),
    "interleaved_bf16": (19, 1, 2, True, "bfloat16", True, False, 1),
    # more angles than one program of the angle kernels takes: Δ's gradient from two partials
    "many_angles_packed_fp32": (21, 1, 20, True, "float32", True, False, 1),
    # no rotary pair (a = 0, as the chunked route takes it): the angle kernels launch nothing
    "no_angles_packed_fp32": (13, 1, 0, True, "float32", True, False, 1),
}


def check_case(l, g, a, interleaved, dtype, packed, mimo, rank, drop=()) -> None:
    """The route against the float64 recurrence; ``drop``: optional inputs left out besides the MIMO projections."""
    inp = make_inputs(b=2, l=l, h=4, r=rank, g=g, n=max(8, 2 * a), a=a, dtype=getattr(torch, dtype), initial=True)
    for k in (() if mimo else ("mimo_x", "mimo_z", "mimo_o")) + tuple(drop):
        inp.pop(k)
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
    # bf16 inputs: the SSD kernels' operands x̃, B̃, C̃ are bf16 (as on the GPU), so the state is bf16-accurate.
    assert_state_close(final, want_final, tol)
    for name, grad in grads.items():
        assert_close(grad, want_grads[name], tol, name=f"grad {name}")


# name -> (b, l, g, h, n, a, interleaved, dtype, with the cb gradient[, programs the backward's head split aims
# at: tiny grids split a group's heads fully, 0 keeps them in one program (None: the default)[, row padding: B and
# C as slices of one (b, l, 2·g·n + padding) tensor, as the layer's normalised in-projection gives them, read
# without a copy]]): odd lengths, n/2 not a power of two.
ROTARY_CASES = {
    "rotary_interleaved_fp32": (2, 37, 1, 4, 8, 2, True, "float32", True),
    "rotary_unsplit_groups_fp32": (2, 21, 2, 6, 8, 3, True, "float32", True, 0),
    "rotary_halves_groups_bf16": (2, 21, 2, 4, 16, 4, False, "bfloat16", True),
    "rotary_n12_no_dcb": (1, 5, 1, 2, 12, 3, True, "float32", False),
    "rotary_interleaved_groups_bf16": (2, 19, 2, 6, 8, 3, True, "bfloat16", True),
    "rotary_strided_rows_bf16": (2, 19, 2, 6, 8, 3, True, "bfloat16", True, None, 3),
    "rotary_strided_rows_unsplit_fp32": (2, 21, 2, 4, 16, 4, False, "float32", True, 0, 5),
}


def check_rotary(b, l, g, h, n, a, interleaved, dtype, with_dcb, split_programs=None, row_pad=0) -> None:
    from ssmkit.ops.mamba3 import triton_rotary
    from ssmkit.ops.mamba3.reference import rotate
    from ssmkit.ops.mamba3.triton_rotary import rotate_bc_triton

    saved = triton_rotary._SPLIT_PROGRAMS
    triton_rotary._SPLIT_PROGRAMS = saved if split_programs is None else split_programs
    try:
        _check_rotary(b, l, g, h, n, a, interleaved, dtype, with_dcb, row_pad, rotate, rotate_bc_triton)
    finally:
        triton_rotary._SPLIT_PROGRAMS = saved


def _check_rotary(b, l, g, h, n, a, interleaved, dtype, with_dcb, row_pad, rotate, rotate_bc_triton) -> None:
    dt = getattr(torch, dtype)
    inputs = [torch.randn(b, l, g, n).to(dt), torch.randn(b, l, g, n).to(dt), torch.randn(h, n), torch.randn(h, n),
              torch.rand(b, l, h, a) * 6.3]
    got_in = [t.clone().requires_grad_() for t in inputs]
    want_in = [t.double().requires_grad_() for t in inputs]
    args = list(got_in)
    if row_pad:
        # B and C as row-strided slices of one tensor: the kernels read them in place, gradients reach the slices.
        BC = torch.cat([got_in[0].flatten(-2), got_in[1].flatten(-2), torch.zeros(b, l, row_pad, dtype=dt)], -1)
        args[:2] = (BC[..., : g * n].unflatten(-1, (g, n)), BC[..., g * n: 2 * g * n].unflatten(-1, (g, n)))
        assert args[0].stride(1) == 2 * g * n + row_pad
    Bt, Ct, cb = rotate_bc_triton(*args, interleaved, dt)
    assert Bt.dtype == Ct.dtype == dt and cb.dtype == torch.float32

    def reference(B, C, B_bias, C_bias, theta):
        Bt, Ct = (rotate(v.repeat_interleave(h // g, dim=2) + bias, theta, interleaved)
                  for v, bias in ((B, B_bias), (C, C_bias)))
        return Bt, Ct, (Bt * Ct).sum(-1)

    want = reference(*want_in)
    for name, t, w in zip(("Bt", "Ct", "cb"), (Bt, Ct, cb), want):
        assert_close(t, w, dt, name=name)
    cots = [torch.randn(w.shape, dtype=torch.float64) for w in want]
    if not with_dcb:
        cots[2] = torch.zeros_like(cots[2])
    used = (Bt, Ct, cb) if with_dcb else (Bt, Ct)
    sum((t.double() * c).sum() for t, c in zip(used, cots)).backward()
    sum((w * c).sum() for w, c in zip(want, cots)).backward()
    for name, t, w in zip(("B", "C", "B_bias", "C_bias", "theta"), got_in, want_in):
        assert t.grad.dtype == t.dtype
        assert_close(t.grad, w.grad, dt, name=f"grad {name}")


# name -> (b, l, h, p, dtype, with z, with D)
OUTPUT_CASES = {
    "output_fp32": (2, 19, 3, 5, "float32", True, True),
    "output_bf16_no_z": (1, 33, 2, 16, "bfloat16", False, True),
    "output_no_D": (2, 7, 2, 8, "float32", True, False),
}


def check_output(b, l, h, p, dtype, with_z, with_D) -> None:
    import torch.nn.functional as F

    from ssmkit.ops.mamba3.triton_output import output_triton

    dt = getattr(torch, dtype)
    inputs = [torch.randn(b, l, h, p).to(dt), torch.randn(b, l, h, p).to(dt),
              torch.randn(b, l, 2 * h, p).to(dt) if with_z else None, torch.randn(b, l, h), torch.randn(b, l, h),
              torch.randn(h) if with_D else None]
    got_in = [None if t is None else t.clone().requires_grad_() for t in inputs]
    want_in = [None if t is None else t.double().requires_grad_() for t in inputs]
    # z as the layer passes it: a strided slice (here every other head's block of a wider tensor's rows).
    got_z = None if got_in[2] is None else got_in[2][:, :, h:]
    out = output_triton(got_in[0], got_in[1], got_z, *got_in[3:])
    y, x, z, nxt, cb, D = want_in
    z = None if z is None else z[:, :, h:]
    v = y - (nxt * cb)[..., None] * x + (0 if D is None else D[:, None] * x)
    want = v * F.silu(z) if z is not None else v
    assert out.dtype == dt
    assert_close(out, want, dt, name="out")
    cot = torch.randn(want.shape, dtype=torch.float64)
    (out.double() * cot).sum().backward()
    (want * cot).sum().backward()
    for name, t, w in zip(("y", "x", "z", "nxt", "cb", "D"), got_in, want_in):
        if t is not None:
            assert_close(t.grad, w.grad, dt, name=f"grad {name}")


# name -> (b, l, h, a, packed, with the initial angles, expanded over heads): l across several blocks of 64.
ANGLE_CASES = {
    "angles_packed_init": (2, 300, 3, 21, True, True, False),
    "angles_expanded_bf16": (1, 70, 4, 2, False, True, True),
    "angles_plain": (2, 9, 2, 3, False, False, False),
}


def check_angles(b, l, h, a, packed, with_init, expanded) -> None:
    from ssmkit.ops.mamba3.chunked import rotary_angles
    from ssmkit.ops.mamba3.triton_angles import rotary_angles_triton

    dt = torch.rand(b, l, h) * 0.5 + 0.05
    angles = (torch.randn(b, l, 1, a) * 2).to(torch.bfloat16).expand(b, l, h, a) if expanded else \
        torch.randn(b, l, h, a) * 2
    init = torch.rand(b, h, a) * 6.2 if with_init else None
    seq_idx = packed_ids(b, l) if packed else None
    got_in = [t if t is None else t.clone().requires_grad_() for t in (dt, angles, init)]
    want_in = [t if t is None else t.double().requires_grad_() for t in (dt, angles, init)]
    theta = rotary_angles_triton(got_in[0], got_in[1], seq_idx, got_in[2])
    want = rotary_angles(want_in[0][..., None] * math.pi * torch.tanh(want_in[1]), seq_idx, want_in[2])
    assert theta.dtype == torch.float32 and theta.shape == (b, l, h, a)
    wrapped = torch.remainder(theta.double() - want + math.pi, 2 * math.pi) - math.pi
    assert wrapped.abs().max() < 2e-5, f"theta off by {wrapped.abs().max():.1e}"
    cot = torch.randn(b, l, h, a, dtype=torch.float64)
    (theta.double() * cot).sum().backward()
    (want * cot).sum().backward()
    for name, t, w in zip(("dt", "angles", "init"), got_in, want_in):
        if t is not None:
            assert_close(t.grad, w.grad, torch.float32 if name != "angles" or not expanded else torch.bfloat16,
                         name=f"grad {name}")
    # A non-finite step makes θ NaN to the end of its document and nowhere else.
    bad = dt.clone()
    bad[0, l // 3, 0] = float("nan")
    theta = rotary_angles_triton(bad, angles, seq_idx, init)
    want = rotary_angles(bad.double()[..., None] * math.pi * torch.tanh(angles.double()), seq_idx,
                         None if init is None else init.double())
    assert torch.equal(torch.isnan(theta), torch.isnan(want))


def test_triton_route_matches_reference_in_interpreter():
    run_checks_in_interpreter(__file__, "all")


if __name__ == "__main__":
    report_checks({name: (check_case, case) for name, case in CASES.items()}
                  | {name: (check_rotary, case) for name, case in ROTARY_CASES.items()}
                  | {name: (check_output, case) for name, case in OUTPUT_CASES.items()}
                  | {name: (check_angles, case) for name, case in ANGLE_CASES.items()})
