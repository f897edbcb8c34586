"""Mamba-3's decay activation (``decay_activation``: mamba_ssm 2.3.2's softplus, or the heavy tail of its main
branch after state-spaces/mamba #962): the function and its gradient against float64 and around 0, the floor,
the layer on every scan backend and in decode steps, and configs/checkpoints (old ones without the field load
as softplus)."""

import json

import pytest
import torch
import torch.nn.functional as F

from ssmkit.layers.mamba3 import DECAY_ACTIVATIONS, Mamba3, decay_rate
from ssmkit.models import LanguageModel, ModelConfig
from ssmkit.models.config import Mamba3Config
from ssmkit.ops.mamba3 import mamba3_scan
from ssmkit.testing import assert_close
from tests.layers.test_mamba3_layer import D_MODEL, _model, make, run_steps

F64 = torch.float64


def upstream_heavy_tail(x):
    """mamba_ssm main's ``heavy_tail_activation``, as written there."""
    return x.clamp_min(0) + torch.reciprocal(1 - x.clamp_max(0))


def test_heavy_tail_values_match_the_formula_and_upstream_bits():
    x = torch.cat([torch.linspace(-50, 50, 2001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, -1e30, 1e30])])
    want = torch.where(x.double() >= 0, 1 + x.double(), 1 / (1 - x.double()))
    A = decay_rate(x, 0.0, "heavy_tail")
    assert A.dtype == torch.float32
    assert_close(-A, want, torch.float32, name="heavy tail")
    # mamba_ssm computes the same float32 values: no difference at all, not just within rounding.
    assert torch.equal(-A, upstream_heavy_tail(x))
    assert torch.equal(-decay_rate(x, 0.0, "softplus"), F.softplus(x))


def test_heavy_tail_is_c1_at_zero_with_gradient_one():
    """f(0) = 1 and f'(0) = 1 from both sides; f'' jumps (0 right, 2 left), so f is C¹ but not C²."""
    x = torch.tensor([-1e-6, -1e-9, 0.0, 1e-9, 1e-6], dtype=F64, requires_grad=True)
    f = -decay_rate(x, 0.0, "heavy_tail")
    (grad,) = torch.autograd.grad(f.sum(), x)
    assert_close(f, torch.ones(5, dtype=F64), rtol=0, atol=2e-6, name="f near 0")
    assert_close(grad, torch.ones(5, dtype=F64), rtol=0, atol=3e-6, name="f' near 0")
    assert grad[2].item() == 1.0  # exactly 0: the derivative, not the 2 of mamba_ssm's two clamps
    h = 1e-3
    second = [(-decay_rate(torch.tensor(v, dtype=F64), 0.0, "heavy_tail")).item() for v in (-2 * h, -h, 0.0, h, 2 * h)]
    assert abs((second[0] - 2 * second[1] + second[2]) / h**2 - 2) < 1e-2  # left: f'' = 2/(1-x)^3 -> 2
    assert abs((second[2] - 2 * second[3] + second[4]) / h**2) < 1e-9  # right: f'' = 0


@pytest.mark.parametrize("activation", DECAY_ACTIVATIONS)
def test_gradient_matches_finite_differences_and_float64(activation):
    # Around 0, on both sides, and far out on both tails; the floor (1e-4) is not reached here.
    x = torch.tensor([-30.0, -3.0, -0.5, -1e-3, -1e-7, 0.0, 1e-7, 1e-3, 0.5, 3.0, 30.0], dtype=F64)
    torch.autograd.gradcheck(lambda t: decay_rate(t, 1e-4, activation), (x.clone().requires_grad_(),),
                             eps=1e-8, atol=1e-6, rtol=1e-6)
    cot = torch.randn(x.shape, dtype=F64)
    grads = []
    for dtype in (torch.float32, torch.bfloat16, F64):
        t = x.to(dtype).requires_grad_()
        (decay_rate(t, 1e-4, activation) * cot.to(torch.float32 if dtype != F64 else F64)).sum().backward()
        grads.append(t.grad.double())
    assert_close(grads[0], grads[2], torch.float32, name="float32 gradient")
    # bf16 dd_A is computed in float32 (as mamba_ssm does): its gradient is the float32 one of the rounded input.
    assert_close(grads[1], grads[2], torch.bfloat16, name="bf16 gradient")


@pytest.mark.parametrize("activation", DECAY_ACTIVATIONS)
def test_floor_holds_and_stops_the_gradient(activation):
    x = torch.tensor([-1e30, -1e6, -2.0, 4.0], requires_grad=True)
    A = decay_rate(x, 0.01, activation)
    assert (A <= -0.01).all() and torch.equal(A[:2], torch.full((2,), -0.01))
    A.sum().backward()
    assert x.grad[0] == 0 and x.grad[1] == 0 and x.grad[3] != 0


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="decay activation"):
        decay_rate(torch.zeros(2), 1e-4, "relu")
    with pytest.raises(ValueError, match="decay_activation"):
        Mamba3(D_MODEL, d_state=8, headdim=16, decay_activation="exp")
    with pytest.raises(ValueError, match="mamba3.decay_activation"):
        _model("3", decay_activation="exp")


def test_the_layer_uses_it_on_every_backend_and_in_decode_steps():
    x = torch.randn(2, 13, D_MODEL, dtype=F64)
    outs = {}
    for activation in DECAY_ACTIVATIONS:
        layer = make(F64, decay_activation=activation)
        assert f"decay_activation={activation}" in repr(layer)
        _, inputs = layer._project(x)
        assert torch.equal(inputs["A"], decay_rate(layer.in_proj(x).split(layer.split_sizes, -1)[5], 1e-4, activation))
        full = layer(x)
        kw = layer._scan_params(layer._project(x)[0])
        for backend in ("reference", "chunked"):
            y = mamba3_scan(**inputs, **kw, chunk_size=8, backend=backend)
            assert_close(layer.out_proj(layer._output(y, layer._project(x)[0])), full, name=f"{activation} {backend}")
        assert_close(run_steps(layer, x, layer.allocate_state(2)), full, rtol=1e-12, atol=0, name="decode steps")
        outs[activation] = full
    # Same weights, other function: the option changes the output.
    assert (outs["softplus"] - outs["heavy_tail"]).abs().max() > 1e-3


def test_configs_default_to_heavy_tail_and_old_ones_load_as_softplus(tmp_path):
    assert Mamba3Config().decay_activation == "heavy_tail"
    assert Mamba3(D_MODEL, d_state=8, headdim=16).decay_activation == "heavy_tail"
    for activation in DECAY_ACTIVATIONS:
        model = _model("3", decay_activation=activation)
        assert model.layers[0].mixer.decay_activation == activation
        again = ModelConfig.from_dict(model.config.to_dict())
        assert again.mamba3.decay_activation == activation
    # A checkpoint written before the option existed has no such key, and meant softplus.
    model = _model("3", decay_activation="softplus")
    model.save_pretrained(tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    data = json.loads(config_file.read_text())
    assert data["config"]["mamba3"].pop("decay_activation") == "softplus"
    config_file.write_text(json.dumps(data))
    loaded = LanguageModel.from_pretrained(tmp_path / "old")
    assert loaded.config.mamba3.decay_activation == "softplus"
    ids = torch.randint(0, 40, (1, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    # A config that names it keeps it; one without a mamba3 section at all is a new model's.
    data["config"]["mamba3"]["decay_activation"] = "heavy_tail"
    assert ModelConfig.from_dict(data["config"]).mamba3.decay_activation == "heavy_tail"
    del data["config"]["mamba3"]
    assert ModelConfig.from_dict(data["config"]).mamba3.decay_activation == "heavy_tail"
