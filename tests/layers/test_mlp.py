"""SwiGLU MLP: the formula, transformers' JambaMLP with the same weights, dtypes, bad inputs, NaN."""

import math

import pytest
import torch

from ssmkit.layers.mlp import MLP
from ssmkit.testing import assert_close


def swiglu(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    w = {name: p.detach().double() for name, p in mlp.named_parameters()}
    x = x.double()
    gate, up = x @ w["gate_proj.weight"].T, x @ w["up_proj.weight"].T
    return (gate * torch.sigmoid(gate) * up) @ w["down_proj.weight"].T


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_formula(dtype):
    mlp = MLP(24, 40, dtype=dtype)
    x = torch.randn(3, 7, 24, dtype=dtype)
    y = mlp(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, swiglu(mlp, x), dtype)
    assert_close(mlp(x.view(21, 24)), y.view(21, 24), dtype, name="any leading shape")


def test_names_and_values_match_transformers_jamba_mlp():
    from transformers import JambaConfig
    from transformers.models.jamba.modeling_jamba import JambaMLP

    theirs = JambaMLP(JambaConfig(hidden_size=16, intermediate_size=28, vocab_size=8))
    ours = MLP(16, 28)
    assert set(ours.state_dict()) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 16)
    assert_close(ours(x), theirs(x), torch.float32)


def test_gradcheck():
    mlp = MLP(4, 6, bias=True, dtype=torch.float64)
    assert torch.autograd.gradcheck(mlp, (torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True),))


def test_nan_stays_in_its_position():
    mlp = MLP(8, 12)
    x = torch.randn(2, 5, 8)
    x[1, 2, 0] = math.nan
    y = mlp(x)
    nan = torch.isnan(y).any(-1)
    assert nan[1, 2] and nan.sum() == 1


def test_bad_inputs():
    with pytest.raises(ValueError, match="d_intermediate"):
        MLP(8, 0)
    with pytest.raises(ValueError, match="d_model"):
        MLP(-1, 4)
    mlp = MLP(8, 12)
    with pytest.raises(ValueError, match="d_model=8"):
        mlp(torch.randn(2, 5, 7))
    with pytest.raises(TypeError, match="floating-point"):
        mlp(torch.ones(2, 8, dtype=torch.int64))
