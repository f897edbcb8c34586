"""MIMO (rank r > 1) ``mamba3_scan(backend="triton")`` in Triton's CPU interpreter against the float64 recurrence:
outputs, the final state and every gradient, through the fused kernels of ``triton_mimo_*.py`` (``via_ssd.FUSED_MIMO``
on, the default) and through the PyTorch form they replace; and each fused kernel alone against its float64 PyTorch
form (gradients included).

The interpreter has to be switched on before triton is imported, so the cases run in a subprocess (this file as a
script). Its float32 -> bf16/fp16 casts truncate where a GPU rounds to nearest even: the route's three rounded
operands (x̃, B̃, C̃) then carry a one-sided error, so the low-precision route cases run in fp16 (whose tolerance
leaves room for it); bf16 is exercised by the kernel cases here and on a GPU by tests/gpu/test_mamba3.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ssmkit.testing import assert_close, report_checks, run_checks_in_interpreter

if __name__ == "__main__":  # run as a script (in the interpreter's subprocess): `tests` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.ops.test_mamba3_triton import check_case

# name -> (l, g, a, interleaved, dtype, packed, mimo projections, rank, inputs left out[, fused]): odd lengths, a
# rank that is not a power of two (padded tiles), a rope fraction below 1 (a < n/2), initial and final states always.
ROUTE_CASES = {
    "rank2_packed_fp32": (13, 2, 4, False, "float32", True, True, 2, ()),
    "rank3_interleaved_fp16": (9, 1, 2, True, "float16", False, True, 3, ()),
    "rank4_packed_rope_half_fp32": (21, 1, 2, False, "float32", True, True, 4, ()),
    "rank4_groups_fp16": (11, 2, 4, False, "float16", True, True, 4, ()),
    # without mimo_o: one output per rank
    "rank2_per_rank_out_fp32": (11, 2, 3, True, "float32", True, True, 2, ("mimo_o",)),
    # no projections, gate, skip or B bias: x̃ is x on every rank
    "rank2_bare_packed_fp32": (10, 1, 2, False, "float32", True, False, 2, ("z", "D", "B_bias")),
    # the gate without mimo_z, x without mimo_x
    "rank3_partial_projections_fp32": (7, 1, 2, True, "float32", False, True, 3, ("mimo_x", "mimo_z")),
    # the PyTorch form the fused kernels replace (FUSED_MIMO off)
    "rank2_packed_fp32_unfused": (13, 2, 4, False, "float32", True, True, 2, (), False),
    "rank3_bf16_unfused": (9, 1, 2, True, "bfloat16", False, True, 3, (), False),
}


def check_route(l, g, a, interleaved, dtype, packed, mimo, rank, drop, fused=True) -> None:
    from ssmkit.ops.mamba3 import via_ssd

    saved = via_ssd.FUSED_MIMO
    via_ssd.FUSED_MIMO = fused
    try:
        check_case(l, g, a, interleaved, dtype, packed, mimo, rank, drop)
    finally:
        via_ssd.FUSED_MIMO = saved


def check_no_final_state(l, rank, packed) -> None:
    """``return_final_state=False``: the route skips the final state's B̃ (None in its place inside the route);
    outputs and every gradient as the reference's."""
    from ssmkit.ops.mamba3 import mamba3_scan
    from tests.ops.test_mamba3 import f64, make_inputs, packed_ids

    inp = make_inputs(b=2, l=l, h=4, r=rank, g=1, n=8, a=3, initial=True)
    kw = {"rotary_interleaved": False, "seq_idx": packed_ids(2, l) if packed else None, "chunk_size": 16}

    def run(inputs, backend):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if k != "initial_state"}
        out = mamba3_scan(**leaves, backend=backend, **kw)
        (out.double() * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape)).sum().backward()
        return out, {k: v.grad for k, v in leaves.items()}

    out, grads = run(inp, "triton")
    want, want_grads = run(f64(inp), "reference")
    assert_close(out, want, torch.float32, name="out")
    for name, grad in grads.items():
        assert_close(grad, want_grads[name], torch.float32, name=f"grad {name}")


# name -> (b, l, r, g, h, n, a, interleaved, dtype, with the scores' gradient[, programs the backward's head split
# aims at (None: the default; 0 keeps a group's heads in one program)[, row padding: B and C as slices of one
# (b, l, 2·r·g·n + padding) tensor, as the layer's normalised in-projection gives them[, runs of positions the
# backward aims at (None: the default, one block a run at these sizes; 2: several blocks, the bias slots summed)]]])
ROTARY_CASES = {
    "mimo_rotary_halves_fp32": (2, 13, 2, 1, 4, 8, 4, False, "float32", True),
    "mimo_rotary_halves_long_runs_fp32": (2, 13, 2, 1, 4, 8, 4, False, "float32", True, None, 0, 2),
    "mimo_rotary_rank3_interleaved_bf16": (2, 9, 3, 2, 4, 8, 3, True, "bfloat16", True),
    "mimo_rotary_rank3_unsplit_long_runs_fp32": (2, 9, 3, 2, 4, 8, 3, True, "float32", True, 0, 0, 3),
    "mimo_rotary_unsplit_rope_half_fp32": (1, 11, 4, 2, 6, 12, 3, False, "float32", True, 0),
    "mimo_rotary_strided_rows_bf16": (2, 7, 2, 1, 4, 16, 4, False, "bfloat16", True, None, 5),
    "mimo_rotary_no_ds_fp32": (1, 5, 2, 1, 2, 8, 2, True, "float32", False),
}


def check_mimo_rotary(b, l, r, g, h, n, a, interleaved, dtype, with_ds, split_programs=None, row_pad=0,
                      run_programs=None) -> None:
    from ssmkit.ops.mamba3 import triton_mimo_rotary, triton_rotary
    from ssmkit.ops.mamba3.reference import rotate
    from ssmkit.ops.mamba3.triton_mimo_rotary import mimo_rotate_bc_triton

    dt = getattr(torch, dtype)
    inputs = [torch.randn(b, l, r, g, n).to(dt), torch.randn(b, l, r, g, n).to(dt), torch.randn(h, r, n),
              torch.randn(h, r, n), torch.rand(b, l, h, a) * 6.3]
    got_in = [t.clone().requires_grad_() for t in inputs]
    want_in = [t.double().requires_grad_() for t in inputs]
    args = list(got_in)
    if row_pad:
        # B and C as row-strided slices of one tensor: read in place, gradients reach the slices.
        m = r * g * n
        BC = torch.cat([got_in[0].flatten(-3), got_in[1].flatten(-3), torch.zeros(b, l, row_pad, dtype=dt)], -1)
        args[:2] = (BC[..., :m].unflatten(-1, (r, g, n)), BC[..., m: 2 * m].unflatten(-1, (r, g, n)))
        assert args[0].stride(1) == 2 * m + row_pad
    saved = triton_rotary._SPLIT_PROGRAMS, triton_mimo_rotary._RUN_PROGRAMS
    triton_rotary._SPLIT_PROGRAMS = saved[0] if split_programs is None else split_programs
    triton_mimo_rotary._RUN_PROGRAMS = saved[1] if run_programs is None else run_programs
    try:
        Bt, Ct, S = mimo_rotate_bc_triton(*args, interleaved, dt)
        assert Bt.shape == (b, l * r, h, n) and Bt.dtype == Ct.dtype == dt and S.dtype == torch.float32
        Bt, Ct = Bt.view(b, l, r, h, n), Ct.view(b, l, r, h, n)

        def reference(B, C, B_bias, C_bias, theta):
            Bt, Ct = (rotate(v.repeat_interleave(h // g, dim=3) + bias.transpose(0, 1), theta[:, :, None], interleaved)
                      for v, bias in ((B, B_bias), (C, C_bias)))
            return Bt, Ct, torch.einsum("bljhn,blkhn->blhjk", Ct, Bt)

        want = reference(*want_in)
        for name, t, w in zip(("Bt", "Ct", "S"), (Bt, Ct, S), want):
            assert_close(t, w, dt, name=name)
        cots = [torch.randn(w.shape, dtype=torch.float64) for w in want]
        used = (Bt, Ct, S) if with_ds else (Bt, Ct)
        sum((t.double() * c).sum() for t, c in zip(used, cots)).backward()
        sum((w * c).sum() for w, c in zip(want[: len(used)], cots)).backward()
    finally:
        triton_rotary._SPLIT_PROGRAMS, triton_mimo_rotary._RUN_PROGRAMS = saved
    for name, t, w in zip(("B", "C", "B_bias", "C_bias", "theta"), got_in, want_in):
        assert t.grad.dtype == t.dtype
        assert_close(t.grad, w.grad, dt, name=f"grad {name}")


# name -> (b, l, r, h, p, dtype, inputs left out): p not a power of two, ranks padded or not.
OUTPUT_CASES = {
    "mimo_output_fp32": (2, 9, 2, 3, 5, "float32", ()),
    "mimo_output_rank3_bf16": (1, 13, 3, 2, 16, "bfloat16", ()),
    "mimo_output_per_rank_fp32": (2, 7, 4, 2, 3, "float32", ("mimo_o",)),
    "mimo_output_no_gate_no_D_fp32": (1, 6, 2, 2, 4, "float32", ("z", "D", "mimo_x")),
    "mimo_output_no_mimo_z_bf16": (2, 5, 4, 3, 8, "bfloat16", ("mimo_z",)),
}


def check_mimo_output(b, l, r, h, p, dtype, drop) -> None:
    import torch.nn.functional as F

    from ssmkit.ops.mamba3 import triton_mimo_output
    from ssmkit.ops.mamba3.triton_mimo_output import mimo_output_triton

    dt = getattr(torch, dtype)
    saved = triton_mimo_output._BWD_PROGRAMS
    triton_mimo_output._BWD_PROGRAMS = 2 * h  # runs of several blocks per program: the partials sum over them
    named = {"y": torch.randn(b, l * r, h, p).to(dt), "x": torch.randn(b, l, 2 * h, p).to(dt),
             "mimo_x": torch.randn(h, r, p), "S": torch.randn(b, l, h, r, r), "w": torch.rand(b, l, h),
             "nxt": torch.rand(b, l, h), "D": torch.randn(h), "z": torch.randn(b, l, 2 * h, p).to(dt),
             "mimo_z": torch.randn(h, r, p), "mimo_o": torch.randn(h, r, p)}
    named = {k: None if k in drop else v for k, v in named.items()}
    got_in = {k: None if v is None else v.clone().requires_grad_() for k, v in named.items()}
    want_in = {k: None if v is None else v.double().requires_grad_() for k, v in named.items()}
    try:
        # x and z as the layer passes them: strided slices of a wider tensor's rows, read in place.
        got = dict(got_in, x=got_in["x"][:, :, :h], z=None if got_in["z"] is None else got_in["z"][:, :, h:])
        out = mimo_output_triton(*got.values(), dt)
    finally:
        triton_mimo_output._BWD_PROGRAMS = saved
    y, x, mx, S, w, nxt, D, z, mz, mo = want_in.values()
    x = x[:, :, :h]
    later = torch.ones(r, r, dtype=torch.bool).triu(1)
    coef = torch.where(later, w[..., None, None], 0.0) - nxt[..., None, None]
    xt = x[:, :, None].expand(b, l, r, h, p) if mx is None else x[:, :, None] * mx.transpose(0, 1)
    v = y.view(b, l, r, h, p) + torch.einsum("blhjk,blkhp->bljhp", S * coef, xt)
    if D is not None:
        v = v + D[:, None] * xt
    if z is not None:
        zr = z[:, :, None, h:]
        v = v * F.silu(zr if mz is None else zr * mz.transpose(0, 1))
    want = v if mo is None else (v * mo.transpose(0, 1)).sum(2)
    assert out.dtype == dt
    assert_close(out, want, dt, name="out")
    cot = torch.randn(want.shape, dtype=torch.float64)
    (out.double() * cot).sum().backward()
    (want * cot).sum().backward()
    for name, t in got_in.items():
        if t is not None and want_in[name].grad is not None:
            assert_close(t.grad, want_in[name].grad, dt, name=f"grad {name}")


# name -> (b, l, r, h, p, dtype, with mimo_x)
INPUT_CASES = {
    "mimo_inputs_fp32": (2, 9, 3, 2, 5, "float32", True),
    "mimo_inputs_bf16": (1, 11, 4, 3, 16, "bfloat16", True),
    "mimo_inputs_no_mimo_x_fp32": (2, 5, 2, 2, 3, "float32", False),
}


def check_mimo_inputs(b, l, r, h, p, dtype, with_mx) -> None:
    from ssmkit.ops.mamba3.triton_mimo_inputs import mimo_inputs_triton

    dt = getattr(torch, dtype)
    inputs = [torch.randn(b, l, h + 1, p).to(dt), torch.randn(h, r, p) if with_mx else None, torch.randn(b, l, h),
              torch.rand(b, l, h)]
    got_in = [None if t is None else t.clone().requires_grad_() for t in inputs]
    want_in = [None if t is None else t.double().requires_grad_() for t in inputs]
    got = mimo_inputs_triton(got_in[0][:, :, 1:], *got_in[1:], r, dt)  # x a strided slice, read in place
    x, mx, sdt, w = want_in
    x = x[:, :, 1:]
    xt = x[:, :, None].expand(b, l, r, h, p) if mx is None else x[:, :, None] * mx.transpose(0, 1)
    step = torch.cat([sdt[:, :, None], sdt.new_zeros(b, l, r - 1, h)], 2)
    want = (xt.reshape(b, l * r, h, p), step.reshape(b, l * r, h), w[:, :, None].expand(b, l, r, h).reshape(b, -1, h))
    assert got[0].dtype == dt
    for name, t, v in zip(("xt", "step", "scale"), got, want):
        assert_close(t, v, dt, name=name)
    cots = [torch.randn(v.shape, dtype=torch.float64) for v in want]
    sum((t.double() * c).sum() for t, c in zip(got, cots)).backward()
    sum((v * c).sum() for v, c in zip(want, cots)).backward()
    for name, t, v in zip(("x", "mimo_x", "sdt", "w"), got_in, want_in):
        if t is not None:
            assert_close(t.grad, v.grad, dt, name=f"grad {name}")


def _checks(group: str) -> dict:
    if group == "route":
        return ({name: (check_route, case) for name, case in ROUTE_CASES.items()}
                | {"rank3_no_final_state_packed_fp32": (check_no_final_state, (17, 3, True))})
    return ({name: (check_mimo_rotary, case) for name, case in ROTARY_CASES.items()}
            | {name: (check_mimo_output, case) for name, case in OUTPUT_CASES.items()}
            | {name: (check_mimo_inputs, case) for name, case in INPUT_CASES.items()})


# Two groups, two subprocesses: pytest -n 2 runs them side by side.
@pytest.mark.slow  # about 90 s on a loaded 2-core CPU: eleven scans with every gradient in the interpreter
def test_mimo_triton_route_matches_reference_in_interpreter():
    run_checks_in_interpreter(__file__, "route")


def test_mimo_kernels_match_float64_in_interpreter():
    run_checks_in_interpreter(__file__, "kernels")


if __name__ == "__main__":
    report_checks(_checks(sys.argv[1]))
