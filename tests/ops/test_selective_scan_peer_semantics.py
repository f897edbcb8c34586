"""The Triton selective scan's default launches against mamba_ssm's own test semantics (tests/ops/test_selective_scan.py):
their options (variable or time-invariant B and C, groups, D, z, delta_bias, softplus, the last state, a scan in
pieces continued from the last state) and their tolerances, every gradient, in Triton's CPU interpreter.

Their tolerances are tighter than ``ssmkit.testing``'s for the weights' gradients (dA, dD, d(delta_bias) and a
time-invariant B or C: rtol 1e-3 where a bf16 case otherwise gets 1.6e-2), which is what these cases add beside
``test_selective_scan_triton.py``: they run the launch that ``selective_scan_fn`` picks by itself (time-wise kernels
for time-contiguous u and delta, the fused-state training launch for time-major ones) and check it was that one.
The interpreter has to be switched on before triton is imported, so the cases run in a subprocess (this file).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

from ssmkit.testing import report_checks, run_checks_in_interpreter

# name -> (input dtype, layout, B/C form, options, launch picked). Layout "contiguous": (b, d, l) tensors as
# mamba_ssm's test builds them; "time_major": transposed (b, l, d) memory, as transformers' Mamba mixer passes
# them. B/C form: "variable" (b, n, l), "groups2" (b, 2, n, l), "invariant_B" a (d, n) B (as g = d groups read
# with zero strides along batch and time). Options: "D", "z", "bias", "softplus", "pieces" (three calls, each
# continuing from the previous call's last state, as their scan_chunks).
CASES = {
    "bf16_time_major_no_gate": ("bfloat16", "time_major", "variable", {"D", "bias", "softplus"}, "fused_states"),
    "bf16_contiguous_groups_all_options": ("bfloat16", "contiguous", "groups2", {"D", "z", "bias", "softplus"},
                                           "timewise"),
    "fp32_contiguous_invariant_B_no_gate": ("float32", "contiguous", "invariant_B", {"D", "bias", "softplus"},
                                            "timewise"),
    "fp16_contiguous_in_pieces": ("float16", "contiguous", "variable", {"D", "z", "bias", "softplus", "pieces"},
                                  "timewise"),
}
BATCH, DIM, DSTATE, LENGTH = 2, 4, 8, 37


def _tolerances(dtype: torch.dtype, has_z: bool) -> tuple[float, float, float, float]:
    """mamba_ssm's (rtol, atol) for outputs and (rtolw, atolw) for the weights' gradients."""
    rtol, atol = (6e-4, 2e-3) if dtype == torch.float32 else (3e-3, 5e-3)
    if dtype == torch.bfloat16:
        rtol, atol = 3e-2, 5e-2
    rtolw, atolw = 1e-3, 1e-3
    if has_z:
        rtolw, atolw = max(rtolw, rtol), max(atolw, atol)
    return rtol, atol, rtolw, atolw


def check_case(dtype_name: str, layout: str, bc: str, options: set[str], launch: str) -> None:
    from ssmkit.ops.selective_scan import selective_scan_fn
    from ssmkit.ops.selective_scan import triton as scan_triton

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    b, d, n, l = BATCH, DIM, DSTATE, LENGTH

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    groups = 2 if bc == "groups2" else 1
    leaves = {
        "u": randn(b, d, l).to(dtype),
        "delta": (0.5 * torch.rand(b, d, l, generator=gen)).to(dtype),
        "A": -0.5 * torch.rand(d, n, generator=gen),
        "B": randn(d, n) if bc == "invariant_B" else randn(b, groups, n, l).to(dtype),
        "C": randn(b, groups, n, l).to(dtype),
    }
    if "D" in options:
        leaves["D"] = randn(d)
    if "z" in options:
        leaves["z"] = randn(b, d, l).to(dtype)
    if "bias" in options:
        leaves["delta_bias"] = 0.5 * torch.rand(d, generator=gen)
    leaves = {k: v.requires_grad_() for k, v in leaves.items()}
    ref = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}

    def as_called(args: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = dict(args)
        if bc == "invariant_B":
            # (d, n) as d groups of one channel, read with zero strides along batch and time.
            args["B"] = args["B"][None, :, :, None].expand(b, d, n, l)
            args["C"] = args["C"].repeat_interleave(d, dim=1)
        if layout == "time_major" and args["u"].dtype != torch.float64:
            for k in ("u", "delta", "z", "B", "C"):
                if k in args:
                    args[k] = args[k].movedim(-1, 1).contiguous().movedim(1, -1)
        return args

    picked = []
    default_config = scan_triton.default_config

    def spy(u, delta, needs_grad):
        cfg = default_config(u, delta, needs_grad)
        picked.append("timewise" if cfg.timewise else "fused_states" if cfg.fused_states else "state_loop")
        return cfg

    softplus = "softplus" in options
    pieces = 3 if "pieces" in options else 1
    bounds = [l * k // pieces for k in range(pieces + 1)]

    def run(args: dict[str, torch.Tensor], backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        args = as_called(args)
        outs, state = [], None
        for start, end in itertools.pairwise(bounds):
            part = {k: (v[..., start:end] if k in ("u", "delta", "z", "B", "C") else v) for k, v in args.items()}
            out, state = selective_scan_fn(**part, delta_softplus=softplus, return_last_state=True,
                                           initial_state=state, backend=backend)
            outs.append(out)
        return torch.cat(outs, dim=-1), state

    scan_triton.default_config = spy
    try:
        out, last = run(leaves, "triton")
    finally:
        scan_triton.default_config = default_config
    assert picked == [launch] * pieces, picked
    want_out, want_last = run(ref, "reference")
    rtol, atol, rtolw, atolw = _tolerances(dtype, "z" in options)

    def check(name: str, got: torch.Tensor, want: torch.Tensor, rt: float, at: float) -> None:
        ok = torch.allclose(got.double(), want.double(), rtol=rt, atol=at)
        assert ok, f"{name}: max |error| {(got.double() - want.double()).abs().max().item():.3g} (rtol {rt}, atol {at})"

    check("out", out, want_out.to(dtype), rtol, atol)
    check("last", last, want_last, rtol, atol)
    # Their cotangent: in the output's dtype, the same for both.
    g = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(g)
    want_out.backward(g.double())
    weight_tol = {"A": (rtolw, 5 * atolw), "D": (rtolw, atolw), "delta_bias": (rtolw, atolw), "z": (rtolw, atolw),
                  "u": (2 * rtol, 2 * atol), "delta": (5 * rtol, 10 * atol)}
    for name, t in leaves.items():
        time_invariant = name in ("B", "C") and t.dim() == 2
        rt, at = weight_tol.get(name, (rtolw, atolw) if time_invariant else (rtol, atol))
        assert t.grad.dtype == t.dtype, name
        check(name, t.grad, ref[name].grad, rt, at)


@pytest.mark.slow  # 30-60 s: four scans with every gradient in the interpreter
def test_default_launches_meet_mamba_ssm_test_tolerances_in_interpreter():
    run_checks_in_interpreter(__file__, "all")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    report_checks({name: (check_case, case) for name, case in CASES.items()})
