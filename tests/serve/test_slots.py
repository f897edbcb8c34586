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
    with pytest.raises(RuntimeError, match="of all 3 rows are in use"):
        slots.add(caches[3])
    for _ in range(3):
        slots.remove(0, keep=False)
    slots.add(caches[3])
    assert [t.data_ptr() for t in slots._row_tensors()] == addresses and slots.capacity == 3
    assert_same_cache(slots.row_cache(0), caches[3])


def test_rows_added_and_removed_together_are_those_added_and_removed_one_by_one(model):
    """add_many / remove_many (the engine's joins and leaves of one turn) leave every tensor of every row
    as the one-by-one add / remove do, whichever rows leave, and say where the moved rows went."""
    vocab = model.config.padded_vocab_size
    caches = random_caches(model, 7)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=5), SamplingParams(top_p=0.8),
              SamplingParams(temperature=0, repetition_penalty=1.3), SamplingParams(min_p=0.1)] * 2
    gens = [None if p.greedy else make_generators(20 + i, 1, torch.device("cpu")) for i, p in enumerate(params)]
    seens = [None] * len(params)
    seens[3] = torch.zeros(1, vocab, dtype=torch.bool)
    seens[3][0, 9] = True
    entries = [(c, 100 + i, params[i], gens[i], seens[i]) for i, c in enumerate(caches)]
    one, many = SlotCache(vocab), SlotCache(vocab, capacity=8)
    for e in entries:
        one.add(*e)
    assert many.add_many(entries[:3]) == [0, 1, 2] and many.add_many(entries[3:]) == [3, 4, 5, 6]
    with pytest.raises(RuntimeError, match="do not fit"):
        many.add_many(entries[:2])

    def same_rows(a: SlotCache, b: SlotCache) -> None:
        assert a.size == b.size and a.params == b.params
        for x, y in zip(a._row_tensors(), b._row_tensors()):
            assert torch.equal(x[:a.size], y[:b.size])

    same_rows(one, many)
    leaving, keep = [1, 5, 2], [True, False, True]
    taken, moved = many.remove_many(leaving, keep)
    assert_same_cache(taken[0], caches[1])
    assert_same_cache(taken[2], caches[2])
    assert taken[1] is None
    assert moved == {4: 1, 6: 2}  # rows 4 and 6 remain beyond the new size (4): they fill holes 1 and 2
    for row in sorted(leaving, reverse=True):  # one by one, highest first: the same moves
        one.remove(row, keep=False)
    same_rows(one, many)
    assert many.remove_many([3], [False]) == ([None], {})
    with pytest.raises(IndexError):
        many.remove_many([0, 0], [False, False])
