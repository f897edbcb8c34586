"""``mamba3_scan_from_projection``: single-input Mamba-3 from an in-projection's raw slices.

Against its definition written out here in float64 (softplus, the decay rate, the RMS norms, the angles shared by the
heads, then ``mamba3_scan`` on the sequential reference): outputs, the final state and every gradient, with the
slices cut from one projection tensor as a layer cuts them (strided views). On the CPU for the PyTorch backends;
in Triton's interpreter (a subprocess: it must be switched on before triton is imported) for the fused route, whose
kernels make Δ/A (``triton_step_sizes.py``, RAW) and the norms (``triton_rotary.py``, NORM), and for those kernels
alone.
"""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from ssmkit.ops.mamba3 import Mamba3ScanState, mamba3_scan
from ssmkit.ops.mamba3.projected import mamba3_scan_from_projection
from ssmkit.ops.mamba3.step_sizes import decay_rate
from ssmkit.testing import assert_close, report_checks, run_checks_in_interpreter

if __name__ == "__main__":  # run as a script (in the interpreter's subprocess): `tests` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.ops.test_mamba3 import assert_state_close, packed_ids, random_state

F64 = torch.float64
EPS = (1e-5, 0.3)  # B's and C's norm eps, apart: a mix-up shows


def make(b=2, l=21, h=4, p=3, g=2, n=8, a=2, *, dtype=torch.float32, initial=False, params_dtype=torch.float32,
         bias_2d=False):
    """(projection (b, l, 2hp + 2gn + 3h + a + 1), parameters, initial state): the projection's slices are the
    per-token inputs (one unused column after them, so that no slice is a whole row)."""
    sizes = (h * p, h * p, g * n, g * n, h, h, h, a, 1)
    proj = torch.randn(b, l, sum(sizes))
    start = 2 * h * p + 2 * g * n
    proj[..., start: start + h] *= 2  # dd_dt
    proj[..., start + h: start + 2 * h] *= 6  # dd_A: both activations' decay rates on both sides of A_floor
    params = {"dt_bias": torch.rand(h) - 1.5, "B_norm_weight": torch.rand(n) + 0.5,
              "C_norm_weight": -torch.rand(n) - 0.5, "D": torch.randn(h),
              "B_bias": torch.randn(h, n) if bias_2d else torch.randn(h, 1, n), "C_bias": torch.randn(h, 1, n)}
    if bias_2d:
        params["C_bias"] = params["C_bias"][:, 0]
    params = {k: v.to(params_dtype) for k, v in params.items()}
    state = random_state(b, h, p, 1, n, a, torch.promote_types(dtype, torch.float32)) if initial else None
    return proj.to(dtype), params, state, (sizes, h, p, g, n)


def split(proj, layout):
    """The per-token inputs as views of ``proj``; without z where ``layout`` ends with "no_z" (``check``)."""
    sizes, h, p, g, n = layout[:5]
    z, x, B, C, dd_dt, dd_A, trap, angles, _ = proj.split(sizes, -1)
    return {"x": x.unflatten(-1, (h, p)), "z": None if layout[-1] == "no_z" else z.unflatten(-1, (h, p)),
            "dd_dt": dd_dt, "dd_A": dd_A, "B": B.unflatten(-1, (g, n)), "C": C.unflatten(-1, (g, n)), "trap": trap,
            "angles": angles}


def definition(x, dd_dt, dd_A, B, C, trap, angles, *, dt_bias, B_norm_weight, C_norm_weight, B_norm_eps,
               C_norm_eps, A_floor, decay_activation, rotary_interleaved, B_bias=None, C_bias=None, **kw):
    """The docstring's composition, spelled out."""
    def rms(v, w, eps):
        return v / (v.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w

    def rank_one(bias):
        return bias if bias is None or bias.dim() == 3 else bias[:, None]

    h = x.shape[2]
    result = mamba3_scan(
        x, F.softplus(dd_dt + dt_bias), decay_rate(dd_A, A_floor, decay_activation),
        rms(B, B_norm_weight, B_norm_eps)[:, :, None], rms(C, C_norm_weight, C_norm_eps)[:, :, None], trap,
        angles[:, :, None].expand(-1, -1, h, -1), B_bias=rank_one(B_bias), C_bias=rank_one(C_bias),
        rotary_interleaved=rotary_interleaved, backend="reference", **kw)
    return (result[0][:, :, 0], result[1]) if kw.get("return_final_state") else result[:, :, 0]


def run(fn, proj, params, state, layout, device="cpu", **kw):
    """out, final state and the gradients of the projection, the parameters and the initial state, of a random
    weighting of the output, the final state and the angles' cosines; computed on ``device``, returned on the CPU."""
    def leaf(t):
        return t.detach().to(device).clone().requires_grad_()

    proj = leaf(proj)
    params = {k: leaf(v) for k, v in params.items()}
    state = None if state is None else Mamba3ScanState(*(leaf(t) for t in state))
    if kw.get("seq_idx") is not None:
        kw["seq_idx"] = kw["seq_idx"].to(device)
    out, final = fn(**split(proj, layout), **params, initial_state=state, B_norm_eps=EPS[0], C_norm_eps=EPS[1],
                    return_final_state=True, chunk_size=16, **kw)
    gen = torch.Generator().manual_seed(1)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=F64).to(device)).sum()
               for o in (out, final.ssm, final.last_B, torch.cos(final.angle)))
    loss.backward()
    grads = {"projection": proj.grad} | {k: v.grad for k, v in params.items()}
    if state is not None:
        grads |= {f"initial_state.{f}": t.grad for f, t in zip(Mamba3ScanState._fields, state)}
    return (out.cpu(), Mamba3ScanState(*(t.cpu() for t in final)), {k: v.cpu() for k, v in grads.items()})


def check(backend, dtype="float32", *, packed=False, initial=False, activation="heavy_tail", interleaved=True,
          params_dtype="float32", bias_2d=False, unsplit=False, g=2, device="cpu", shape=None,
          angle_rtol=None, without=()) -> None:
    """``backend`` on ``device`` against the definition in float64 on the CPU (``shape``: ``make``'s b, l, h, p, n,
    a). ``angle_rtol``: the tolerance of the gradients that sum the rotation terms of every later position (the
    initial angles', dt_bias's and the projection's, which holds dd_dt and the angle logits). ``without``: optional
    arguments left out (any of "D", "z", "B_bias", "C_bias")."""
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    sizes = dict(zip(("b", "l", "h", "p", "n", "a"), shape or ()))
    proj, params, state, layout = make(dtype=dt, initial=initial, params_dtype=getattr(torch, params_dtype),
                                       bias_2d=bias_2d, g=g, **sizes)
    params = {k: v for k, v in params.items() if k not in without}
    if "z" in without:
        layout = (*layout, "no_z")
    kw = {"A_floor": 0.1, "decay_activation": activation, "rotary_interleaved": interleaved,
          "seq_idx": packed_ids(proj.shape[0], proj.shape[1]) if packed else None}
    split_programs = contextlib.nullcontext()
    if unsplit:  # a group's heads in one program of the rotation backward (the interpreter's tiny grids split them)
        from ssmkit.ops.mamba3 import triton_rotary

        split_programs = mock.patch.object(triton_rotary, "_SPLIT_PROGRAMS", 0)
    with split_programs:
        out, final, grads = run(lambda **a: mamba3_scan_from_projection(**a, backend=backend), proj, params, state,
                                layout, device, **kw)
    want, want_final, want_grads = run(definition, proj.double(), {k: v.double() for k, v in params.items()},
                                       None if state is None else Mamba3ScanState(*(t.double() for t in state)),
                                       layout, **kw)
    assert out.dtype == dt and final.ssm.dtype == torch.promote_types(dt, torch.float32)
    assert_close(out, want, dt, name="out")
    assert_state_close(final, want_final, dt)
    for name, grad in grads.items():
        assert grad is not None, name
        if not name.startswith("initial_state"):  # each input's gradient in its own dtype
            assert grad.dtype == (dt if name == "projection" else getattr(torch, params_dtype)), name
        rtol = angle_rtol if name in ("projection", "dt_bias", "initial_state.angle") else None
        assert_close(grad, want_grads[name], dt, rtol=rtol, name=f"grad {name}")


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("packed, initial, activation, interleaved", [
    (False, False, "heavy_tail", True), (True, True, "softplus", False)])
def test_pytorch_backends_match_the_definition(backend, packed, initial, activation, interleaved):
    check(backend, packed=packed, initial=initial, activation=activation, interleaved=interleaved)


def test_float64_and_the_rank_one_bias_shapes():
    check("chunked", "float64", params_dtype="float64", initial=True, bias_2d=True, g=1)


def test_second_order_gradients_of_the_composition():
    """The PyTorch composition is plain autograd: its second-order gradient is the sequential reference's."""
    got, want = check_first_order_only("chunked"), check_first_order_only("reference")
    assert got.abs().sum() > got.numel()  # more than the penalty's linear term (ones)
    assert_close(got, want, F64, name="second-order grad")


def test_bad_arguments_are_refused_clearly():
    proj, params, _, layout = make()
    args = split(proj, layout)
    kw = dict(params, A_floor=0.1, decay_activation="heavy_tail")
    with pytest.raises(ValueError, match="angles"):
        mamba3_scan_from_projection(**(args | {"angles": torch.randn(2, 21, 5)}), **kw)
    with pytest.raises(ValueError, match="dt_bias"):
        mamba3_scan_from_projection(**args, **(kw | {"dt_bias": torch.zeros(3)}))
    with pytest.raises(ValueError, match="B_norm_eps"):
        mamba3_scan_from_projection(**args, **kw, B_norm_eps=0.0)
    with pytest.raises(ValueError, match="decay_activation"):
        mamba3_scan_from_projection(**args, **(kw | {"decay_activation": "exp"}))
    with pytest.raises(ValueError, match="divisible by groups"):
        mamba3_scan_from_projection(**(args | {"B": args["B"][:, :, :1].expand(-1, -1, 3, -1),
                                               "C": args["C"][:, :, :1].expand(-1, -1, 3, -1)}), **kw)
    with pytest.raises(TypeError, match="initial_state"):
        mamba3_scan_from_projection(**args, **kw, initial_state=torch.zeros(2))
    with pytest.raises(TypeError, match="B_bias must be a torch.Tensor"):
        mamba3_scan_from_projection(**args, **(kw | {"B_bias": [1.0]}))
    for bad in (float("nan"), float("inf"), -0.5):  # an infinite floor would make every decay -inf: NaN outputs
        with pytest.raises(ValueError, match="A_floor"):
            mamba3_scan_from_projection(**args, **(kw | {"A_floor": bad}))


# name -> keyword arguments of ``check`` on the triton backend: odd length over several chunks of 16, groups,
# documents, an initial state, both activations and pair layouts, bf16 inputs (and bf16 parameters), both ways of
# the rotation backward (split: the norm's own kernel; unsplit: its epilogue).
CASES = {
    "fused_fp32": {},
    "fused_packed_initial_bf16": {"dtype": "bfloat16", "packed": True, "initial": True},
    "fused_unsplit_softplus_halves_fp32": {"unsplit": True, "activation": "softplus", "interleaved": False,
                                           "initial": True},
    "fused_unsplit_packed_bf16_params": {"unsplit": True, "dtype": "bfloat16", "params_dtype": "bfloat16",
                                         "packed": True, "bias_2d": True, "g": 1},
    # n = 12 (its 6 pairs padded to 8 in the kernels' tiles) all rotating (rope fraction 1), in halves.
    "fused_n12_all_pairs_halves_fp32": {"shape": (2, 19, 4, 3, 12, 6), "interleaved": False, "initial": True},
    # No rotary pair (a = 0): the angle kernels launch nothing.
    "fused_no_angles_packed_fp32": {"shape": (2, 13, 4, 3, 8, 0), "packed": True, "initial": True},
    # One position, batch 1; four groups of two heads (split, then one program each) without D, z or biases.
    "fused_b1_l1_initial_fp32": {"shape": (1, 1, 4, 3, 8, 2), "initial": True},
    "fused_g4_no_optionals_fp32": {"shape": (1, 23, 8, 2, 8, 2), "g": 4, "packed": True,
                                   "without": ("D", "z", "B_bias", "C_bias")},
    "fused_g4_unsplit_no_bias_fp16": {"shape": (1, 23, 8, 2, 8, 2), "g": 4, "unsplit": True, "dtype": "float16",
                                      "params_dtype": "float16", "without": ("B_bias",), "initial": True},
}


def check_raw_scalars(packed: bool, with_init: bool, a: int, activation: str) -> None:
    """The raw route scalars alone against Δ, A from PyTorch, then the step weights and angles in float64."""
    from ssmkit.ops.mamba3.chunked import next_share, rotary_angles
    from ssmkit.ops.mamba3.triton_route_scalars import route_scalars_raw_triton

    b, l, h = 2, 150, 3  # two blocks of the angle walk
    proj = torch.randn(b, l, 3 * h + a + 2) * 2
    proj[..., 1 + h: 1 + 2 * h] *= 3  # dd_A: the decay rate on both sides of A_floor
    bias, init = torch.rand(h) - 1.5, torch.rand(b, h, a) * 6.2
    seq_idx = packed_ids(b, l) if packed else None

    def scalars(proj, bias, init, fn):
        dd_dt, dd_A, trap, angles = proj[..., 1: 1 + 3 * h + a].split((h, h, h, a), -1)
        return fn(dd_dt, dd_A, bias, trap, angles, init if with_init else None)

    def reference(dd_dt, dd_A, bias, trap, angles, init):
        dt, A = F.softplus(dd_dt + bias), decay_rate(dd_A, 0.1, activation)
        lam = torch.sigmoid(trap)
        nxt = next_share((1 - lam) * dt, seq_idx)
        theta = rotary_angles(dt[..., None] * math.pi * torch.tanh(angles[:, :, None]), seq_idx, init)
        return -(dt * A), lam * dt + nxt, nxt, theta

    def fused(dd_dt, dd_A, bias, trap, angles, init):
        return route_scalars_raw_triton(dd_dt, dd_A, bias, 0.1, activation == "heavy_tail", trap, angles, seq_idx,
                                        init)

    leaves = [t.clone().requires_grad_() for t in (proj, bias, init)]
    want_leaves = [t.double().requires_grad_() for t in (proj, bias, init)]
    got, want = scalars(*leaves, fused), scalars(*want_leaves, reference)
    cots = [torch.randn(w.shape, dtype=F64) for w in want]
    for name, t, w in zip(("sdt", "w", "nxt"), got, want):
        assert_close(t, w, torch.float32, name=name)
    wrapped = torch.remainder(got[3].double() - want[3] + math.pi, 2 * math.pi) - math.pi
    assert wrapped.abs().max() < 2e-5, f"theta off by {wrapped.abs().max():.1e}"
    sum((t.double() * c).sum() for t, c in zip(got, cots)).backward()
    sum((t * c).sum() for t, c in zip(want, cots)).backward()
    for name, t, w in zip(("projection", "dt_bias", "init"), leaves, want_leaves):
        if name != "init" or with_init:
            assert_close(t.grad, w.grad, torch.float32, name=f"grad {name}")


def check_first_order_only(backend: str) -> torch.Tensor | None:
    """A gradient penalty through the route: fails clearly where its backward is first-order only (every Triton
    node of the fused route: one that returned constants would cut the chain and drop the terms silently); else
    its gradient of the projection (float64)."""
    torch.manual_seed(0)
    proj, params, _, layout = make(b=1, l=9, h=2, p=2, g=1, n=4, a=1)
    float64 = backend != "triton"
    proj = (proj.double() if float64 else proj).requires_grad_()
    params = {k: v.double() if float64 else v for k, v in params.items()}
    kw = dict(params, A_floor=0.1, decay_activation="heavy_tail", chunk_size=16, backend=backend)
    out = mamba3_scan_from_projection(**split(proj, layout), **kw)
    dproj, = torch.autograd.grad(out.pow(2).sum(), [proj], create_graph=True)
    penalty = dproj.pow(2).sum() + proj.sum()
    if not float64:
        with pytest.raises(RuntimeError, match="differentiate twice"):
            penalty.backward()
        return None
    penalty.backward()
    return proj.grad


RAW_CASES = {"raw_scalars_packed_init": (True, True, 2, "heavy_tail"),
             "raw_scalars_many_angles_softplus": (False, False, 20, "softplus")}


def test_fused_route_matches_the_definition_in_interpreter():
    run_checks_in_interpreter(__file__, "all")


if __name__ == "__main__":
    report_checks({name: (lambda kw: check("triton", **kw), (kw,)) for name, kw in CASES.items()}
                  | {name: (check_raw_scalars, case) for name, case in RAW_CASES.items()}
                  | {"fused_first_order_only": (check_first_order_only, ("triton",))})
