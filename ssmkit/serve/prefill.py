"""Which prompt tokens the engine reads in one turn: a token budget shared by the requests reading prompts.

Each engine turn reads at most ``budget`` prompt tokens (padding included) and then makes one decode step
for the running requests, so a long prompt arriving never stalls the streams already running: it is
read ``budget`` tokens per turn, between their steps. Requests are served in arrival order (the oldest
first, so none waits behind newer ones forever); one request reads at most ``chunk`` tokens per forward
(bounding prefill memory); fresh short prompts are read together in one left-padded batch while the
padded batch fits the budget (:class:`ssmkit.serve.batching.Engine` reads them as ``generate`` reads a
batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Generic, TypeVar

K = TypeVar("K")


@dataclasses.dataclass(frozen=True)
class Reading(Generic[K]):
    """One request reading its prompt, as the scheduler sees it.

    key: the engine's request; read: prompt tokens read so far; length: prompt tokens; stop: where its next
    chunk must end at the latest (a prefix-cache snapshot point, or ``length``); fresh: from the zero state
    with no snapshot points (it may be read in a left-padded batch).
    """

    key: K
    read: int
    length: int
    stop: int
    fresh: bool


@dataclasses.dataclass
class PrefillTurn(Generic[K]):
    """One turn's work: ``ready`` have nothing left to read (a whole prompt read before), ``together`` are
    read in one left-padded batch (whole prompts), ``chunks`` one by one up to the given end; ``tokens``:
    tokens computed, padding included (at most the budget)."""

    ready: list[K] = dataclasses.field(default_factory=list)
    together: list[K] = dataclasses.field(default_factory=list)
    chunks: list[tuple[K, int]] = dataclasses.field(default_factory=list)
    tokens: int = 0


def schedule_prefill(readings: Sequence[Reading[K]], budget: int, chunk: int, max_together: int) -> PrefillTurn[K]:
    """Plan one turn of prompt reading (``readings`` in arrival order); see the module docstring."""
    if budget < 1 or chunk < 1 or max_together < 1:
        raise ValueError("budget, chunk and max_together must be positive")
    turn: PrefillTurn[K] = PrefillTurn()
    together: list[Reading[K]] = []
    left, widest = budget, 0
    for r in readings:
        if r.read >= r.length:
            turn.ready.append(r.key)
            continue
        if left <= 0:
            continue
        if r.fresh and r.length <= chunk and len(together) < max_together:
            # The batch is as wide as its longest prompt: a longer one widens every row.
            cost = (len(together) + 1) * max(widest, r.length) - len(together) * widest
            if cost <= left:
                together.append(r)
                widest = max(widest, r.length)
                left -= cost
                continue
        n = min(chunk, left, r.stop - r.read)
        turn.chunks.append((r.key, r.read + n))
        left -= n
    if len(together) == 1:  # a batch of one is a chunk
        turn.chunks.append((together[0].key, together[0].length))
    else:
        turn.together = [r.key for r in together]
    turn.tokens = budget - left
    return turn
