"""``ParameterWatch``: every way a model's tensors change is seen, and nothing else counts as a change."""

from __future__ import annotations

import torch
from torch import nn

from ssmkit.generation.param_watch import ParameterWatch


def test_changes_are_seen_once_and_nothing_else_is_a_change():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    model.register_buffer("scale", torch.ones(4))
    watch = ParameterWatch(model)
    assert not watch.changed() and not watch.changed() and watch.walks == 1
    with torch.no_grad():
        model[0].weight.mul_(2)  # in place: the version
    assert watch.changed() and not watch.changed()
    model.scale.add_(1)  # a buffer
    assert watch.changed() and not watch.changed()
    model[0].bias.data = torch.zeros(4)  # storage swapped, version kept
    assert watch.changed() and not watch.changed()
    model[1].weight = nn.Parameter(model[1].weight.detach().clone())  # another parameter
    assert watch.changed() and not watch.changed()
    model[0].weight = nn.Parameter(model[0].weight.data)  # another parameter object on the same storage
    assert watch.changed() and not watch.changed()
    model.append(nn.Linear(4, 4))  # a new submodule
    assert watch.changed() and not watch.changed()
    walks = watch.walks
    nn.Linear(2, 2)  # registrations elsewhere: the list is made again, but nothing changed here
    assert not watch.changed() and watch.walks == walks + 1
    model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})
    assert watch.changed() and not watch.changed()
