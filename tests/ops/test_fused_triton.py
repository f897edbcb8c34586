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


CHECKS = {"split_conv1d_scan": (check_split_conv1d_scan, ()), "mamba_inner": (check_mamba_inner, ())}


def test_fused_functions_on_triton_kernels_in_interpreter():
    pytest.importorskip("triton")
    run_checks_in_interpreter(__file__, "all")


if __name__ == "__main__":
    assert sys.argv[1] == "all"
    report_checks(CHECKS)
