import math

import pytest
import torch

from ssmkit.layers import Mamba, MambaState
from ssmkit.testing import assert_close, assert_prenorm_step_matches

D_MODEL = 24


def make(dtype=torch.float32, **kw):
    torch.manual_seed(1)
    layer = Mamba(D_MODEL, d_state=8, d_conv=4, **kw).to(dtype)
    # Larger Δ and conv weights than the init so the state and convolution matter in the comparisons.
    with torch.no_grad():
        layer.dt_proj.bias.add_(2.0)
        layer.conv1d.weight.mul_(3.0)
    return layer


def run_steps(layer, x, state):
    return torch.cat([layer(x[:, t:t + 1], cache=state) for t in range(x.shape[1])], dim=1)


VARIANTS = [{}, {"mixer_rms_eps": 1e-5}, {"bias": True, "conv_bias": False}, {"inner_layernorms": True}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", VARIANTS)
def test_one_token_steps_match_parallel_forward(dtype, kw):
    layer = make(dtype, **kw)
    x = torch.randn(2, 13, D_MODEL, dtype=dtype)
    full = layer(x)
    state = layer.allocate_state(2)
    steps = run_steps(layer, x, state)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close(steps, full, rtol=rtol, atol=0, name="steps vs parallel")
    # The state after the steps equals the state the parallel path leaves.
    prefill = layer.allocate_state(2)
    layer(x, cache=prefill)
    assert_close(state.ssm, prefill.ssm, rtol=rtol, atol=0, name="ssm state")
    assert_close(state.conv, prefill.conv, rtol=rtol, atol=0, name="conv state")


@pytest.mark.parametrize("split", [1, 2, 5, 11])
def test_multi_token_step_from_existing_state(split):
    layer = make(torch.float64)
    x = torch.randn(2, 17, D_MODEL, dtype=torch.float64)
    full = layer(x)
    state = layer.allocate_state(2)
    first = layer(x[:, :split], cache=state)
    rest = layer(x[:, split:], cache=state)
    assert_close(torch.cat([first, rest], 1), full, name="prefill + multi-token step")
    # The same state passed as a read-only initial_state.
    again = layer.allocate_state(2)
    layer(x[:, :split], cache=again)
    before = again.clone()
    assert_close(layer(x[:, split:], initial_state=again), full[:, split:], name="initial_state")
    assert torch.equal(again.ssm, before.ssm) and torch.equal(again.conv, before.conv)


def test_seq_idx_packed_equals_documents_alone():
    layer = make(torch.float64)
    a, b = torch.randn(1, 7, D_MODEL, dtype=torch.float64), torch.randn(1, 2, D_MODEL, dtype=torch.float64)
    packed = torch.cat([a, b], 1)
    seq_idx = torch.tensor([[0] * 7 + [1] * 2], dtype=torch.int32)
    out = layer(packed, seq_idx=seq_idx)
    assert_close(out[:, :7], layer(a), name="doc a")
    assert_close(out[:, 7:], layer(b), name="doc b")
    # With a cache, the state left belongs to the last document only (conv window included).
    state = layer.allocate_state(1)
    layer(packed, seq_idx=seq_idx, cache=state)
    alone = layer.allocate_state(1)
    layer(b, cache=alone)
    assert_close(state.ssm, alone.ssm, name="ssm state of the last doc")
    assert_close(state.conv, alone.conv, name="conv state of the last doc")


def test_initialisation_follows_mamba_ssm():
    torch.manual_seed(0)
    layer = Mamba(32, d_state=16, dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4)
    assert layer.d_inner == 64 and layer.dt_rank == math.ceil(32 / 16)
    assert torch.equal(layer.A_log, torch.log(torch.arange(1, 17.0)).repeat(64, 1))
    assert torch.equal(layer.D, torch.ones(64))
    dt = torch.nn.functional.softplus(layer.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    bound = layer.dt_rank**-0.5
    assert layer.dt_proj.weight.abs().max() <= bound
    for p in (layer.A_log, layer.D, layer.dt_proj.bias, layer.conv1d.bias):
        assert getattr(p, "_no_weight_decay", False)
    assert not getattr(layer.in_proj.weight, "_no_weight_decay", False)
    assert tuple(layer.x_proj.weight.shape) == (2 + 32, 64)
    constant = Mamba(32, dt_init="constant")
    assert torch.all(constant.dt_proj.weight == constant.dt_rank**-0.5)
    with pytest.raises(ValueError, match="dt_init"):
        Mamba(32, dt_init="zeros")


def test_state_shapes_dtypes_and_errors():
    layer = make()
    state = layer.allocate_state(3)
    assert isinstance(state, MambaState)
    assert state.conv.shape == (3, 48, 4) and state.ssm.shape == (3, 48, 8)
    assert state.ssm.dtype == torch.float32
    bf16 = layer.allocate_state(1, dtype=torch.bfloat16)
    assert bf16.conv.dtype == torch.bfloat16 and bf16.ssm.dtype == torch.float32
    x = torch.randn(2, 4, D_MODEL)
    with pytest.raises(ValueError, match=r"state.conv has shape \(3, 48, 4\), expected \(2, 48, 4\)"):
        layer(x, cache=state)
    with pytest.raises(ValueError, match="either cache"):
        layer(x, cache=layer.allocate_state(2), initial_state=layer.allocate_state(2))
    with pytest.raises(TypeError, match="MambaState"):
        layer(x, cache=object())


def test_bfloat16_steps_track_parallel_forward():
    layer = make(torch.bfloat16)
    x = torch.randn(2, 9, D_MODEL).to(torch.bfloat16)
    full = layer(x)
    assert full.dtype == torch.bfloat16
    steps = run_steps(layer, x, layer.allocate_state(2))
    assert_close(steps, full, torch.bfloat16, name="bf16 steps vs parallel")


def test_gradients_reach_the_initial_state():
    layer = make(torch.float64)
    x = torch.randn(1, 6, D_MODEL, dtype=torch.float64)
    state = layer.allocate_state(1)
    layer(torch.randn(1, 5, D_MODEL, dtype=torch.float64), cache=state)
    state = MambaState(conv=state.conv.clone().requires_grad_(), ssm=state.ssm.clone().requires_grad_())
    layer(x, initial_state=state).sum().backward()
    assert state.ssm.grad.abs().sum() > 0 and state.conv.grad[..., 1:].abs().sum() > 0


def test_a_cache_under_autograd_keeps_values_and_backward_works():
    layer = make(torch.float32)
    cache = layer.allocate_state(1)
    layer(torch.randn(1, 4, D_MODEL), cache=cache).sum().backward()
    out = layer(torch.randn(1, 3, D_MODEL), cache=cache).sum() + layer(torch.randn(1, 2, D_MODEL), cache=cache).sum()
    out.backward()
    assert not cache.ssm.requires_grad and not cache.conv.requires_grad
    assert layer.in_proj.weight.grad.abs().sum() > 0


def test_inner_layernorms_are_learned_rms_norms_on_dt_b_c():
    """Jamba's dt/B/C norms: learned weights (in the state dict), eps mixer_rms_eps or 1e-6, and equal to
    falcon_mamba's weightless norms when the weights are ones and the eps agree."""
    layer = make(inner_layernorms=True, mixer_rms_eps=1e-5)
    names = {n for n in layer.state_dict() if "layernorm" in n}
    assert names == {"dt_layernorm.weight", "b_layernorm.weight", "c_layernorm.weight"}
    assert layer.dt_layernorm.weight.shape == (2,) and layer.b_layernorm.eps == 1e-5
    assert make(inner_layernorms=True).c_layernorm.eps == 1e-6
    falcon = make(mixer_rms_eps=1e-5)
    x = torch.randn(2, 9, D_MODEL)
    assert_close(layer(x), falcon(x), torch.float32, name="unit weights == weightless norms")
    with torch.no_grad():
        layer.b_layernorm.weight.mul_(torch.linspace(0.5, 2.0, 8))
    assert not torch.allclose(layer(x), falcon(x))


@pytest.mark.parametrize("kw", VARIANTS)
def test_step_from_residual_is_the_prenorm_block_step(kw):
    """The fused decode entry point equals ``r + layer(norm(r))`` with the same cache, token after token."""
    assert_prenorm_step_matches(make(torch.float64, **kw), D_MODEL)


@pytest.mark.parametrize("kw", VARIANTS)
def test_step_from_residual_with_out_proj_through_the_gemv_op(kw):
    """``decode_launch``'s mamba1_out_gemv: out_proj and the add through ``rms_norm_linear`` without a norm."""
    from ssmkit.ops import decode_launch

    with decode_launch.use("greedy_head"):
        assert decode_launch.current().mamba1_out_gemv
        assert_prenorm_step_matches(make(torch.float64, **kw), D_MODEL)


@pytest.mark.parametrize("kw", VARIANTS)
def test_step_from_residual_scales_the_branch(kw):
    """With a residual multiplier (Granite-4.0) the fused step is ``r + scale * layer(norm(r))``."""
    assert_prenorm_step_matches(make(torch.float64, **kw), D_MODEL, scale=0.22)


def test_step_from_residual_checks_its_state():
    from ssmkit.layers.norm import RMSNorm

    layer = make()
    with pytest.raises(ValueError, match="state"):
        layer.step_from_residual(torch.randn(2, 1, D_MODEL), RMSNorm(D_MODEL), layer.allocate_state(3))
    with pytest.raises(ValueError, match="one token"):
        layer.step_from_residual(torch.randn(2, 7, D_MODEL), RMSNorm(D_MODEL), layer.allocate_state(2))
