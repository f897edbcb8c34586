"""Triton SSD kernels in Triton's CPU interpreter against the float64 reference.

The interpreter has to be switched on (TRITON_INTERPRET=1) before triton is imported, so each test
runs a group of tiny cases in a subprocess (this file run as a script) and fails with the message of
every case that failed. The full grid on a GPU is tests/gpu/test_ssd.py.
"""

from __future__ import annotations

import sys

import pytest
import torch

from ssmkit.ops.ssd import SSDLaunch, mamba_chunk_scan_combined
from ssmkit.testing import assert_close, report_checks, run_checks_in_interpreter

# name -> (b, l, h, p, g, n, chunk_size, tile, dtype, options); tile is the kernels' row block (16 with
# chunk 32 gives two row blocks per chunk, so the causal loop over blocks is exercised). Tiny grids make
# the backward split each group's heads over programs; "one_slice" turns that off. Every case's backward
# recomputes Δ, cum, the chunk states and C Bᵀ (SSDLaunch.recompute_states) but those with "keep"
# (test_ssd_triton_recompute.py runs a grid with it off and checks both give the same bits).
CASES = {
    "full_gated": (2, 37, 4, 3, 2, 5, 16, 64, "float32", "D_h z bias init softplus limit"),
    "full_gated_cols_split": (2, 37, 4, 3, 2, 5, 16, 16, "float32", "D_h z bias init softplus docs cols_split"),
    "docs_two_tiles": (2, 40, 2, 4, 1, 8, 32, 16, "float32", "D_hp z init softplus docs one_slice"),
    # The backward's tile smaller than the forward's (it reads the forward's C Bᵀ tiles in quarters).
    "mixed_tiles": (1, 70, 2, 4, 1, 8, 64, 32, "float32", "D_h z bias softplus docs bwd_tile16"),
    # Every case runs the chained state passing (SSDLaunch.chain) but this one: kernels of its own.
    "unchained": (2, 40, 2, 4, 1, 8, 16, 16, "float32", "D_hp z init softplus docs no_chain"),
    "bare_one_step": (1, 1, 4, 8, 4, 3, 5, 64, "float32", ""),
    "varlen": (1, 39, 2, 2, 1, 4, 16, 16, "float32", "D_h init softplus varlen"),
    "bfloat16": (1, 33, 2, 8, 1, 8, 16, 64, "bfloat16", "D_h z bias softplus limit docs one_slice"),
    "float16_init": (1, 20, 2, 4, 2, 4, 16, 64, "float16", "D_hp bias init softplus"),
    # Entering states stored in bf16 feed the varlen states.
    "varlen_bf16": (1, 39, 2, 2, 1, 4, 16, 16, "bfloat16", "D_h init softplus varlen one_slice"),
    "varlen_bf16_unchained": (1, 39, 2, 2, 1, 4, 16, 16, "bfloat16", "D_h init softplus varlen no_chain"),
    # input_scale apart from Δ (Mamba-3's route): the kernels' Δ buffer holds it, dt only decays.
    "input_scale": (2, 37, 4, 3, 2, 5, 16, 16, "float32", "D_h z bias init softplus limit docs scale"),
    "input_scale_varlen": (1, 39, 2, 2, 1, 4, 16, 16, "float32", "D_h init softplus varlen scale"),
    "input_scale_bf16": (1, 33, 2, 8, 1, 8, 16, 64, "bfloat16", "D_h z softplus docs scale one_slice"),
    # C Bᵀ and its summed gradient stored in bf16 (one slice: dcb_lowp applies), the head loops pipelined.
    "lowp_cb_pipelined": (2, 37, 4, 8, 2, 8, 32, 16, "bfloat16", "D_h z bias init softplus docs one_slice lowp heads2"),
    # Several slices: the summed gradient of C Bᵀ stays in float32 partial sums whatever dcb_lowp says.
    "lowp_cb_slices": (1, 40, 4, 4, 1, 8, 16, 16, "float16", "D_hp z init softplus docs lowp cols_split heads2"),
    # float32 inputs: the flags leave C Bᵀ in float32; head loops pipelined, state backward's own tile.
    "pipelined_float32": (2, 37, 4, 3, 2, 5, 32, 16, "float32", "D_h z bias init softplus limit docs lowp heads2"),
    # The forward scan two heads a program (two groups of two heads; chunk 32 in 16-row tiles).
    "scan_two_heads": (2, 37, 4, 3, 2, 5, 32, 16, "float32", "D_hp z bias init softplus docs scan2"),
    "scan_two_heads_bf16": (1, 33, 4, 8, 1, 8, 16, 64, "bfloat16", "D_h z softplus docs scan2 lowp one_slice"),
    # Three heads a group: odd, so the scan keeps one head a program.
    "scan_two_heads_odd": (1, 20, 3, 4, 1, 4, 16, 16, "float32", "D_h z init softplus scan2"),
    # The chunk states in one pass (two 16-row blocks a chunk: the rescaling is exercised), chained or not.
    "online_states": (2, 37, 4, 3, 2, 5, 32, 16, "float32", "D_h z bias init softplus limit docs online"),
    "online_states_unchained": (2, 40, 2, 4, 1, 8, 32, 16, "float32", "D_hp z init softplus docs no_chain online"),
    "online_states_scale_bf16": (1, 45, 2, 8, 1, 8, 32, 16, "bfloat16", "D_h z softplus docs scale one_slice online"),
}


def make_case(b, l, h, p, g, n, chunk_size, dtype, options):
    """Inputs (all requiring grad) and keyword arguments of one case."""
    opts = options.split()
    inp = {
        "x": torch.randn(b, l, h, p),
        "dt": torch.randn(b, l, h) - 1.0,
        "A": -torch.rand(h) * 2 - 0.1,
        "B": torch.randn(b, l, g, n),
        "C": torch.randn(b, l, g, n),
    }
    if "D_h" in opts:
        inp["D"] = torch.randn(h)
    if "D_hp" in opts:
        inp["D"] = torch.randn(h, p)
    if "z" in opts:
        inp["z"] = torch.randn(b, l, h, p)
    if "bias" in opts:
        inp["dt_bias"] = torch.randn(h) * 0.5
    if "init" in opts:
        inp["initial_states"] = torch.randn(b, h, p, n)
    if "scale" in opts:
        inp["input_scale"] = torch.randn(b, l, h)
    if "softplus" not in opts:  # Δ = dt itself must be positive for a stable SSM
        inp["dt"] = torch.rand(b, l, h) * 0.5
    inp = {k: v.to(getattr(torch, dtype)).requires_grad_() for k, v in inp.items()}
    kw = {"chunk_size": chunk_size, "dt_softplus": "softplus" in opts, "return_final_states": True}
    if "limit" in opts:
        kw["dt_limit"] = (0.05, 2.0)
    if "docs" in opts:
        # Runs of ids, not values, separate documents (0, 1, 0): changes at a chunk edge and inside chunks.
        pos = torch.arange(l)
        kw["seq_idx"] = ((pos >= 16).int() - (pos >= 25).int() + 2 * (pos >= 29).int()).expand(b, l).contiguous()
    if "varlen" in opts:
        kw["cu_seqlens"] = torch.tensor([0, 5, 16, 17, 30, l])
        kw["return_varlen_states"] = True
    return inp, kw


def case_launch(tile: int, options: str) -> SSDLaunch:
    """The launch settings a case's options ask for (tile: the kernels' row block)."""
    opts = options.split()
    heads = 2 if "heads2" in opts else 0
    return SSDLaunch(state_tile=tile, fwd_tile=tile, bwd_tile=16 if "bwd_tile16" in opts else tile,
                     min_programs=1 if "one_slice" in opts else 1024, cols_split="cols_split" in opts,
                     chain="no_chain" not in opts, cb_lowp="lowp" in opts, dcb_lowp="lowp" in opts,
                     rows_head_stages=heads, rows_state_head_stages=heads, cols_head_stages=heads,
                     state_bwd_tile=32 if heads else tile, scan_heads=2 if "scan2" in opts else 1,
                     state_online="online" in opts, recompute_states="keep" not in opts)


def check_case(b, l, h, p, g, n, chunk_size, tile, dtype, options) -> None:
    """Output, final (and varlen) states and every gradient of backend='triton' against float64."""
    launch = case_launch(tile, options)
    inp, kw = make_case(b, l, h, p, g, n, chunk_size, dtype, options)
    inp64 = {k: v.detach().double().requires_grad_() for k, v in inp.items()}
    got = mamba_chunk_scan_combined(**inp, **kw, backend="triton", launch=launch)
    want = mamba_chunk_scan_combined(**inp64, **kw, backend="reference")
    tol_dtype = getattr(torch, dtype)
    assert got[0].dtype == tol_dtype and got[1].dtype == torch.float32
    names = ["out", "final_states", "varlen_states"]
    for name, a, e in zip(names, got, want):
        assert_close(a, e, tol_dtype, name=name)
    weights = [torch.randn_like(e) for e in want]
    loss = sum((a.double() * w).sum() for a, w in zip(got, weights))
    loss64 = sum((e * w).sum() for e, w in zip(want, weights))
    grads = torch.autograd.grad(loss, list(inp.values()))
    grads64 = torch.autograd.grad(loss64, list(inp64.values()))
    for name, a, e in zip(inp, grads, grads64):
        assert a.dtype == inp[name].dtype
        assert_close(a, e, tol_dtype, name=f"d{name}")


def check_nan_stays_in_its_chunks() -> None:
    """A NaN in x (head 1, position 3, channel 2) poisons that channel to the end of its document only."""
    inp, _ = make_case(1, 40, 2, 4, 1, 4, 16, "float32", "D_h z softplus")
    x = inp["x"].detach().clone()
    x[0, 3, 1, 2] = float("nan")
    seq_idx = (torch.arange(40) >= 20).int()[None]
    out = mamba_chunk_scan_combined(x, *(inp[k].detach() for k in ["dt", "A", "B", "C"]), 16, D=inp["D"].detach(),
                                    z=inp["z"].detach(), seq_idx=seq_idx, dt_softplus=True, backend="triton")
    assert torch.isnan(out[0, 3:20, 1, 2]).all()
    assert torch.isfinite(out[0, 20:]).all() and torch.isfinite(out[0, :, 0]).all()


def check_cb_lowp_rounds_cb() -> None:
    """cb_lowp stores C Bᵀ in bf16: the output moves (one more rounding), by less than bf16's tolerance."""
    inp, kw = make_case(1, 33, 2, 8, 1, 8, 16, "bfloat16", "D_h softplus")
    args = {k: v.detach() for k, v in inp.items()}
    kw["return_final_states"] = False
    base = mamba_chunk_scan_combined(**args, **kw, backend="triton", launch=SSDLaunch(fwd_tile=16, bwd_tile=16))
    low = mamba_chunk_scan_combined(**args, **kw, backend="triton",
                                    launch=SSDLaunch(fwd_tile=16, bwd_tile=16, cb_lowp=True))
    assert not torch.equal(base, low), "cb_lowp changed nothing: C Bᵀ was not stored in bf16"
    assert_close(low.float(), base.float(), torch.bfloat16, name="out")


def check_float64_uses_chunked() -> None:
    inp, kw = make_case(1, 9, 2, 2, 1, 2, 4, "float64", "D_h z")
    got = mamba_chunk_scan_combined(**inp, **kw, backend="triton")
    want = mamba_chunk_scan_combined(**inp, **kw, backend="chunked")
    assert all(torch.equal(a, e) for a, e in zip(got, want))


@pytest.mark.parametrize("group", ["float32", "low_precision"])
def test_triton_matches_reference_in_interpreter(group):
    run_checks_in_interpreter(__file__, group)


def _main(group: str) -> None:
    low = group == "low_precision"
    checks = {name: (check_case, case) for name, case in CASES.items() if (case[8] == "float32") != low}
    if low:
        checks["cb_lowp_rounds_cb"] = (check_cb_lowp_rounds_cb, ())
    if not low:
        checks["nan_stays_in_its_chunks"] = (check_nan_stays_in_its_chunks, ())
        checks["float64_uses_chunked"] = (check_float64_uses_chunked, ())
    report_checks(checks)


if __name__ == "__main__":
    _main(sys.argv[1])
