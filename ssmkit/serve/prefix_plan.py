"""How one request uses the prefix-state cache (:mod:`ssmkit.serve.prefix_cache`): where it resumes, where it
snapshots, and whether the prompt it waits for (its leader) has been read."""

from __future__ import annotations

import dataclasses
import weakref
from typing import Protocol

import torch

from ssmkit.models.cache import ModelCache
from ssmkit.serve.prefix_keys import PrefixKeys


class PlanOwner(Protocol):
    """What a plan needs of the cache that made it (:class:`ssmkit.serve.prefix_cache.PrefixCache`)."""

    def release(self, plan: PrefixPlan) -> None: ...

    def store(self, keys: PrefixKeys, position: int, cache: ModelCache, logits: torch.Tensor | None = None,
              owned: bool = False) -> None: ...


@dataclasses.dataclass(eq=False)
class PrefixPlan:
    """How one request uses the cache: resume at ``start`` from ``cache`` (None: the zero state), and
    snapshot at ``points`` (ascending, > start, < len(ids)) and at the prompt's end. With ``start ==
    len(ids)`` the whole prompt was read before: ``logits`` (1, V) are those after its last token."""

    keys: PrefixKeys
    start: int
    cache: ModelCache | None
    points: list[int]
    owner: PlanOwner
    logits: torch.Tensor | None = None
    leader: weakref.ref[PrefixPlan] | None = None  # set on a plan that should wait for this one (not read)
    released: bool = False

    def leader_done(self) -> bool:
        """For a waiting plan: True once its leader has read its prompt (or ended)."""
        leader = None if self.leader is None else self.leader()
        return leader is None or leader.released

    def release(self) -> None:
        """This request has read its prompt (or ended): prompts waiting for it may go on."""
        if not self.released:
            self.released = True
            self.owner.release(self)

    def next_stop(self, read: int) -> int:
        """Where the prefill chunk starting at ``read`` must end at the latest (a snapshot point or the end)."""
        for p in self.points:
            if p > read:
                return p
        return len(self.keys.ids)

    def snapshot(self, position: int, cache: ModelCache, logits: torch.Tensor | None = None,
                 owned: bool = False) -> None:
        """Keep a copy of ``cache`` (the state after ``position`` tokens), if it is a snapshot point or the end
        (then with ``logits``, (1, V), those after the last token). ``owned``: the caller never changes ``cache``
        again, so it is kept as it is."""
        if position == len(self.keys.ids) or position in self.points:
            self.owner.store(self.keys, position, cache, logits if position == len(self.keys.ids) else None, owned)
