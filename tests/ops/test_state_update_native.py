"""The native one-pass Mamba-2 and Mamba-1 state steps and the one-call Mamba-1 block step
(ops/state_update/native.py) against the reference steps."""

import pytest
import torch

from ssmkit.ops import selective_state_update
from ssmkit.ops.state_update.native import (
    native_mamba_layer_step,
    native_selective_step,
    native_ssd_step,
)

step = native_ssd_step()
pytestmark = pytest.mark.skipif(step is None, reason="no C compiler here: the native kernels are not built")


@pytest.mark.parametrize("b,h,p,n,g", [(1, 4, 8, 16, 1), (3, 6, 5, 7, 2), (2, 8, 16, 128, 4), (1, 24, 64, 128, 1)])
def test_native_step_equals_the_reference_step(b, h, p, n, g):
    gen = torch.Generator().manual_seed(b * 100 + n)
    state = torch.randn(b, h, p, n, generator=gen)
    x, B, C = torch.randn(b, h, p, generator=gen), torch.randn(b, g, n, generator=gen), torch.randn(b, g, n, generator=gen)
    dt, A = torch.randn(b, h, generator=gen), -torch.rand(h, generator=gen)
    expected_state = state.clone()
    expected = selective_state_update(expected_state, x, dt, A, B, C, dt_softplus=True, backend="reference")
    delta = torch.nn.functional.softplus(dt)
    ptr = state.data_ptr()
    y = step(state, x, delta, torch.exp(delta * A), B, C)
    assert state.data_ptr() == ptr  # in place
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, expected_state, rtol=1e-6, atol=1e-6)


def test_native_step_reads_strided_inputs():
    b, h, p, n, g = 2, 4, 8, 16, 2
    gen = torch.Generator().manual_seed(7)
    state = torch.randn(b, h, p, n, generator=gen)
    packed = torch.randn(b, h * p + 2 * g * n, generator=gen)  # x, B, C as slices of one row, as a layer's
    x, B, C = packed.split([h * p, g * n, g * n], dim=-1)
    delta, decay = torch.rand(b, h, generator=gen), torch.rand(b, h, generator=gen)
    ref = state.clone()
    y = step(state, x.reshape(b, h, p), delta, decay, B.reshape(b, g, n), C.reshape(b, g, n))
    s = ref * decay[..., None, None] + (delta[..., None] * x.reshape(b, h, p))[..., None] * B.reshape(b, g, 1, 1, n).repeat_interleave(h // g, 1).reshape(b, h, 1, n)
    torch.testing.assert_close(state, s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, (s * C.reshape(b, g, 1, n).repeat_interleave(h // g, 1)).sum(-1), rtol=1e-5, atol=1e-5)


selective = native_selective_step()


@pytest.mark.parametrize("b,I,n,R,gate,dt_inside", [(1, 16, 16, 4, True, True), (2, 37, 16, 5, True, True),
                                                     (3, 20, 7, 3, False, False), (1, 48, 35, 8, True, False)])
def test_native_selective_step_equals_the_reference_step(b, I, n, R, gate, dt_inside):
    """Mamba-1's step (dt projection, softplus, state update, D, SiLU gate) against the float64 reference,
    over channel counts that are not multiples of the 16-wide blocks and state sizes off the vector width;
    dt values span softplus's linear branch (> 20) and very negative ones (delta ~ 0)."""
    gen = torch.Generator().manual_seed(b * 1000 + I)
    state = torch.randn(b, I, n, generator=gen)
    packed = torch.randn(b, R + 2 * n, generator=gen)  # x_proj's output: dt_low, B, C as slices
    dt_low, B, C = packed.split([R, n, n], dim=-1)
    xz = torch.randn(b, 2 * I, generator=gen) * 4  # in_proj's output: x and z as slices (z up to ~±15)
    x, z = xz.split(I, dim=-1)
    A, D, dt_bias = -torch.rand(I, n, generator=gen) * 3, torch.randn(I, generator=gen), torch.randn(I, generator=gen)
    dt_weight = torch.randn(I, R, generator=gen) * 3
    dt = dt_low @ dt_weight.T
    dt[:, :3] = torch.tensor([25.0, -30.0, 19.5])  # softplus's linear branch, a vanishing delta, just below
    if dt_inside:
        dt_weight[:3] = 0.0
        dt_bias[:3] = torch.tensor([25.0, -30.0, 19.5])
        dt = dt_low @ dt_weight.T  # what the kernel computes from dt_low
    expected_state = state.clone().double()
    expected = selective_state_update(expected_state, x.double(), dt.double(), A.double(), B.double(), C.double(),
                                      D.double(), z=z.double() if gate else None, dt_bias=dt_bias.double(),
                                      dt_softplus=True, backend="reference")
    step = selective(A, dt_bias, D, dt_weight if dt_inside else None)
    y = step(state, x, dt_low if dt_inside else dt, B, C, z if gate else None)
    torch.testing.assert_close(state, expected_state.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, expected.float(), rtol=1e-5, atol=1e-5)


layer_step = native_mamba_layer_step()


def _mamba_block_reference(r, params, state, window):
    """A pre-norm Mamba(-1) block's decode step in float64 from the reference ops, in place on float64
    copies of the states: RMSNorm, in_proj, the convolution's update and SiLU, x_proj, dt_proj, the
    selective step (softplus(dt + bias), D, z gate), out_proj, residual."""
    p = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in params.items()}
    R, n = p["dt_weight"].shape[1], p["A"].shape[1]
    r = r.double()
    hn = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + params["eps"]) * p["norm"]
    x, z = torch.nn.functional.linear(hn, p["in_w"], p["in_b"]).chunk(2, dim=-1)
    window.copy_(torch.cat([window[..., 1:], x.unsqueeze(-1)], dim=-1))
    x = (window * p["conv_w"]).sum(-1)
    x = torch.nn.functional.silu(x if p["conv_b"] is None else x + p["conv_b"])
    dt, B, C = torch.nn.functional.linear(x, p["x_w"], p["x_b"]).split([R, n, n], dim=-1)
    y = selective_state_update(state, x, dt @ p["dt_weight"].T, p["A"], B, C, p["D"], z=z, dt_bias=p["dt_bias"],
                               dt_softplus=True, backend="reference")
    return r + torch.nn.functional.linear(y, p["out_w"], p["out_b"])


@pytest.mark.parametrize("b,H,I,n,R,width,kind,extras", [
    (1, 32, 64, 16, 4, 4, "fp32", True), (3, 24, 37, 7, 3, 4, "fp32", False), (2, 40, 50, 35, 5, 3, "bf16", True),
    (1, 16, 19, 16, 2, 4, "int8", True), (8, 32, 64, 16, 4, 4, "int8", False)])
def test_native_mamba_layer_step_equals_the_float64_reference(b, H, I, n, R, width, kind, extras):
    """The one-call Mamba-1 block step (mamba_step.c) against the float64 composition of the reference ops,
    token after token, over channel counts off the 16-wide blocks, state sizes off the vector width, up to
    the GEMVs' 8 rows; float32, bfloat16 (dt_proj's weight read as bfloat16) and int8 weights (per-row scales),
    biases and D present or absent. With bf16=False the step rounds nothing: float32 arithmetic throughout."""
    gen = torch.Generator().manual_seed(b * 1000 + I)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}[kind]

    def w(*shape, scale=0.3):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    def maybe(t):
        return t if extras else None

    params = {"norm": 1 + w(H, scale=0.1).float(), "eps": 1e-5, "in_w": w(2 * I, H), "in_b": maybe(w(2 * I).float()),
              "x_w": w(R + 2 * n, I), "x_b": maybe(w(R + 2 * n).float()), "dt_weight": w(I, R, scale=1.0),
              "dt_bias": maybe(torch.randn(I, generator=gen)), "out_w": w(H, I), "out_b": maybe(w(H).float()),
              "conv_w": torch.randn(I, width, generator=gen) * 0.5, "conv_b": maybe(torch.randn(I, generator=gen)),
              "A": -torch.rand(I, n, generator=gen) * 3, "D": maybe(torch.randn(I, generator=gen))}
    mats = {}
    for name in ("in", "x", "out"):
        weight, bias = params[f"{name}_w"], params[f"{name}_b"]
        if kind == "int8":
            s = weight.abs().amax(dim=1) / 127  # per-row symmetric scales, as Int8Linear's
            q = torch.round(weight / s[:, None]).to(torch.int8)
            params[f"{name}_w"] = q.double() * s.double()[:, None]  # what the int8 weight stands for, exactly
            mats[name] = (q, s, bias)
        else:
            mats[name] = (weight, None, bias)
    step = layer_step(params["norm"], params["eps"], mats["in"], mats["x"], params["dt_weight"], params["dt_bias"],
                      mats["out"], params["conv_w"], params["conv_b"], params["A"], params["D"], False)
    state, window = torch.randn(b, I, n, generator=gen), torch.randn(b, I, width, generator=gen)
    ref_state, ref_window = state.double(), window.double()
    for _ in range(3):
        r = torch.randn(b, H, generator=gen) * 2
        out = step(r, state, window)
        expected = _mamba_block_reference(r, params, ref_state, ref_window)
        # float32 rounding carried through four products and the state (outputs of size ~1): ~1e-5 typical
        torch.testing.assert_close(out, expected.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(state, ref_state.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(window, ref_window.float(), rtol=2e-5, atol=2e-5)


def test_native_mamba_layer_step_is_the_same_with_more_threads():
    """Rows of the GEMVs and channels of the state step are split over OpenMP threads (sizes past the kernels'
    thresholds): no sum changes order, so one and two threads agree bit for bit."""
    b, H, I, n, R = 2, 64, 4096, 16, 8
    gen = torch.Generator().manual_seed(11)
    mats = [(torch.randn(rows, cols, generator=gen) * 0.05, None, None) for rows, cols in
            ((2 * I, H), (R + 2 * n, I), (H, I))]
    step = layer_step(torch.ones(H), 1e-5, mats[0], mats[1], torch.randn(I, R, generator=gen) * 0.1,
                      torch.randn(I, generator=gen), mats[2], torch.randn(I, 4, generator=gen), None,
                      -torch.rand(I, n, generator=gen), torch.randn(I, generator=gen), False)
    r, state, window = torch.randn(b, H, generator=gen), torch.randn(b, I, n, generator=gen), torch.randn(b, I, 4)
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            s, w = state.clone(), window.clone()
            outs.append((step(r, s, w), s, w))
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*outs):
        assert torch.equal(one, two)
