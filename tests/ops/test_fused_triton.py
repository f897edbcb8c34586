"""The fused layer functions with every step on its Triton kernel, in Triton's CPU interpreter, against
the float64 reference composition (outputs and every gradient). Tiny sizes: the interpreter runs every
program in Python. The CUDA-sized checks are tests/gpu/test_compat_ops.py."""

from __future__ import annotations

import sys

import pytest
import torch

from ssmkit.testing import (
    assert_outputs_and_grads_close,
    float64_leaf,
    report_checks,
    run_checks_in_interpreter,
    saved_activation_bytes,
)


def check_split_conv1d_scan() -> None:
    from ssmkit.ops.fused import mamba_split_conv1d_scan_combined

    b, l, h, p, g, n, w, chunk = 1, 20, 2, 4, 1, 8, 4, 16
    dim = h * p
    conv_dim = dim + 2 * g * n
    named = {
        "zxbcdt": torch.randn(b, l, 2 * 3 + dim + conv_dim + h),
        "conv1d_weight": torch.randn(conv_dim, w) * 0.5,
        "conv1d_bias": torch.randn(conv_dim) * 0.1,
        "dt_bias": torch.randn(h) - 1,
        "A": -torch.rand(h) - 0.2,
        "D": torch.randn(h),
        "rmsnorm_weight": 1 + 0.1 * torch.randn(dim),
        "outproj_weight": torch.randn(5, dim + 3) * 0.3,
    }
    named = {k: t.requires_grad_() for k, t in named.items()}
    named64 = {k: float64_leaf(t) for k, t in named.items()}
    seq_idx = torch.tensor([[0] * 9 + [1] * 11], dtype=torch.int32)

    def run(t, backend):
        return mamba_split_conv1d_scan_combined(
            t["zxbcdt"], t["conv1d_weight"], t["conv1d_bias"], t["dt_bias"], t["A"], t["D"], chunk, seq_idx=seq_idx,
            rmsnorm_weight=t["rmsnorm_weight"], outproj_weight=t["outproj_weight"], headdim=p, ngroups=g,
            norm_before_gate=False, backend=backend)

    assert_outputs_and_grads_close([run(named, "triton")], [run(named64, "reference")], named, named64, torch.float32)


def check_mamba_inner() -> None:
    from ssmkit.ops.fused import mamba_inner_fn

    b, d, l, n, r, w = 1, 8, 11, 4, 2, 4
    named = {
        "xz": torch.randn(b, 2 * d, l),
        "conv1d_weight": torch.randn(d, 1, w) * 0.5,
        "conv1d_bias": torch.randn(d) * 0.1,
        "x_proj_weight": torch.randn(r + 2 * n, d) * 0.4,
        "delta_proj_weight": torch.randn(d, r) * 0.4,
        "out_proj_weight": torch.randn(3, d) * 0.4,
        "A": -torch.rand(d, n) - 0.2,
        "D": torch.randn(d),
        "delta_bias": torch.randn(d) - 1,
    }
    named = {k: t.requires_grad_() for k, t in named.items()}
    named64 = {k: float64_leaf(t) for k, t in named.items()}

    def run(t, backend):
        return mamba_inner_fn(t["xz"], t["conv1d_weight"], t["conv1d_bias"], t["x_proj_weight"],
                              t["delta_proj_weight"], t["out_proj_weight"], None, t["A"], D=t["D"],
                              delta_bias=t["delta_bias"], backend=backend)

    assert_outputs_and_grads_close([run(named, "triton")], [run(named64, "reference")], named, named64, torch.float32)


def check_split_gate_in_scan_groups_init() -> None:
    """No norm (the gate inside the scan, z among the recomputed pieces), two groups, initial states, dt limits,
    D per channel, the final states returned and differentiated."""
    from ssmkit.ops.fused import mamba_split_conv1d_scan_combined

    b, l, h, p, g, n, w, chunk = 2, 13, 4, 4, 2, 8, 3, 8
    dim = h * p
    conv_dim = dim + 2 * g * n
    named = {
        "zxbcdt": torch.randn(b, l, dim + conv_dim + h),
        "conv1d_weight": torch.randn(conv_dim, w) * 0.5,
        "conv1d_bias": torch.randn(conv_dim) * 0.1,
        "dt_bias": torch.randn(h) - 1,
        "A": -torch.rand(h) - 0.2,
        "D": torch.randn(h, p),
        "initial_states": torch.randn(b, h, p, n) * 0.3,
        "outproj_weight": torch.randn(5, dim) * 0.3,
    }
    named = {k: t.requires_grad_() for k, t in named.items()}
    named64 = {k: float64_leaf(t) for k, t in named.items()}
    seq_idx = torch.tensor([[0] * 5 + [1] * 8, [0] * 13], dtype=torch.int32)

    def run(t, backend):
        return mamba_split_conv1d_scan_combined(
            t["zxbcdt"], t["conv1d_weight"], t["conv1d_bias"], t["dt_bias"], t["A"], t["D"], chunk,
            initial_states=t["initial_states"], seq_idx=seq_idx, dt_limit=(0.05, 0.6), return_final_states=True,
            outproj_weight=t["outproj_weight"], ngroups=g, backend=backend)

    assert_outputs_and_grads_close(list(run(named, "triton")), list(run(named64, "reference")), named, named64,
                                   torch.float32)


def check_mamba_inner_docs_norms() -> None:
    """Packed documents and the Jamba-order norms (dt before delta_proj, B, C) with projection biases; and
    the recomputed intermediates are not kept: less than half what the plain composition keeps."""
    from ssmkit.ops.fused import mamba_inner_fn

    b, d, l, n, r, w = 2, 8, 12, 4, 3, 4
    named = {
        "xz": torch.randn(b, 2 * d, l),
        "conv1d_weight": torch.randn(d, w) * 0.5,
        "conv1d_bias": torch.randn(d) * 0.1,
        "x_proj_weight": torch.randn(r + 2 * n, d) * 0.4,
        "delta_proj_weight": torch.randn(d, r) * 0.4,
        "out_proj_weight": torch.randn(3, d) * 0.4,
        "out_proj_bias": torch.randn(3) * 0.1,
        "A": -torch.rand(d, n) - 0.2,
        "D": torch.randn(d),
        "delta_bias": torch.randn(d) - 1,
        "B_proj_bias": torch.randn(n) * 0.1,
        "dt_rank_rms_weight": 1 + 0.2 * torch.randn(r),
        "b_rms_weight": 1 + 0.2 * torch.randn(n),
        "c_rms_weight": 1 + 0.2 * torch.randn(n),
    }
    named = {k: t.requires_grad_() for k, t in named.items()}
    named64 = {k: float64_leaf(t) for k, t in named.items()}
    seq_idx = torch.tensor([[0] * 4 + [1] * 8, [0] * 11 + [1]], dtype=torch.int32)

    def run(t, backend, checkpoint_lvl=1):
        return mamba_inner_fn(
            t["xz"], t["conv1d_weight"], t["conv1d_bias"], t["x_proj_weight"], t["delta_proj_weight"],
            t["out_proj_weight"], t["out_proj_bias"], t["A"], D=t["D"], delta_bias=t["delta_bias"],
            B_proj_bias=t["B_proj_bias"], b_rms_weight=t["b_rms_weight"], c_rms_weight=t["c_rms_weight"],
            b_c_dt_rms_eps=1e-5, checkpoint_lvl=checkpoint_lvl, seq_idx=seq_idx,
            dt_rank_rms_weight=t["dt_rank_rms_weight"], backend=backend)

    assert_outputs_and_grads_close([run(named, "triton")], [run(named64, "reference")], named, named64, torch.float32)
    fused = saved_activation_bytes(lambda: run(named, "triton"), exclude=named.values())
    plain = saved_activation_bytes(lambda: run(named, "triton", 0), exclude=named.values())
    assert fused < 0.5 * plain, (fused, plain)


CHECKS = {"split_conv1d_scan": (check_split_conv1d_scan, ()), "mamba_inner": (check_mamba_inner, ()),
          "split_gate_in_scan_groups_init": (check_split_gate_in_scan_groups_init, ()),
          "mamba_inner_docs_norms": (check_mamba_inner_docs_norms, ())}


def test_fused_functions_on_triton_kernels_in_interpreter():
    pytest.importorskip("triton")
    run_checks_in_interpreter(__file__, "all")


if __name__ == "__main__":
    assert sys.argv[1] == "all"
    report_checks(CHECKS)
