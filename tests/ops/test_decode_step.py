"""The fused decode steps (``conv1d_selective_state_update``, ``mamba_inner_step``): their Triton kernels in
Triton's CPU interpreter against the float64 composition of the separate ops' references, several steps in
a row (y, the SSM state and the conv state after each); argument checks; the CPU dispatch."""

from __future__ import annotations

import sys

import pytest
import torch

from ssmkit.ops import decode_step
from ssmkit.ops.decode_step import conv1d_selective_state_update, mamba_inner_step
from ssmkit.testing import assert_close, report_checks, run_checks_in_interpreter


def _mamba2_args(b, h, p, n, g, w, S, *, dtype=torch.float32, D2=False, z=True, conv_bias=True, bias=True):
    conv_dim = h * p + 2 * g * n
    return {
        "xBC": torch.randn(b, conv_dim + 7, dtype=dtype)[:, 3 : 3 + conv_dim],  # a strided slice, as in a layer
        "conv_state": torch.randn(b, conv_dim, S, dtype=dtype),
        "conv_weight": torch.randn(conv_dim, w, dtype=dtype) * 0.5,
        "conv_bias": torch.randn(conv_dim, dtype=dtype) * 0.2 if conv_bias else None,
        "state": torch.randn(b, h, p, n),
        "dt": torch.randn(b, h, dtype=dtype) - 1,
        "A": -torch.rand(h) - 0.1,
        "D": (torch.randn(h, p) if D2 else torch.randn(h)),
        "z": torch.randn(b, h, p, dtype=dtype) if z else None,
        "dt_bias": torch.randn(h) * 0.3 if bias else None,
    }


def _mamba1_args(b, d, n, r, w, S, *, dtype=torch.float32, norms=False, conv_bias=True, D=True):
    return {
        "xz": torch.randn(b, 2 * d, dtype=dtype),
        "conv_state": torch.randn(b, d, S, dtype=dtype),
        "conv_weight": torch.randn(d, w, dtype=dtype) * 0.5,
        "conv_bias": torch.randn(d, dtype=dtype) * 0.2 if conv_bias else None,
        "x_proj_weight": torch.randn(r + 2 * n, d, dtype=dtype) / d**0.5,
        "dt_proj_weight": torch.randn(d, r, dtype=dtype) / r**0.5,
        "dt_proj_bias": torch.randn(d) - 2,
        "state": torch.randn(b, d, n),
        "A": -torch.rand(d, n) - 0.1,
        "D": torch.randn(d) if D else None,
        "dt_rms_weight": 1 + 0.2 * torch.randn(r) if norms else None,
        "b_rms_weight": 1 + 0.2 * torch.randn(n) if norms else None,
        "c_rms_weight": 1 + 0.2 * torch.randn(n) if norms else None,
    }


def _f64(args):
    return {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _steps(fn, args, kw, fresh, steps=3):
    """``steps`` tokens through ``fn`` with Triton and the float64 reference; fresh(args) replaces the token's
    inputs between steps; compares y and both states after each."""
    ref = _f64(args)
    tol = args["state"].dtype if args.get("xBC", args.get("xz")).dtype == torch.float32 else torch.bfloat16
    for step in range(steps):
        y = fn(**args, **kw, backend="triton")
        y_ref = fn(**ref, **kw, backend="reference")
        assert y.dtype == args.get("xBC", args.get("xz")).dtype
        assert_close(y, y_ref, tol, name=f"y, step {step}")
        assert_close(args["state"], ref["state"], tol, name=f"ssm state, step {step}")
        assert_close(args["conv_state"], ref["conv_state"], tol, name=f"conv state, step {step}")
        for k, v in fresh(args).items():
            args[k].copy_(v)
            ref[k].copy_(v)


def check_mamba2(b, h, p, n, g, w, S, dtype=torch.float32, dt_limit=(0.0, float("inf")), **opts):
    args = _mamba2_args(b, h, p, n, g, w, S, dtype=dtype, **opts)

    def fresh(a):
        return {"xBC": torch.randn_like(a["xBC"]), "dt": torch.randn_like(a["dt"]) - 1}

    _steps(conv1d_selective_state_update, args, {"ngroups": g, "dt_limit": dt_limit}, fresh)
    counters = getattr(args["conv_state"], "_ssmkit_step_counters", None)
    assert counters is None or int(counters.abs().sum()) == 0, "the group tickets were not reset"


def check_mamba1(b, d, n, r, w, S, dtype=torch.float32, **opts):
    args = _mamba1_args(b, d, n, r, w, S, dtype=dtype, **opts)
    _steps(mamba_inner_step, args, {"rms_eps": 1e-5}, lambda a: {"xz": torch.randn_like(a["xz"])})
    counters = args["conv_state"]._ssmkit_step_counters
    assert int(counters.abs().sum()) == 0, "the phase counters were not reset"


CHECKS = {
    # heads of a group share B/C: several programs a group, the last ticket writes their window
    "mamba2_groups_shared": (check_mamba2, (2, 4, 8, 8, 2, 4, 4)),
    "mamba2_one_head_per_group": (check_mamba2, (1, 2, 4, 8, 2, 4, 4)),
    "mamba2_p_blocks_D2_nobias": (check_mamba2, (1, 2, 80, 8, 1, 4, 3), torch.float32, (0.0, float("inf"))),
    "mamba2_limit_width2_bf16": (check_mamba2, (2, 2, 4, 6, 1, 2, 2, torch.bfloat16, (0.05, 0.5))),
    "mamba1_two_splits": (check_mamba1, (2, 300, 5, 3, 4, 4)),
    "mamba1_norms_state_w_minus_1": (check_mamba1, (1, 24, 4, 2, 3, 2)),
    "mamba1_bf16": (check_mamba1, (2, 16, 4, 2, 4, 4, torch.bfloat16)),
}
CHECKS["mamba2_p_blocks_D2_nobias"] = (lambda *a: check_mamba2(*a, D2=True, z=False, conv_bias=False, bias=False),
                                       (1, 2, 80, 8, 1, 4, 3))
CHECKS["mamba1_norms_state_w_minus_1"] = (lambda *a: check_mamba1(*a, norms=True, conv_bias=False, D=False),
                                          (1, 24, 4, 2, 3, 2))


def test_fused_decode_steps_on_triton_in_interpreter():
    pytest.importorskip("triton")
    run_checks_in_interpreter(__file__, "all")


def test_cpu_auto_is_the_separate_ops_and_matches_the_reference():
    torch.manual_seed(0)
    args = _mamba2_args(2, 4, 3, 5, 2, 4, 4)
    ref = _f64(args)
    y = conv1d_selective_state_update(**args, ngroups=2)
    assert_close(y, conv1d_selective_state_update(**ref, ngroups=2, backend="reference"), torch.float32, name="y")
    assert_close(args["conv_state"], ref["conv_state"], torch.float32, name="conv state")
    args = _mamba1_args(2, 6, 3, 2, 4, 4, norms=True)
    ref = _f64(args)
    y = mamba_inner_step(**args)
    assert_close(y, mamba_inner_step(**ref, backend="reference"), torch.float32, name="y")
    assert_close(args["state"], ref["state"], torch.float32, name="ssm state")


def test_argument_errors_are_clear():
    args = _mamba2_args(1, 4, 3, 5, 2, 4, 4)
    with pytest.raises(ValueError, match="ngroups"):
        conv1d_selective_state_update(**args, ngroups=3)
    with pytest.raises(ValueError, match="conv_state"):
        conv1d_selective_state_update(**(args | {"conv_state": torch.zeros(1, args["conv_state"].shape[1], 2)}),
                                      ngroups=2)
    with pytest.raises(ValueError, match="xBC"):
        conv1d_selective_state_update(**(args | {"xBC": torch.zeros(1, 5)}), ngroups=2)
    margs = _mamba1_args(1, 6, 3, 2, 4, 4)
    with pytest.raises(ValueError, match="x_proj_weight"):
        mamba_inner_step(**(margs | {"x_proj_weight": torch.zeros(7, 6)}))
    with pytest.raises(ValueError, match="MAX_ROWS"):
        saved = decode_step.MAX_ROWS
        try:
            decode_step.MAX_ROWS = 0
            mamba_inner_step(**margs, backend="triton")
        finally:
            decode_step.MAX_ROWS = saved


if __name__ == "__main__":
    assert sys.argv[1] == "all"
    report_checks(CHECKS)


def test_adopt_step_scratch_gives_the_real_state_its_own_zeroed_counters():
    """A graph's warm-up runs on a copy; the copy's lazily made counters are re-made for the real state
    before the capture (which would otherwise replay their zero fill every step)."""
    from ssmkit.generation.decode import _adopt_scratch
    from ssmkit.layers.mamba2 import Mamba2State
    from ssmkit.models.cache import ModelCache
    from ssmkit.ops.decode_step.inputs import COUNTERS_ATTR

    real = ModelCache([Mamba2State(torch.zeros(2, 6, 4), torch.zeros(2, 3, 2, 4)) for _ in range(2)])
    scratch = real.clone()
    setattr(scratch.states[0].conv, COUNTERS_ATTR, torch.full((4,), 7, dtype=torch.int32))
    _adopt_scratch(scratch, real)
    adopted = getattr(real.states[0].conv, COUNTERS_ATTR)
    assert adopted.shape == (4,) and adopted.dtype == torch.int32 and int(adopted.abs().sum()) == 0
    assert adopted.data_ptr() != getattr(scratch.states[0].conv, COUNTERS_ATTR).data_ptr()
    assert getattr(real.states[1].conv, COUNTERS_ATTR, None) is None  # its copy made none: nothing to adopt
    assert getattr(real.states[0].ssm, COUNTERS_ATTR, None) is None
    own = torch.zeros(2, dtype=torch.int32)
    setattr(real.states[1].conv, COUNTERS_ATTR, own)
    setattr(scratch.states[1].conv, COUNTERS_ATTR, torch.zeros(8, dtype=torch.int32))
    decode_step.adopt_step_scratch(scratch.states[1].conv, real.states[1].conv)
    assert getattr(real.states[1].conv, COUNTERS_ATTR) is own  # a state's own counters are kept


def test_adopt_scratch_takes_states_of_other_caches():
    """The Cache protocol leaves a layer's state open: one whose ``tensors()`` is a tuple has its counters
    adopted as well, one without tensors (or a non-tensor entry) is passed over, not an error."""
    from ssmkit.generation.decode import _adopt_scratch
    from ssmkit.ops.decode_step.inputs import COUNTERS_ATTR

    class TupleState:
        def __init__(self, conv: torch.Tensor) -> None:
            self.conv, self.length = conv, 3

        def tensors(self) -> tuple:
            return self.conv, self.length

    class Cache:
        def __init__(self, states: list) -> None:
            self.states = states

    real = Cache([object(), TupleState(torch.zeros(2, 6, 4))])
    scratch = Cache([object(), TupleState(torch.zeros(2, 6, 4))])
    setattr(scratch.states[1].conv, COUNTERS_ATTR, torch.full((4,), 7, dtype=torch.int32))
    _adopt_scratch(scratch, real)
    adopted = getattr(real.states[1].conv, COUNTERS_ATTR)
    assert adopted.shape == (4,) and int(adopted.abs().sum()) == 0
