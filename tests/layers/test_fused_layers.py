"""The Mamba and Mamba-2 layers' fused training path (``fused=True``: ``mamba_inner_fn`` /
``mamba_split_conv1d_scan_combined``) against the separate ops (``fused=False``) in float64 as the
reference: outputs and the gradient of every parameter and of the input, on a grid of the layers' options;
and the fused path keeps less for the backward."""

from __future__ import annotations

import copy

import pytest
import torch

from ssmkit.layers import Mamba, Mamba2
from ssmkit.testing import assert_close, saved_activation_bytes

D_MODEL = 32

MAMBA_OPTIONS = {
    "plain": {},
    "bias_dt_rank": {"bias": True, "dt_rank": 3, "d_conv": 3},
    "falcon_rms": {"mixer_rms_eps": 1e-5},
    "jamba_norms": {"inner_layernorms": True, "mixer_rms_eps": 1e-4},
}
MAMBA2_OPTIONS = {
    "plain": {},
    "groups_D_hdim": {"ngroups": 4, "D_has_hdim": True},
    "no_norm": {"rmsnorm": False, "bias": True},
    "norm_before_gate_limit": {"norm_before_gate": True, "dt_limit": (0.05, 0.5)},
    "no_conv_bias_width_2": {"conv_bias": False, "d_conv": 2},
}


def _pair(cls, options, dtype, **fixed):
    """(fused layer in dtype, unfused float64 copy with the same weights), non-trivial weights."""
    torch.manual_seed(3)
    layer = cls(D_MODEL, **(fixed | options))
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith(("layernorm.weight", ".bias")) or name == "norm.weight":
                p.add_(0.2 * torch.randn_like(p))
    ref = copy.deepcopy(layer).double()
    ref.config = type(ref.config)(**{**vars(ref.config), "fused": False})
    return layer.to(dtype), ref


def _check(layer, ref, x, seq_idx, dtype):
    assert layer.config.fused and not ref.config.fused
    x = x.to(dtype).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    out, out64 = layer(x, seq_idx=seq_idx), ref(x64, seq_idx=seq_idx)
    assert_close(out, out64, dtype, name="output")
    cot = torch.randn_like(out64)
    (out.double() * cot).sum().backward()
    (out64 * cot).sum().backward()
    assert_close(x.grad, x64.grad, dtype, name="d input")
    ref_params = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert_close(p.grad, ref_params[name].grad, dtype, name=f"d {name}")


def _docs(b: int, l: int) -> torch.Tensor:
    """Packed documents: row 0 has three (cuts at 4 and 11), row 1 one."""
    seq_idx = torch.zeros(b, l, dtype=torch.int32)
    seq_idx[0, 4:] = 1
    seq_idx[0, 11:] = 2
    return seq_idx


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("case", list(MAMBA_OPTIONS))
def test_mamba_fused_equals_separate_ops_in_float64(case, packed):
    layer, ref = _pair(Mamba, MAMBA_OPTIONS[case], torch.float32, d_state=6)
    x = torch.randn(2, 15, D_MODEL)
    _check(layer, ref, x, _docs(2, 15) if packed else None, torch.float32)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("case", list(MAMBA2_OPTIONS))
def test_mamba2_fused_equals_separate_ops_in_float64(case, packed):
    layer, ref = _pair(Mamba2, MAMBA2_OPTIONS[case], torch.float32, d_state=8, headdim=8, chunk_size=8,
                       ngroups=MAMBA2_OPTIONS[case].get("ngroups", 2))
    x = torch.randn(2, 15, D_MODEL)  # 15: not a multiple of chunk_size
    _check(layer, ref, x, _docs(2, 15) if packed else None, torch.float32)


@pytest.mark.parametrize("cls, fixed", [(Mamba, {"d_state": 6}), (Mamba2, {"d_state": 8, "headdim": 8, "chunk_size": 8})])
def test_fused_is_the_same_function_in_bfloat16(cls, fixed):
    layer, ref = _pair(cls, {}, torch.bfloat16, **fixed)
    _check(layer, ref, torch.randn(2, 12, D_MODEL), None, torch.bfloat16)


@pytest.mark.parametrize("cls, fixed", [(Mamba, {"d_state": 6}), (Mamba2, {"d_state": 8, "headdim": 8, "chunk_size": 8})])
def test_fused_keeps_less_for_the_backward(cls, fixed):
    torch.manual_seed(0)
    fused = cls(64, **fixed)
    unfused = copy.deepcopy(fused)
    unfused.config = type(unfused.config)(**{**vars(unfused.config), "fused": False})
    x = torch.randn(2, 64, 64, requires_grad=True)
    params = [*fused.parameters(), *unfused.parameters(), x]
    kept = saved_activation_bytes(lambda: fused(x), exclude=params)
    kept_unfused = saved_activation_bytes(lambda: unfused(x), exclude=params)
    assert 0 < kept < 0.8 * kept_unfused, (kept, kept_unfused)


def test_states_and_context_parallel_take_the_separate_ops():
    """A call with a cache or an initial state reads a convolution state the fused functions have no
    argument for: it must give what the unfused layer gives (the fused switch does not change it)."""
    layer, ref = _pair(Mamba2, {}, torch.float64, d_state=8, headdim=8, chunk_size=8)
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    state = layer.allocate_state(2)
    state.ssm.normal_()
    state.conv.normal_()
    ref_state = state.clone()
    assert_close(layer(x, initial_state=state), ref(x, initial_state=ref_state), torch.float64, name="output")


@pytest.mark.parametrize("cls, fixed", [(Mamba, {"d_state": 6}), (Mamba2, {"d_state": 8, "headdim": 8, "chunk_size": 8})])
def test_fused_under_autocast_recomputes_in_the_forwards_dtypes(cls, fixed):
    """The backward recomputes under the forward's autocast (else the recomputed intermediates would come
    out in float32 and differ from the forward's)."""
    layer, _ = _pair(cls, {}, torch.float32, **fixed)
    unfused = copy.deepcopy(layer)
    unfused.config = type(unfused.config)(**{**vars(unfused.config), "fused": False})
    x = torch.randn(2, 12, D_MODEL)
    grads = []
    for module in (layer, unfused):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(xi)
        out.float().square().sum().backward()
        grads.append([xi.grad, *(p.grad for p in module.parameters())])
    for got, expected in zip(*grads):
        assert_close(got, expected, torch.bfloat16, name="gradient under autocast")


@pytest.mark.parametrize("cls, fixed", [(Mamba, {"d_state": 6}), (Mamba2, {"d_state": 8, "headdim": 8, "chunk_size": 8})])
def test_fused_inside_activation_checkpointing(cls, fixed):
    """Under torch.utils.checkpoint (non-reentrant: its recomputation fills the saved tensors of the first
    forward) the fused layer keeps its intermediates instead of releasing them, and the gradients are right."""
    from torch.utils.checkpoint import checkpoint

    layer, _ = _pair(cls, {}, torch.float64, **fixed)
    unfused = copy.deepcopy(layer)
    unfused.config = type(unfused.config)(**{**vars(unfused.config), "fused": False})
    x = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    grads = []
    for module in (layer, unfused):
        xi = x.clone().requires_grad_()
        out = checkpoint(lambda m, v: (m(v) * v).sin(), module, xi, use_reentrant=False)
        out.square().sum().backward()
        grads.append([xi.grad, *(p.grad for p in module.parameters())])
    for got, expected in zip(*grads):
        assert_close(got, expected, torch.float64, name="gradient under checkpoint")
