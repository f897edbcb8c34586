"""DiffusionBackbone: shapes for every mixer, patchify round trip, tokens that see the whole image,
class and time conditioning reaching the output, input checks."""

from __future__ import annotations

import pytest
import torch

from ssmkit.models.dis import MIXERS, DiffusionBackbone, DiSConfig, timestep_embedding


def tiny(mixer: str, **kw) -> DiffusionBackbone:
    torch.manual_seed(0)
    return DiffusionBackbone(DiSConfig(image_size=8, patch_size=2, d_model=16, depth=3, mixer=mixer, d_state=4,
                                       headdim=8, num_heads=2, **kw))


@pytest.mark.parametrize("mixer", MIXERS)
def test_shapes_and_skips(mixer):
    net = tiny(mixer, ff_width=8)
    assert len(net.in_blocks) == len(net.out_blocks) == len(net.skip_proj) == 1 and len(net.mid_blocks) == 1
    x = torch.randn(3, 1, 8, 8)
    out = net(x, torch.tensor([0, 5, 999]), torch.tensor([0, 9, 10]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_patchify_round_trip_and_order():
    net = tiny("attention")
    x = torch.arange(64.0).view(1, 1, 8, 8)
    patches = net.patchify(x)
    assert patches.shape == (1, 16, 4)
    assert patches[0, 1].tolist() == [2.0, 3.0, 10.0, 11.0]  # second patch of the first row
    assert torch.equal(net.unpatchify(patches), x)


def test_zero_decoder_starts_at_zero():
    out = tiny("mamba")(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([3, 4]))
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("mixer", ["mamba", "mamba2", "s4d", "attention"])
def test_first_patch_reads_the_last_patch_and_the_condition(mixer):
    net = tiny(mixer).double()
    torch.nn.init.normal_(net.decoder.weight, std=0.1)
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    out = net(x, torch.tensor([10]), torch.tensor([3]))
    out[0, 0, :2, :2].sum().backward()  # the first patch's output
    assert x.grad[0, 0, 6:, 6:].abs().sum() > 0  # depends on the last patch
    with torch.no_grad():
        other_class = net(x, torch.tensor([10]), torch.tensor([4]))
        other_time = net(x, torch.tensor([500]), torch.tensor([3]))
    assert not torch.allclose(out, other_class) and not torch.allclose(out, other_time)


def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0, 7]), 6)
    assert emb.shape == (2, 6)
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    assert torch.allclose(emb[1, 0], torch.cos(torch.tensor(7.0)))
    assert timestep_embedding(torch.tensor([3]), 5).shape == (1, 5)


def test_bad_inputs_and_configs():
    net = tiny("attention")
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(2, 1, 6, 6), torch.tensor([1, 2]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="labels in"):
        net(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([1, 11]))
    with pytest.raises(ValueError, match="t and y"):
        net(torch.randn(2, 1, 8, 8), torch.tensor([1]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="must divide"):
        DiSConfig(image_size=28, patch_size=3)
    with pytest.raises(ValueError, match="mixer"):
        DiSConfig(mixer="lstm")
