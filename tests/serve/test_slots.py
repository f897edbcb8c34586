"""SlotCache: rows move densely, a view writes through to the storage."""

from __future__ import annotations

import pytest
import torch

from ssmkit.serve.slots import SlotCache

from .conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_slot_cache_rows_move_and_write_through(model):
    caches = []
    for i in range(3):
        c = model.allocate_cache(1)
        for s in c.states:
            for t in s.tensors().values():
                t.normal_()
        caches.append(c)
    slots = SlotCache()
    assert [slots.add(c) for c in caches] == [0, 1, 2] and slots.capacity == 4
    taken = slots.remove(1, keep=True)
    for mine, theirs in zip(taken.states, caches[1].states):
        assert all(torch.equal(a, b) for a, b in zip(mine.tensors().values(), theirs.tensors().values()))
    # The last row moved into the hole.
    row1 = slots.row_cache(1)
    for mine, theirs in zip(row1.states, caches[2].states):
        assert all(torch.equal(a, b) for a, b in zip(mine.tensors().values(), theirs.tensors().values()))
    view = slots.view()
    assert view.batch_size == 2
    view.states[0].ssm.fill_(3.0)
    assert bool((slots.row_cache(0).states[0].ssm == 3).all())
    with pytest.raises(IndexError):
        slots.remove(2, keep=False)
