"""The Mamba-1 layer's time layout (``ssmkit.layers.mamba.SCAN_LAYOUT = "time"``) on CUDA: the Triton scan sees
u, Δ, B, C with unit time stride, and the layer's output and gradients match the channel layout's, and float64's
as closely as the channel layout's do, under bf16 autocast (float32 weights, as training runs); its activation memory and peak stay within a few
percent of the channel layout's.

Run on the device machine: ``python -m pytest -m gpu tests/gpu/test_mamba_layout.py -q``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ssmkit.testing import assert_close, relative_error, saved_activation_bytes
from tests.layers.test_mamba_layout import (
    OPTIONS,
    make_layer,
    outputs_and_grads,
    packed_docs,
    recorded_scans,
    scan_layout,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("case", ["plain", "jamba_norms"])
def test_time_layout_under_autocast_on_cuda(case, fused):
    layer = make_layer(OPTIONS[case], fused, torch.float32).cuda()
    ref = copy.deepcopy(layer).double()
    x = torch.randn(2, 300, 16, device="cuda")
    cot = torch.randn(2, 300, 16, device="cuda", dtype=torch.float64)
    seq_idx = packed_docs(2, 300).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16), recorded_scans() as calls:
        got = outputs_and_grads(layer, x, "time", seq_idx, cot)
    assert calls and all(c[k].stride(-1) == 1 for c in calls for k in ("u", "delta", "B", "C"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        channel = outputs_and_grads(layer, x, "channel", seq_idx, cot)
    want = outputs_and_grads(ref, x.double(), "channel", seq_idx, cot)
    for name, t in want.items():
        # Autocast's own rounding (Δ in bf16: d dt_proj.weight is ~4% off float64 on either layout) bounds
        # how close either comes to float64: the time layout must come as close as the channel layout.
        assert relative_error(got[name], t) <= 1.25 * relative_error(channel[name], t) + 1e-3, name
        assert_close(got[name], channel[name], torch.bfloat16, name=f"time vs channel {name}")


def test_time_layout_keeps_no_more_activation_memory():
    from ssmkit.layers import Mamba

    torch.manual_seed(0)
    layer = Mamba(1024, d_state=16, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 2048, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    saved, peak = {}, {}
    for layout in ("channel", "time"):
        with scan_layout(layout):
            saved[layout] = saved_activation_bytes(lambda: layer(x), exclude=[*layer.parameters(), x])
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            layer(x).sum().backward()
            torch.cuda.synchronize()
            peak[layout] = torch.cuda.max_memory_allocated() - before
    assert saved["time"] <= 1.03 * saved["channel"], saved
    assert peak["time"] <= 1.05 * peak["channel"], peak


def test_auto_is_the_time_layout_on_cuda():
    layer = make_layer(OPTIONS["plain"], True, torch.float32).cuda()
    x = torch.randn(2, 40, 16, device="cuda", requires_grad=True)
    with scan_layout("auto"), recorded_scans() as calls:
        layer(x).sum().backward()
    assert calls and all(call["u"].stride(-1) == 1 and call["delta"].stride(-1) == 1 for call in calls)
