"""S4D layer: convolution mode == recurrent steps, packing, bidirectional, gradients, model integration."""

from __future__ import annotations

import pytest
import torch

from ssmkit.layers.s4d import S4D, S4DState
from ssmkit.models import LanguageModel, ModelConfig
from ssmkit.models.cache import ModelCache
from ssmkit.models.config import HyenaConfig, S4Config, S4DConfig
from ssmkit.testing import assert_close

H = 16


def make(dtype=torch.float32, **kw):
    torch.manual_seed(1)
    return S4D(H, **({"d_state": 8, "dt_min": 0.01, "dt_max": 0.5} | kw)).to(dtype)


def run_steps(layer, x, state):
    return torch.cat([layer(x[:, t:t + 1], cache=state) for t in range(x.shape[1])], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", [{}, {"init": "inv"}, {"init": "legs", "discretization": "bilinear"}])
def test_steps_equal_parallel_forward(dtype, kw):
    layer = make(dtype, **kw)
    x = torch.randn(2, 13, H, dtype=dtype)
    full = layer(x)
    state = layer.allocate_state(2)
    steps = run_steps(layer, x, state)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close(steps, full, rtol=rtol, atol=0, name="steps vs parallel")
    prefill = layer.allocate_state(2)
    layer(x, cache=prefill)
    assert_close(prefill.ssm, state.ssm, rtol=rtol, atol=0, name="state after prefill")


@pytest.mark.parametrize("split", [1, 5, 12])
def test_prefill_then_continue_and_initial_state(split):
    layer = make(torch.float64)
    x = torch.randn(2, 17, H, dtype=torch.float64)
    full = layer(x)
    state = layer.allocate_state(2)
    out = torch.cat([layer(x[:, :split], cache=state), layer(x[:, split:], cache=state)], 1)
    assert_close(out, full, name="prefill + continue")
    again = layer.allocate_state(2)
    layer(x[:, :split], cache=again)
    before = again.ssm.clone()
    assert_close(layer(x[:, split:], initial_state=again), full[:, split:], name="initial_state")
    assert torch.equal(again.ssm, before), "initial_state is read only"


def test_seq_idx_packing_equals_documents_alone():
    layer = make(torch.float64)
    a, b = torch.randn(1, 9, H, dtype=torch.float64), torch.randn(1, 4, H, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 9 + [1] * 4], dtype=torch.int32)
    out = layer(torch.cat([a, b], 1), seq_idx=seq_idx)
    assert_close(out[:, :9], layer(a), name="doc a")
    assert_close(out[:, 9:], layer(b), name="doc b")
    packed, alone = layer.allocate_state(1), layer.allocate_state(1)
    layer(torch.cat([a, b], 1), seq_idx=seq_idx, cache=packed)
    layer(b, cache=alone)
    assert_close(packed.ssm, alone.ssm, name="state of the last document")


def test_bidirectional_reads_the_future_and_has_no_step():
    layer = make(torch.float64, bidirectional=True)
    causal = make(torch.float64)
    assert layer.C.shape == (2, H, 4, 2)
    x = torch.randn(1, 12, H, dtype=torch.float64)
    y = layer(x)
    x2 = x.clone()
    x2[:, 8] += 1.0
    assert (layer(x2)[:, :8] - y[:, :8]).abs().max() > 1e-6, "output before t=8 must depend on x[8]"
    assert (causal(x2)[:, :8] - causal(x)[:, :8]).abs().max() < 1e-12, "the causal layer must not (up to FFT rounding)"
    with pytest.raises(ValueError, match="bidirectional layer reads future positions"):
        layer.allocate_state(1)
    with pytest.raises(ValueError, match="no recurrent state, cache or decode step"):
        layer(x[:, :1], cache=causal.allocate_state(1))
    seq_idx = torch.tensor([[0] * 5 + [1] * 7])
    packed = layer(x, seq_idx=seq_idx)
    assert_close(packed[:, :5], layer(x[:, :5]), name="bidirectional doc a")
    assert_close(packed[:, 5:], layer(x[:, 5:]), name="bidirectional doc b")


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradients_reach_every_parameter_and_the_initial_state(bidirectional):
    layer = make(bidirectional=bidirectional)
    kw = {}
    if not bidirectional:
        state = layer.allocate_state(2)
        state.ssm.normal_().requires_grad_()
        kw["initial_state"] = state
    layer(torch.randn(2, 10, H), **kw).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if not bidirectional:
        assert state.ssm.grad.abs().sum() > 0


def test_bfloat16_and_bad_states():
    layer = make(torch.bfloat16)
    assert layer.log_dt.dtype == torch.bfloat16
    x = torch.randn(2, 7, H).to(torch.bfloat16)
    full = layer(x)
    assert full.dtype == torch.bfloat16
    state = layer.allocate_state(2)
    assert state.ssm.dtype == torch.float32
    assert_close(run_steps(layer, x, state), full, torch.bfloat16, name="bf16 steps")
    fresh = make()
    with pytest.raises(ValueError, match=r"state.ssm has shape"):
        fresh(torch.randn(2, 3, H), cache=S4DState(ssm=torch.zeros(2, H, 5, 2)))
    with pytest.raises(TypeError, match="state must be an S4DState"):
        fresh(torch.randn(2, 3, H), cache=torch.zeros(2))
    with pytest.raises(ValueError, match="discretization must be"):
        S4D(H, discretization="euler")
    with pytest.raises(ValueError, match="N must be an even int"):
        S4D(H, d_state=7)


def test_language_model_with_s4d_s4_and_hyena_layers_decodes_like_its_forward(tmp_path):
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layer=3, layer_pattern="S4H", s4d=S4DConfig(d_state=8),
                      s4=S4Config(d_state=8, l_max=32), hyena=HyenaConfig(l_max=16, filter_order=8))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    model = LanguageModel(cfg, dtype=torch.float64)
    assert [type(b.mixer).__name__ for b in model.layers] == ["S4D", "S4", "Hyena"]
    ids = torch.randint(0, 32, (2, 20))
    full = model(ids, labels=ids)
    cache = model.allocate_cache(2)
    steps = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(20)], dim=1)
    assert_close(steps, full.logits, name="teacher-forced decode")
    half = model.allocate_cache(2)
    model(ids[:, :12], cache=half)
    half.save(tmp_path / "doc.cache")
    loaded = ModelCache.load(tmp_path / "doc.cache")
    assert [type(s).__name__ for s in loaded.states] == ["S4DState", "S4State", "HyenaState"]
    assert_close(model(ids[:, 12:], cache=loaded).logits, full.logits[:, 12:], name="after save/load")
    full.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="s4d.bidirectional reads future tokens"):
        LanguageModel(ModelConfig(vocab_size=8, d_model=8, n_layer=1, layer_pattern="S",
                                  s4d=S4DConfig(d_state=4, bidirectional=True)))
    with pytest.raises(ValueError, match="s4d.d_state must be even"):
        ModelConfig(vocab_size=8, d_model=8, n_layer=1, layer_pattern="S", s4d=S4DConfig(d_state=5))
