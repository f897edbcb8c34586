"""The prefill scheduler: a token budget per turn, oldest first, fresh short prompts batched, nobody starved."""

from __future__ import annotations

import pytest

from ssmkit.serve.prefill import Reading, schedule_prefill


def reading(key, length, read=0, stop=None, fresh=None):
    return Reading(key, read, length, length if stop is None else stop, read == 0 if fresh is None else fresh)


def test_budget_oldest_first_and_chunks():
    turn = schedule_prefill([reading("long", 1000), reading("b", 300, fresh=False), reading("c", 50, fresh=False)],
                            budget=512, chunk=256, max_together=8)
    # The oldest reads a chunk, the next what is left of the budget, the third nothing this turn.
    assert turn.chunks == [("long", 256), ("b", 256)] and turn.tokens == 512
    assert not turn.together and not turn.ready


def test_chunks_end_at_snapshot_points_and_ready_prompts_read_nothing():
    turn = schedule_prefill([reading("hit", 40, read=40), reading("snap", 1000, read=100, stop=130)],
                            budget=512, chunk=256, max_together=8)
    assert turn.ready == ["hit"] and turn.chunks == [("snap", 130)] and turn.tokens == 30


def test_fresh_short_prompts_are_read_together_within_the_budget():
    prompts = [reading(i, n) for i, n in enumerate((10, 30, 20, 30, 5))]
    turn = schedule_prefill(prompts, budget=100, chunk=64, max_together=8)
    # Padded to the longest: 1 x 10, then 2 x 30 = 60, 3 x 30 = 90; a fourth row (120) does not fit,
    # so prompt 3 reads the 10 tokens left as a chunk.
    assert turn.together == [0, 1, 2] and turn.chunks == [(3, 10)] and turn.tokens == 100
    assert schedule_prefill(prompts, budget=100, chunk=64, max_together=2).together == [0, 1]
    # A batch of one is a plain chunk; prompts longer than a chunk are never batched.
    turn = schedule_prefill([reading("a", 10), reading("big", 500)], budget=600, chunk=256, max_together=8)
    assert turn.together == [] and turn.chunks == [("big", 256), ("a", 10)]


def test_invalid_budget():
    with pytest.raises(ValueError):
        schedule_prefill([], budget=0, chunk=1, max_together=1)


@pytest.mark.parametrize("budget,chunk", [(16, 16), (64, 16), (7, 100)])
def test_every_prompt_finishes_and_none_waits_behind_newer_ones(budget, chunk):
    """Simulated turns with prompts arriving over time: the budget holds, every turn makes progress, the
    oldest prompt is always served, and every prompt finishes."""
    arrivals = {0: [("a", 300)], 1: [("b", 40)], 3: [("c", 5), ("d", 200)], 10: [("e", 1)]}
    state: dict[str, list[int]] = {}
    order: list[str] = []
    finished: list[str] = []
    for turn_no in range(10_000):
        for key, length in arrivals.get(turn_no, []):
            state[key] = [0, length]
            order.append(key)
        live = [k for k in order if k not in finished]
        if not live and turn_no > max(arrivals):
            break
        turn = schedule_prefill([Reading(k, state[k][0], state[k][1], state[k][1], fresh=False) for k in live],
                                budget, chunk, max_together=1)
        assert turn.tokens <= budget and (turn.tokens > 0 or not live)
        assert all(end - state[k][0] <= chunk for k, end in turn.chunks)
        assert not live or turn.chunks[0][0] == live[0]  # the oldest is always served
        for key, end in turn.chunks:
            state[key][0] = end
            if end == state[key][1]:
                finished.append(key)
    assert sorted(finished) == sorted(order)
    if budget <= chunk:  # the oldest takes the whole budget: first come, first served
        assert finished == order
