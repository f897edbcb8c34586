"""Tests of ssmkit.layers.mamba3: decode steps == parallel forward, packing, mamba_ssm's projections and
initialisation, states, gradients, and Mamba-3 layers inside LanguageModel."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssmkit.layers.mamba3 import Mamba3, Mamba3State
from ssmkit.layers.state import STATE_TYPES
from ssmkit.models import LanguageModel, ModelConfig
from ssmkit.models.cache import ModelCache
from ssmkit.models.config import Mamba2Config, Mamba3Config
from ssmkit.testing import assert_close

D_MODEL = 32
F64 = torch.float64


def make(dtype=torch.float32, **kw):
    torch.manual_seed(1)
    args = {"d_state": 8, "headdim": 16, "chunk_size": 8} | kw
    layer = Mamba3(D_MODEL, **args).to(dtype)
    with torch.no_grad():
        # Larger steps and projections than at initialisation, so that decay, rotation and the
        # trapezoid term all matter over a few tokens.
        layer.dt_bias.add_(2.0)
        layer.in_proj.weight.mul_(3.0)
        for name in ("B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o"):
            if hasattr(layer, name):
                getattr(layer, name).add_(torch.randn_like(getattr(layer, name)) * 0.5)
    return layer


def run_steps(layer, x, state):
    return torch.cat([layer(x[:, t:t + 1], cache=state) for t in range(x.shape[1])], dim=1)


VARIANTS = [
    {},
    {"is_mimo": True, "mimo_rank": 2},
    {"is_outproj_norm": True, "rope_fraction": 1.0},
    {"is_mimo": True, "mimo_rank": 2, "is_outproj_norm": True, "ngroups": 2},
    {"decay_activation": "softplus"},
]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kw", VARIANTS)
def test_one_token_steps_match_parallel_forward(dtype, kw):
    layer = make(dtype, **kw)
    x = torch.randn(2, 13, D_MODEL, dtype=dtype)  # not a multiple of chunk_size (8)
    full = layer(x)
    state = layer.allocate_state(2)
    steps = run_steps(layer, x, state)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close(steps, full, rtol=rtol, atol=0, name="steps vs parallel")
    prefill = layer.allocate_state(2)
    layer(x, cache=prefill)
    for name in ("ssm", "last_B", "last_x"):
        assert_close(getattr(state, name), getattr(prefill, name), rtol=rtol, atol=0, name=name)
    wrapped = torch.remainder(state.angle - prefill.angle + math.pi, 2 * math.pi) - math.pi
    assert wrapped.abs().max() < 1e-5


@pytest.mark.parametrize("split", [1, 3, 8, 12])
def test_multi_token_step_from_existing_state(split):
    layer = make(F64, is_mimo=True, mimo_rank=2)
    x = torch.randn(2, 21, D_MODEL, dtype=F64)
    full = layer(x)
    state = layer.allocate_state(2)
    first = layer(x[:, :split], cache=state)
    rest = layer(x[:, split:], cache=state)
    assert_close(torch.cat([first, rest], 1), full, name="prefill + multi-token step")
    again = layer.allocate_state(2)
    layer(x[:, :split], cache=again)
    assert_close(layer(x[:, split:], initial_state=again), full[:, split:], name="initial_state")


@pytest.mark.parametrize("kw", VARIANTS[:2])
def test_seq_idx_packed_equals_documents_alone(kw):
    layer = make(F64, **kw)
    a, b = torch.randn(1, 10, D_MODEL, dtype=F64), torch.randn(1, 3, D_MODEL, dtype=F64)
    seq_idx = torch.tensor([[3] * 10 + [4] * 3], dtype=torch.int32)
    out = layer(torch.cat([a, b], 1), seq_idx=seq_idx)
    assert_close(out[:, :10], layer(a), name="doc a")
    assert_close(out[:, 10:], layer(b), name="doc b")
    state, alone = layer.allocate_state(1), layer.allocate_state(1)
    layer(torch.cat([a, b], 1), seq_idx=seq_idx, cache=state)
    layer(b, cache=alone)
    for name, t in state.tensors().items():
        assert_close(t, getattr(alone, name), name=f"state.{name} of the last doc")


@pytest.mark.parametrize("activation, floor", [("softplus", 0.05), ("heavy_tail", 0.1)])
def test_projection_follows_mamba_ssm(activation, floor):
    layer = make(F64, A_floor=floor, decay_activation=activation)
    u = torch.randn(2, 5, D_MODEL, dtype=F64) * 5
    z, inputs = layer._project(u)
    parts = layer.in_proj(u).split(layer.split_sizes, dim=-1)
    assert torch.equal(z.flatten(-2), parts[0]) and torch.equal(inputs["x"].flatten(-2), parts[1])
    # mamba_ssm 2.3.2 and its main branch (state-spaces/mamba #962), as each writes it.
    dd_A = parts[5]
    f = F.softplus(dd_A) if activation == "softplus" else dd_A.clamp_min(0) + torch.reciprocal(1 - dd_A.clamp_max(0))
    want_A = -f
    assert torch.equal(inputs["A"], torch.minimum(want_A, torch.tensor(-floor, dtype=F64)))
    assert (want_A > -floor).any() and (want_A < -floor).any()  # both sides of the floor are exercised
    assert_close(inputs["dt"], F.softplus(parts[4] + layer.dt_bias), name="dt")
    B = parts[2].unflatten(-1, (1, 1, 8))
    assert_close(inputs["B"], B / B.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * layer.B_norm.weight, name="B")
    assert torch.equal(inputs["trap"], parts[6])
    assert inputs["angles"].shape == (2, 5, layer.nheads, 2) and torch.equal(inputs["angles"][:, :, 1], parts[7])


def test_initialisation_follows_mamba_ssm():
    torch.manual_seed(0)
    layer = Mamba3(64, d_state=16, headdim=16, ngroups=2, is_mimo=True, mimo_rank=4, is_outproj_norm=True)
    h, R, N, I = 8, 4, 16, 128
    assert layer.num_rope_angles == 4 and layer.split_sizes == [I, I, R * 2 * N, R * 2 * N, h, h, h, 4]
    assert tuple(layer.in_proj.weight.shape) == (2 * I + 2 * R * 2 * N + 3 * h + 4, 64) and layer.in_proj.bias is None
    assert torch.equal(layer.B_bias, torch.ones(h, R, N)) and torch.equal(layer.C_bias, torch.ones(h, R, N))
    assert torch.equal(layer.mimo_x, torch.full((h, R, 16), 0.25)) and torch.equal(layer.mimo_o, layer.mimo_x)
    assert torch.equal(layer.mimo_z, torch.ones(h, R, 16)) and torch.equal(layer.D, torch.ones(h))
    dt = F.softplus(layer.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert layer.norm.group_size == 16 and layer.norm.norm_before_gate and layer.B_norm.weight.shape == (N,)
    for p in (layer.dt_bias, layer.D):
        assert getattr(p, "_no_weight_decay", False)
    siso = Mamba3(64, d_state=10, headdim=16, mimo_rank=4)  # rank only counts with is_mimo
    assert siso.mimo_rank == 1 and not hasattr(siso, "mimo_x") and not hasattr(siso, "norm")
    assert siso.num_rope_angles == 2  # ⌊10 · 0.5⌋ = 5 entries -> 2 pairs
    assert Mamba3(64, d_state=10, headdim=16, rope_fraction=1.0).num_rope_angles == 5


def test_bad_sizes_and_states():
    with pytest.raises(ValueError, match="headdim=24 must divide d_inner"):
        Mamba3(32, headdim=24)
    with pytest.raises(ValueError, match="ngroups=3 must divide nheads=4"):
        Mamba3(32, headdim=16, ngroups=3)
    with pytest.raises(ValueError, match="rope_fraction"):
        Mamba3(32, headdim=16, rope_fraction=0.25)
    with pytest.raises(ValueError, match="no rotary pair"):
        Mamba3(32, headdim=16, d_state=2)
    layer = make(is_mimo=True, mimo_rank=2)
    state = layer.allocate_state(2)
    assert isinstance(state, Mamba3State) and STATE_TYPES["mamba3"] is Mamba3State
    shapes = {k: tuple(v.shape) for k, v in state.tensors().items()}
    assert shapes == {"angle": (2, 4, 2), "ssm": (2, 4, 16, 8), "last_B": (2, 2, 4, 8), "last_x": (2, 4, 16)}
    assert all(t.dtype == torch.float32 for t in state.tensors().values())
    assert state.nbytes == 4 * 2 * (4 * 2 + 4 * 16 * 8 + 2 * 4 * 8 + 4 * 16)
    bad = Mamba3State(angle=state.angle, ssm=state.ssm, last_B=torch.zeros(2, 1, 4, 8), last_x=state.last_x)
    with pytest.raises(ValueError, match="state.last_B has shape"):
        layer(torch.randn(2, 3, D_MODEL), cache=bad)
    with pytest.raises(TypeError, match="Mamba3State"):
        layer(torch.randn(2, 3, D_MODEL), initial_state=state.ssm)
    with pytest.raises(ValueError, match="not both"):
        layer(torch.randn(2, 3, D_MODEL), initial_state=state, cache=state)


def test_bfloat16_steps_track_parallel_forward():
    layer = make(torch.bfloat16, is_mimo=True, mimo_rank=2)
    x = torch.randn(2, 11, D_MODEL).to(torch.bfloat16)
    full = layer(x)
    assert full.dtype == torch.bfloat16
    steps = run_steps(layer, x, layer.allocate_state(2))
    assert_close(steps, full, torch.bfloat16, name="bf16 steps vs parallel")


def test_gradients_reach_the_initial_state_and_every_parameter():
    layer = make(torch.float32, is_mimo=True, mimo_rank=2, is_outproj_norm=True)
    state = layer.allocate_state(1)
    layer(torch.randn(1, 5, D_MODEL), cache=state)
    state = Mamba3State(**{k: v.clone().requires_grad_() for k, v in state.tensors().items()})
    layer(torch.randn(1, 6, D_MODEL), initial_state=state).sum().backward()
    for name, t in state.tensors().items():
        assert t.grad.abs().sum() > 0, name
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_a_cache_under_autograd_keeps_values_and_backward_works():
    layer = make(torch.float32)
    cache = layer.allocate_state(1)
    layer(torch.randn(1, 4, D_MODEL), cache=cache).sum().backward()
    out = layer(torch.randn(1, 3, D_MODEL), cache=cache).sum() + layer(torch.randn(1, 2, D_MODEL), cache=cache).sum()
    out.backward()
    assert not any(t.requires_grad for t in cache.tensors().values())
    assert layer.in_proj.weight.grad.abs().sum() > 0


def _model(pattern, **mamba3):
    cfg = ModelConfig(vocab_size=40, d_model=D_MODEL, n_layer=3, layer_pattern=pattern,
                      mamba3=Mamba3Config(**({"d_state": 8, "headdim": 16, "chunk_size": 8} | mamba3)),
                      mamba2=Mamba2Config(d_state=8, headdim=16, chunk_size=8))
    torch.manual_seed(0)
    return LanguageModel(cfg)


def test_language_model_with_mamba3_layers(tmp_path):
    model = _model("32", is_mimo=True, mimo_rank=2)
    assert [type(b.mixer).__name__ for b in model.layers] == ["Mamba3", "Mamba2", "Mamba3"]
    assert {"layers.0.mixer.B_bias", "layers.0.mixer.mimo_o", "layers.2.mixer.in_proj.weight"} <= set(model.state_dict())
    ids = torch.randint(0, 40, (2, 11))
    out = model(ids, labels=ids)
    cache = model.allocate_cache(2)
    steps = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(11)], 1)
    assert_close(steps, out.logits, rtol=1e-5, atol=0, name="decoded logits")
    cache.save(tmp_path / "cache.safetensors")
    loaded = ModelCache.load(tmp_path / "cache.safetensors")
    assert isinstance(loaded.states[0], Mamba3State) and torch.equal(loaded.states[0].last_B, cache.states[0].last_B)
    assert ModelConfig.from_dict(model.config.to_dict()) == model.config
    model.save_pretrained(tmp_path / "ckpt")
    again = LanguageModel.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(again(ids).logits, model(ids).logits)


def test_mamba3_config_validation():
    with pytest.raises(ValueError, match="mamba3.rope_fraction"):
        _model("3", rope_fraction=0.75)
    with pytest.raises(ValueError, match="mamba3.headdim=24"):
        _model("3", headdim=24)
    with pytest.raises(ValueError, match="mamba3.A_floor"):
        _model("3", A_floor=0.0)
    with pytest.raises(ValueError, match="mamba3.mimo_rank must be an int"):
        _model("3", mimo_rank=2.0)
    # Unused mixer settings are not validated, as for the other mixers.
    ModelConfig(vocab_size=40, d_model=D_MODEL, n_layer=1, layer_pattern="2", mamba3=Mamba3Config(headdim=24))


@pytest.mark.parametrize("eps_C", [1e-5, 0.3])  # equal eps: one norm call over B and C side by side; apart: two
@pytest.mark.parametrize("settings", [{}, {"ngroups": 2, "is_mimo": True, "mimo_rank": 2}])
def test_B_and_C_norms_keep_their_own_weight_and_eps(settings, eps_C):
    layer = make(F64, **settings)
    with torch.no_grad():  # distinct weights: a mix-up of B's and C's (or of their copies) shows
        layer.B_norm.weight.copy_(torch.rand_like(layer.B_norm.weight) + 0.5)
        layer.C_norm.weight.copy_(-torch.rand_like(layer.C_norm.weight) - 0.5)
    layer.C_norm.eps = eps_C
    u = torch.randn(2, 5, D_MODEL, dtype=F64) * 5
    _, inputs = layer._project(u)
    parts = layer.in_proj(u).split(layer.split_sizes, dim=-1)
    shape = (layer.mimo_rank, layer.ngroups, layer.d_state)
    for name, raw, norm in (("B", parts[2], layer.B_norm), ("C", parts[3], layer.C_norm)):
        v = raw.unflatten(-1, shape)
        assert_close(inputs[name], v / v.pow(2).mean(-1, keepdim=True).add(norm.eps).sqrt() * norm.weight, name=name)
    # Each weight's gradient is its own block's (summed over ranks and groups).
    gB, gC = torch.randn_like(inputs["B"]), torch.randn_like(inputs["C"])
    got = torch.autograd.grad((inputs["B"] * gB).sum() + (inputs["C"] * gC).sum(),
                              [layer.B_norm.weight, layer.C_norm.weight])
    for g_got, raw, norm, g in zip(got, parts[2:4], (layer.B_norm, layer.C_norm), (gB, gC)):
        v = raw.detach().unflatten(-1, shape)
        want = (g * v / v.pow(2).mean(-1, keepdim=True).add(norm.eps).sqrt()).sum((0, 1, 2, 3))
        assert_close(g_got, want, name="weight grad")


@pytest.mark.parametrize("settings", [{"ngroups": 2, "rope_fraction": 1.0},
                                      {"is_outproj_norm": True, "decay_activation": "softplus", "eps_C": 0.3}])
def test_folded_projection_equals_the_unfolded_route(monkeypatch, settings):
    """Single input: mamba3_scan_from_projection (FOLD_PROJECTION, the default) against _project then mamba3_scan
    (the switch off), in float64 on the CPU: outputs, the cache after a prefill from an initial state with
    documents, and the gradients of the input, every parameter and the initial state; both ways of the switch."""
    import ssmkit.layers.mamba3 as mamba3_layer

    settings = dict(settings)
    eps_C = settings.pop("eps_C", None)
    layer = make(F64, **settings)
    if eps_C is not None:
        layer.C_norm.eps = eps_C
    u = torch.randn(2, 11, D_MODEL, dtype=F64)
    seq_idx = torch.tensor([[0] * 4 + [1] * 7, [0] * 11])
    init = layer.allocate_state(2)
    for t in init.tensors().values():
        t.copy_(torch.randn_like(t))

    def run(fold: bool):
        monkeypatch.setattr(mamba3_layer, "FOLD_PROJECTION", fold)
        layer.zero_grad(set_to_none=True)
        x = u.clone().requires_grad_()
        state = Mamba3State(**{k: v.clone().requires_grad_() for k, v in init.tensors().items()})
        out = layer(x, seq_idx=seq_idx, initial_state=state)
        cache = Mamba3State(**{k: v.clone() for k, v in init.tensors().items()})
        with torch.no_grad():
            layer(u, seq_idx=seq_idx, cache=cache)
        (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum().backward()
        grads = {"x": x.grad} | {k: p.grad for k, p in layer.named_parameters()}
        grads |= {f"initial {k}": v.grad for k, v in state.tensors().items()}
        return out.detach(), cache, grads

    (got, got_cache, got_grads), (want, want_cache, want_grads) = run(True), run(False)
    assert_close(got, want, F64, name="out")
    for name, t in got_cache.tensors().items():
        assert_close(t, want_cache.tensors()[name], F64, name=f"cache {name}")
    assert got_grads.keys() == want_grads.keys()
    for name, g in got_grads.items():
        assert g is not None and want_grads[name] is not None, name
        assert_close(g, want_grads[name], F64, name=f"grad {name}")
