"""A batched cache whose rows are independent requests: rows join and leave between decode steps."""

from __future__ import annotations

import torch

from ssmkit.models.cache import ModelCache


class SlotCache:
    """Many batch-1 caches packed as the rows of one batched cache, which a forward updates in place.

    Rows are dense: ``add`` appends a row, ``remove(i)`` moves the last row into row ``i``. Storage grows by
    doubling and is released when the last row leaves.
    """

    def __init__(self) -> None:
        self._types: list[type] = []
        self._store: list[dict[str, torch.Tensor]] = []
        self.size = 0

    @property
    def capacity(self) -> int:
        return next(iter(self._store[0].values())).shape[0] if self._store else 0

    def add(self, cache: ModelCache) -> int:
        """Copy a batch-1 ``cache`` into a new row; returns the row."""
        if cache.batch_size != 1:
            raise ValueError(f"SlotCache rows come from batch-1 caches, got batch size {cache.batch_size}")
        if self.size == self.capacity:
            self._grow(cache)
        for store, state in zip(self._store, cache.states):
            for name, t in state.tensors().items():
                store[name][self.size].copy_(t[0])
        self.size += 1
        return self.size - 1

    def _grow(self, like: ModelCache) -> None:
        capacity = max(1, 2 * self.capacity)
        new = [{name: t.new_zeros(capacity, *t.shape[1:]) for name, t in s.tensors().items()} for s in like.states]
        for old, grown in zip(self._store, new):
            for name, t in old.items():
                grown[name][: self.size].copy_(t[: self.size])
        self._types = [type(s) for s in like.states]
        self._store = new

    def remove(self, row: int, keep: bool) -> ModelCache | None:
        """Take ``row`` out (returned as a batch-1 cache when ``keep``); the last row moves into its place."""
        if not 0 <= row < self.size:
            raise IndexError(f"row {row} is not in use (size {self.size})")
        taken = self.row_cache(row) if keep else None
        last = self.size - 1
        if row != last:
            for store in self._store:
                for t in store.values():
                    t[row].copy_(t[last])
        self.size -= 1
        if self.size == 0:
            self._types, self._store = [], []
        return taken

    def row_cache(self, row: int) -> ModelCache:
        """A batch-1 copy of one row."""
        return ModelCache([tp(**{n: t[row:row + 1].clone() for n, t in store.items()})
                           for tp, store in zip(self._types, self._store)])

    def view(self) -> ModelCache:
        """A cache of the rows in use whose tensors are views of the storage (a forward writes through)."""
        return ModelCache([tp(**{n: t[: self.size] for n, t in store.items()})
                           for tp, store in zip(self._types, self._store)])

    def write_back(self, view: ModelCache) -> None:
        """Copy into the storage any state tensor a forward replaced instead of updating in place."""
        for store, state in zip(self._store, view.states):
            for name, t in state.tensors().items():
                target = store[name][: self.size]
                if t.data_ptr() != target.data_ptr():
                    target.copy_(t)
