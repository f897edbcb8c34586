"""The Mamba-1 layer's scan layouts (``ssmkit.layers.mamba.SCAN_LAYOUT``): ``"time"`` (mamba_ssm's layer: xz as
``W_in @ hᵀ``, u, z, Δ, B, C with unit time stride; the default on CUDA) computes the same function as
``"channel"`` (the default elsewhere) —
outputs and the gradients of the input and of every parameter, in float64 to rounding and in bfloat16 against
float64 — fused and unfused, with packed documents, the falcon_mamba / Jamba norms, a prefill with a cache; and
the scan really receives time-contiguous inputs on the time layout (strides recorded by wrapping it).

The chunked backend runs here; the Triton kernels run in Triton's CPU interpreter in a subprocess (this file
as a script), as on a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch

import ssmkit.layers.mamba as mamba_module
import ssmkit.ops as ops_module
import ssmkit.ops.fused.mamba_inner as inner_module
from ssmkit.layers import Mamba
from ssmkit.testing import assert_close, report_checks, run_checks_in_interpreter

D_MODEL = 16

OPTIONS = {
    "plain": {},
    "bias_dt_rank_conv3": {"bias": True, "dt_rank": 3, "d_conv": 3},
    "falcon_rms": {"mixer_rms_eps": 1e-5},
    "jamba_norms": {"inner_layernorms": True, "mixer_rms_eps": 1e-4},
}


@contextlib.contextmanager
def scan_layout(layout: str) -> Iterator[None]:
    with mock.patch.object(mamba_module, "SCAN_LAYOUT", layout):
        yield


@contextlib.contextmanager
def recorded_scans() -> Iterator[list[dict[str, torch.Tensor | None]]]:
    """The tensors each selective scan call receives (the fused function's and the unfused layer's)."""
    calls: list[dict[str, torch.Tensor | None]] = []
    scan = inner_module.selective_scan_fn

    def recording(u, delta, A, B, C, D=None, z=None, *args, **kwargs):
        calls.append({"u": u, "delta": delta, "B": B, "C": C, "z": z})
        return scan(u, delta, A, B, C, D, z, *args, **kwargs)

    with mock.patch.object(inner_module, "selective_scan_fn", recording), \
            mock.patch.object(ops_module, "selective_scan_fn", recording):
        yield calls


def make_layer(options: dict, fused: bool, dtype: torch.dtype = torch.float64) -> Mamba:
    """A layer with every parameter moved off its initial value (so each term of every gradient matters)."""
    torch.manual_seed(3)
    layer = Mamba(D_MODEL, d_state=4, fused=fused, **options)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return layer.to(dtype)


def packed_docs(b: int, length: int) -> torch.Tensor:
    """Row 0 holds three documents (cuts at 4 and 11), row 1 one."""
    seq_idx = torch.zeros(b, length, dtype=torch.int32)
    seq_idx[0, 4:] = 1
    seq_idx[0, 11:] = 2
    return seq_idx


def outputs_and_grads(layer: Mamba, x: torch.Tensor, layout: str, seq_idx: torch.Tensor | None,
                      cot: torch.Tensor) -> dict[str, torch.Tensor]:
    """The layer's output and the gradients of the input and of every parameter, on one layout."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with scan_layout(layout):
        out = layer(x, seq_idx=seq_idx)
    (out.double() * cot).sum().backward()
    result = {"output": out.detach(), "d input": x.grad}
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"{name} got no gradient on the {layout} layout"
        result[f"d {name}"] = p.grad.clone()
    return result


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("case", list(OPTIONS))
def test_time_layout_is_the_same_function_in_float64(case, fused, packed):
    layer = make_layer(OPTIONS[case], fused)
    x = torch.randn(2, 15, D_MODEL, dtype=torch.float64)
    seq_idx = packed_docs(2, 15) if packed else None
    cot = torch.randn(2, 15, D_MODEL, dtype=torch.float64)
    want = outputs_and_grads(layer, x, "channel", seq_idx, cot)
    got = outputs_and_grads(layer, x, "time", seq_idx, cot)
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=1e-12, atol=1e-12, msg=name)


def test_time_layout_with_jamba_norms_of_different_eps():
    """Norms of different eps take the separate ops even with fused=True; the time layout transposes for them."""
    layer = make_layer({"inner_layernorms": True}, fused=True)
    layer.c_layernorm.eps = 1e-3
    x, cot = torch.randn(2, 9, D_MODEL, dtype=torch.float64), torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    want = outputs_and_grads(layer, x, "channel", None, cot)
    got = outputs_and_grads(layer, x, "time", None, cot)
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("case", ["plain", "jamba_norms"])
def test_time_layout_in_bfloat16_against_float64(case, fused):
    layer = make_layer(OPTIONS[case], fused, torch.bfloat16)
    ref = copy.deepcopy(layer).double()
    x = torch.randn(2, 15, D_MODEL)
    cot = torch.randn(2, 15, D_MODEL, dtype=torch.float64)
    got = outputs_and_grads(layer, x.bfloat16(), "time", packed_docs(2, 15), cot)
    want = outputs_and_grads(ref, x.double(), "channel", packed_docs(2, 15), cot)
    for name, t in want.items():
        assert_close(got[name], t, torch.bfloat16, name=name)


@pytest.mark.parametrize("fused", [True, False])
def test_time_layout_under_autocast(fused):
    """Under bf16 autocast (float32 weights, as training runs) both layouts give the same output and gradients
    within bf16 rounding, and the time layout's GEMMs run in bf16 as the channel layout's do."""
    layer = make_layer({"bias": True}, fused, torch.float32)
    x = torch.randn(2, 15, D_MODEL)
    cot = torch.randn(2, 15, D_MODEL, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = outputs_and_grads(layer, x, "time", None, cot)
        want = outputs_and_grads(layer, x, "channel", None, cot)
    assert got["output"].dtype == want["output"].dtype == torch.bfloat16
    for name, t in want.items():
        assert_close(got[name], t, torch.bfloat16, name=name)


def test_time_layout_prefill_with_a_cache_then_decode():
    layer = make_layer(OPTIONS["falcon_rms"], fused=True)
    x = torch.randn(2, 12, D_MODEL, dtype=torch.float64)
    results = {}
    for layout in ("channel", "time"):
        cache = layer.allocate_state(2)
        with scan_layout(layout), torch.no_grad():
            outs = [layer(x[:, :7], cache=cache), layer(x[:, 7:11], cache=cache), layer(x[:, 11:], cache=cache)]
        results[layout] = (*outs, cache.conv, cache.ssm)
    for got, want in zip(results["time"], results["channel"]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("case", ["plain", "falcon_rms"])
def test_the_scan_receives_time_contiguous_inputs_on_the_time_layout(case, fused):
    layer = make_layer(OPTIONS[case], fused, torch.float32)
    x = torch.randn(2, 9, D_MODEL, requires_grad=True)
    # "auto" (the default) is the channel layout off CUDA (tests/gpu/test_mamba_layout.py: time on CUDA).
    for layout, unit_dim in (("time", -1), ("channel", 1), ("auto", 1)):
        with scan_layout(layout), recorded_scans() as calls:
            layer(x).sum().backward()
        assert calls, "the scan was not called"
        for call in calls:
            for name in ("u", "delta", "z"):
                t = call[name]
                if t is not None:
                    assert t.stride(unit_dim) == 1, f"{layout}: {name} strides {t.stride()}"
            if layout == "time":
                for name in ("B", "C"):
                    assert call[name].stride(-1) == 1, f"time: {name} strides {call[name].stride()}"
                assert call["delta"].is_contiguous(), f"time: delta strides {call['delta'].stride()}"


def test_an_unknown_layout_is_refused():
    layer = make_layer({}, fused=True)
    with scan_layout("b l d"), pytest.raises(ValueError, match="SCAN_LAYOUT"):
        layer(torch.randn(1, 3, D_MODEL, dtype=torch.float64))


def check_triton_layouts(options: dict, fused: bool, dtype: str) -> None:
    """Triton (interpreter) on the time layout against the channel layout and against float64 (reference)."""
    from tests.layers.test_mamba3_layer_triton import cuda_choices

    dt = getattr(torch, dtype)
    layer = make_layer(options, fused, dt)
    ref = copy.deepcopy(layer).double()
    x = torch.randn(2, 11, D_MODEL)
    cot = torch.randn(2, 11, D_MODEL, dtype=torch.float64)
    seq_idx = packed_docs(2, 11)
    with cuda_choices():
        with recorded_scans() as calls:
            time = outputs_and_grads(layer, x.to(dt), "time", seq_idx, cot)
        channel = outputs_and_grads(layer, x.to(dt), "channel", seq_idx, cot)
    assert calls and all(c[k].stride(-1) == 1 for c in calls for k in ("u", "delta", "B", "C"))
    want = outputs_and_grads(ref, x.double(), "channel", seq_idx, cot)
    for name, t in want.items():
        assert_close(time[name], t, dt, name=f"time {name}")
        assert_close(time[name], channel[name], dt, name=f"time vs channel {name}")


@pytest.mark.slow  # about 20 s: the scan kernels in the interpreter
def test_time_layout_on_the_triton_kernels_in_interpreter():
    run_checks_in_interpreter(__file__, "all")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    report_checks({
        "fused_fp32": (check_triton_layouts, ({}, True, "float32")),
        "fused_jamba_bf16": (check_triton_layouts, (OPTIONS["jamba_norms"], True, "bfloat16")),
        "unfused_falcon_fp32": (check_triton_layouts, (OPTIONS["falcon_rms"], False, "float32")),
    })


@pytest.mark.parametrize("fused", [True, False])
def test_the_time_layout_keeps_in_proj_hooks(fused):
    """A forward hook on in_proj (activation capture, a pruning mask's pre-hook) runs on the time layout as on the
    channel layout ("auto" picks time on CUDA only: the hook must not depend on the device)."""
    layer = make_layer({}, fused)
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    seen = []
    handle = layer.in_proj.register_forward_hook(lambda _m, _args, out: seen.append(out.shape) or 2 * out)
    try:
        with scan_layout("channel"):
            want = layer(x)
        with scan_layout("time"):
            got = layer(x)
    finally:
        handle.remove()
    assert seen == [(2, 7, 2 * layer.d_inner)] * 2
    assert_close(got, want, torch.float64, name="out with a hooked in_proj")
