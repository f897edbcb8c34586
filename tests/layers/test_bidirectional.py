"""Bidirectional mixers: each output position reads the whole row, both directions have their own weights,
and packed documents stay apart."""

from __future__ import annotations

import pytest
import torch

from ssmkit.layers import S4D, Mamba, Mamba2
from ssmkit.layers.bidirectional import Bidirectional, SelfAttention
from ssmkit.testing import assert_close


def _mixers():
    torch.manual_seed(0)
    return {
        "mamba": Bidirectional(Mamba(16, d_state=4), Mamba(16, d_state=4)),
        "mamba2": Bidirectional(Mamba2(16, d_state=8, headdim=8, chunk_size=8),
                                Mamba2(16, d_state=8, headdim=8, chunk_size=8)),
        "s4d": Bidirectional(S4D(16, d_state=8), S4D(16, d_state=8)),
        "attention": SelfAttention(16, num_heads=2),
    }


def _dependence(mixer, length=9, position=4):
    """|d y[position] / d x[j]| summed over channels, for every j."""
    x = torch.randn(1, length, 16, dtype=torch.float64, requires_grad=True)
    mixer.double()(x)[0, position].sum().backward()
    return x.grad[0].abs().sum(-1)


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "s4d", "attention"])
def test_a_position_reads_the_past_and_the_future(kind):
    grad = _dependence(_mixers()[kind])
    assert (grad[:4] > 1e-8).all(), "does not read earlier positions"
    assert (grad[5:] > 1e-8).all(), "does not read later positions"


def test_a_causal_mamba_alone_does_not_read_the_future():
    torch.manual_seed(0)
    grad = _dependence(Mamba(16, d_state=4))
    assert (grad[5:] == 0).all() and (grad[:4] > 0).all()


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "s4d"])
def test_swapping_the_directions_mirrors_the_output(kind):
    mixer = _mixers()[kind].double()
    swapped = Bidirectional(mixer.backward_mixer, mixer.forward_mixer)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    assert_close(swapped(x.flip(1)), mixer(x).flip(1), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["mamba", "s4d", "attention"])
def test_packed_documents_give_the_outputs_of_each_alone(kind):
    mixer = _mixers()[kind].double()
    a, b = torch.randn(1, 5, 16, dtype=torch.float64), torch.randn(1, 7, 16, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7])
    packed = mixer(torch.cat([a, b], 1), seq_idx=seq_idx)
    assert_close(packed, torch.cat([mixer(a), mixer(b)], 1), rtol=1e-7, atol=1e-9)


def test_no_state_and_one_class_of_mixer():
    mixer = _mixers()["mamba"]
    with pytest.raises(ValueError, match="no recurrent state"):
        mixer(torch.randn(1, 3, 16), cache=object())
    with pytest.raises(TypeError, match="one class"):
        Bidirectional(Mamba(16), S4D(16))
    with pytest.raises(ValueError, match="divisor"):
        SelfAttention(16, num_heads=3)
