"""SlotCache: rows (cache and decode settings) move densely, a view writes through to the storage."""

from __future__ import annotations

import pytest
import torch

from ssmkit.generation.sampling import SamplingParams, make_generators
from ssmkit.serve.slots import SlotCache

from .conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def random_caches(model, n):
    caches = []
    for _ in range(n):
        c = model.allocate_cache(1)
        for s in c.states:
            for t in s.tensors().values():
                t.normal_()
        caches.append(c)
    return caches


def assert_same_cache(a, b):
    for mine, theirs in zip(a.states, b.states):
        assert all(torch.equal(x, y) for x, y in zip(mine.tensors().values(), theirs.tensors().values()))


def test_slot_cache_rows_move_and_write_through(model):
    caches = random_caches(model, 3)
    vocab = model.config.padded_vocab_size
    slots = SlotCache(vocab)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.5, top_k=3), SamplingParams(top_p=0.9)]
    seen = torch.zeros(1, vocab, dtype=torch.bool)
    seen[0, 7] = True
    gens = [None, make_generators(11, 1, torch.device("cpu")), make_generators(12, 1, torch.device("cpu"))]
    gens[2].draws.fill_(5)
    rows = [slots.add(c, token=40 + i, params=p, generator=g, seen=seen if i == 2 else None)
            for i, (c, p, g) in enumerate(zip(caches, params, gens))]
    assert rows == [0, 1, 2] and slots.capacity == 4
    taken = slots.remove(1, keep=True)
    assert_same_cache(taken, caches[1])
    # The last row moved into the hole, with everything that belongs to it.
    assert_same_cache(slots.row_cache(1), caches[2])
    assert slots.tokens[:2].tolist() == [40, 42] and slots.params == [params[0], params[2]]
    assert slots.seeds[1].item() == 12 and slots.draws[1].item() == 5 and slots.seen[1, 7] and not slots.seen[0].any()
    assert slots.sampling.top_p[1].item() == pytest.approx(0.9) and bool(slots.sampling.greedy[0])
    assert slots.kinds().top_p and slots.kinds().greedy and not slots.kinds().top_k
    view = slots.view()
    assert view.batch_size == 2
    view.states[0].ssm.fill_(3.0)
    assert bool((slots.row_cache(0).states[0].ssm == 3).all())
    with pytest.raises(IndexError):
        slots.remove(2, keep=False)
    slots.remove(0, keep=False)
    slots.remove(0, keep=False)
    assert slots.capacity == 0  # released with the last row


def test_fixed_capacity_keeps_its_addresses(model):
    slots = SlotCache(model.config.padded_vocab_size, capacity=3)
    caches = random_caches(model, 4)
    slots.add(caches[0])
    addresses = [t.data_ptr() for t in slots._row_tensors()]
    slots.add(caches[1])
    slots.add(caches[2])
    with pytest.raises(RuntimeError, match="all 3 rows are in use"):
        slots.add(caches[3])
    for _ in range(3):
        slots.remove(0, keep=False)
    slots.add(caches[3])
    assert [t.data_ptr() for t in slots._row_tensors()] == addresses and slots.capacity == 3
    assert_same_cache(slots.row_cache(0), caches[3])
