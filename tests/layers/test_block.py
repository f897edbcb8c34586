import pytest
import torch

from ssmkit.layers import Block, Mamba, Mamba2, RMSNorm, RMSNormGated
from ssmkit.testing import assert_close


def rms(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_rms_norm_matches_formula_and_is_not_decayed():
    norm = RMSNorm(16, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    assert_close(norm(x), rms(x, 1e-5) * norm.weight, name="rmsnorm")
    assert norm.weight._no_weight_decay


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_rms_norm_groups(norm_before_gate):
    norm = RMSNormGated(16, eps=1e-5, group_size=8, norm_before_gate=norm_before_gate).double()
    x, z = torch.randn(2, 4, 16, dtype=torch.float64), torch.randn(2, 4, 16, dtype=torch.float64)
    gate = torch.nn.functional.silu(z)
    if norm_before_gate:
        expected = rms(x.unflatten(-1, (2, 8)), 1e-5).flatten(-2) * gate
    else:
        expected = rms((x * gate).unflatten(-1, (2, 8)), 1e-5).flatten(-2)
    assert_close(norm(x, z), expected, name="gated rmsnorm")
    with pytest.raises(ValueError, match="group_size 5 must divide d=16"):
        RMSNormGated(16, group_size=5)


@pytest.mark.parametrize("mixer_cls", [Mamba, Mamba2])
def test_block_is_prenorm_residual(mixer_cls):
    torch.manual_seed(0)
    kw = {"d_state": 8} if mixer_cls is Mamba else {"d_state": 8, "headdim": 16}
    block = Block(32, mixer_cls(32, **kw), norm_eps=1e-5).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    expected = x + block.mixer(rms(x, 1e-5) * block.norm.weight)
    assert_close(block(x), expected, name="block")
    assert block.ff is None and block.ff_norm is None
    assert {n.split(".")[0] for n in block.state_dict()} == {"norm", "mixer"}


def test_residual_stream_stays_float32_under_bfloat16_weights():
    torch.manual_seed(0)
    block = Block(32, Mamba(32, d_state=8)).to(torch.bfloat16)
    x = torch.randn(2, 5, 32).to(torch.bfloat16)
    out = block(x)
    assert out.dtype == torch.float32
    # The residual is carried exactly: out - mixer branch == x, with no bf16 rounding of the sum.
    branch = block.mixer(block.norm(x.float()).to(torch.bfloat16))
    assert torch.equal(out, x.float() + branch.float())
    low = Block(32, Mamba(32, d_state=8), residual_in_fp32=False).to(torch.bfloat16)
    assert low(x).dtype == torch.bfloat16


def test_block_with_feed_forward_slot():
    torch.manual_seed(0)
    ff = torch.nn.Linear(32, 32).double()
    block = Block(32, Mamba(32, d_state=8), ff=ff).double()
    x = torch.randn(1, 4, 32, dtype=torch.float64)
    h = x + block.mixer(block.norm(x))
    assert_close(block(x), h + ff(block.ff_norm(h)), name="block with ff")
    assert "ff_norm.weight" in block.state_dict() and "ff.weight" in block.state_dict()
