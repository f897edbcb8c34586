import math

import pytest
import torch

from ssmkit.layers import Mamba2, Mamba2State
from ssmkit.testing import assert_close, assert_prenorm_step_matches

D_MODEL = 32


def make(dtype=torch.float32, **kw):
    torch.manual_seed(1)
    args = {"d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 8} | kw
    layer = Mamba2(D_MODEL, **args).to(dtype)
    with torch.no_grad():
        layer.dt_bias.add_(2.0)
        layer.conv1d.weight.mul_(3.0)
    return layer


def run_steps(layer, x, state):
    return torch.cat([layer(x[:, t:t + 1], cache=state) for t in range(x.shape[1])], dim=1)


VARIANTS = [
    {},
    {"ngroups": 4, "D_has_hdim": True},
    {"rmsnorm": False},
    {"norm_before_gate": True, "bias": True},
    {"dt_limit": (0.05, 0.5)},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", VARIANTS)
def test_one_token_steps_match_parallel_forward(dtype, kw):
    layer = make(dtype, **kw)
    # 13 positions: not a multiple of chunk_size (8).
    x = torch.randn(2, 13, D_MODEL, dtype=dtype)
    full = layer(x)
    state = layer.allocate_state(2)
    steps = run_steps(layer, x, state)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close(steps, full, rtol=rtol, atol=0, name="steps vs parallel")
    prefill = layer.allocate_state(2)
    layer(x, cache=prefill)
    assert_close(state.ssm, prefill.ssm, rtol=rtol, atol=0, name="ssm state")
    assert_close(state.conv, prefill.conv, rtol=rtol, atol=0, name="conv state")


def test_dt_limit_changes_the_output():
    x = torch.randn(1, 9, D_MODEL, dtype=torch.float64)
    free, clamped = make(torch.float64), make(torch.float64, dt_limit=(0.0, 0.01))
    assert (free(x) - clamped(x)).abs().max() > 1e-3


@pytest.mark.parametrize("split", [1, 3, 8, 12])
def test_multi_token_step_from_existing_state(split):
    layer = make(torch.float64)
    x = torch.randn(2, 21, D_MODEL, dtype=torch.float64)
    full = layer(x)
    state = layer.allocate_state(2)
    first = layer(x[:, :split], cache=state)
    rest = layer(x[:, split:], cache=state)
    assert_close(torch.cat([first, rest], 1), full, name="prefill + multi-token step")
    again = layer.allocate_state(2)
    layer(x[:, :split], cache=again)
    assert_close(layer(x[:, split:], initial_state=again), full[:, split:], name="initial_state")


def test_seq_idx_packed_equals_documents_alone():
    layer = make(torch.float64)
    a, b = torch.randn(1, 10, D_MODEL, dtype=torch.float64), torch.randn(1, 2, D_MODEL, dtype=torch.float64)
    seq_idx = torch.tensor([[3] * 10 + [4] * 2], dtype=torch.int32)
    out = layer(torch.cat([a, b], 1), seq_idx=seq_idx)
    assert_close(out[:, :10], layer(a), name="doc a")
    assert_close(out[:, 10:], layer(b), name="doc b")
    state, alone = layer.allocate_state(1), layer.allocate_state(1)
    layer(torch.cat([a, b], 1), seq_idx=seq_idx, cache=state)
    layer(b, cache=alone)
    assert_close(state.ssm, alone.ssm, name="ssm state of the last doc")
    assert_close(state.conv, alone.conv, name="conv state of the last doc")


def test_initialisation_follows_mamba_ssm():
    torch.manual_seed(0)
    layer = Mamba2(64, d_state=16, headdim=16, ngroups=2, A_init_range=(1, 16))
    assert (layer.nheads, layer.conv_dim) == (8, 128 + 2 * 2 * 16)
    assert tuple(layer.in_proj.weight.shape) == (2 * 128 + 2 * 2 * 16 + 8, 64)
    A = torch.exp(layer.A_log)
    assert A.shape == (8,) and A.min() >= 1 and A.max() <= 16
    assert torch.equal(layer.D, torch.ones(8))
    dt = torch.nn.functional.softplus(layer.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert layer.norm.group_size == 64
    for p in (layer.A_log, layer.D, layer.dt_bias, layer.norm.weight, layer.conv1d.bias):
        assert getattr(p, "_no_weight_decay", False)
    assert Mamba2(64, d_state=16, headdim=16, D_has_hdim=True).D.shape == (128,)
    assert not hasattr(Mamba2(64, d_state=16, headdim=16, rmsnorm=False), "norm")
    floor = Mamba2(64, d_state=16, headdim=16, dt_min=1e-6, dt_max=1e-6, dt_init_floor=1e-3)
    assert torch.allclose(torch.nn.functional.softplus(floor.dt_bias), torch.full((8,), 1e-3))


def test_bad_sizes_and_states():
    with pytest.raises(ValueError, match="headdim=24 must divide d_inner"):
        Mamba2(32, headdim=24)
    with pytest.raises(ValueError, match="ngroups=3 must divide nheads=4"):
        Mamba2(32, headdim=16, ngroups=3)
    layer = make()
    state = layer.allocate_state(2)
    assert isinstance(state, Mamba2State)
    assert state.ssm.shape == (2, 4, 16, 8) and state.conv.shape == (2, 64 + 2 * 2 * 8, 4)
    assert state.ssm.dtype == torch.float32 and math.isclose(state.nbytes, 2 * 4 * 16 * 8 * 4 + 2 * 96 * 4 * 4)
    with pytest.raises(ValueError, match="state.ssm has shape"):
        layer(torch.randn(2, 3, D_MODEL), cache=Mamba2State(conv=state.conv, ssm=torch.zeros(2, 4, 16, 9)))


def test_bfloat16_steps_track_parallel_forward():
    layer = make(torch.bfloat16)
    x = torch.randn(2, 11, D_MODEL).to(torch.bfloat16)
    full = layer(x)
    assert full.dtype == torch.bfloat16
    steps = run_steps(layer, x, layer.allocate_state(2))
    assert_close(steps, full, torch.bfloat16, name="bf16 steps vs parallel")


def test_gradients_reach_the_initial_state():
    layer = make(torch.float32)
    state = layer.allocate_state(1)
    layer(torch.randn(1, 5, D_MODEL), cache=state)
    state = Mamba2State(conv=state.conv.clone().requires_grad_(), ssm=state.ssm.clone().requires_grad_())
    layer(torch.randn(1, 6, D_MODEL), initial_state=state).sum().backward()
    assert state.ssm.grad.abs().sum() > 0 and state.conv.grad[..., 1:].abs().sum() > 0


def test_a_cache_under_autograd_keeps_values_and_backward_works():
    layer = make(torch.float32)
    cache = layer.allocate_state(1)
    layer(torch.randn(1, 4, D_MODEL), cache=cache).sum().backward()
    out = layer(torch.randn(1, 3, D_MODEL), cache=cache).sum() + layer(torch.randn(1, 2, D_MODEL), cache=cache).sum()
    out.backward()
    assert not cache.ssm.requires_grad and not cache.conv.requires_grad
    assert layer.in_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kw", VARIANTS)
def test_step_from_residual_is_the_prenorm_block_step(kw):
    """The fused decode entry point equals ``r + layer(norm(r))`` with the same cache, token after token."""
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
