"""The rows of the engine's batched decode: every request's cache and decode settings, packed as one batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ssmkit.generation.decode import DecodeState
from ssmkit.generation.sampling import (
    RowGenerators,
    RowSampling,
    SamplingKinds,
    SamplingParams,
)
from ssmkit.models.cache import ModelCache


class SlotCache:
    """Many batch-1 requests packed as the rows of one batched decode state, which a step updates in place.

    Per row: every layer's cache state, the last token (the next step's input), the sampling settings
    (:class:`RowSampling`), the random stream (seed and draws made) and the seen-token mask of the
    repetition penalty. Rows are dense: ``add`` appends a row, ``remove(i)`` moves the last row into row
    ``i``. With ``capacity=None`` the storage grows by doubling and is released when the last row leaves;
    with a capacity it is allocated at the first ``add`` and kept, so its addresses never change (a CUDA
    graph captured on its rows replays on them). A row beyond ``size`` is free: whatever a padded step
    leaves there is overwritten, every tensor of it, when a request takes the row.

    vocab: the padded vocabulary size (width of the seen-token mask).
    """

    def __init__(self, vocab: int, capacity: int | None = None) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.vocab = vocab
        self.fixed_capacity = capacity
        self._types: list[type] = []
        self._store: list[dict[str, torch.Tensor]] = []
        self.tokens = self.seeds = self.draws = self.seen = torch.empty(0)
        self.sampling: RowSampling | None = None
        self.params: list[SamplingParams] = []
        self._kinds: SamplingKinds | None = None  # of ``params``, until a row joins or leaves
        self.size = 0

    @property
    def capacity(self) -> int:
        return self.tokens.shape[0]

    def _row_tensors(self) -> list[torch.Tensor]:
        """Every tensor whose first dimension is the row."""
        assert self.sampling is not None
        cache = [t for store in self._store for t in store.values()]
        return [*cache, self.tokens, self.seeds, self.draws, self.seen, *self.sampling.tensors()]

    def add(self, cache: ModelCache, token: int = 0, params: SamplingParams | None = None,
            generator: RowGenerators | None = None, seen: torch.Tensor | None = None) -> int:
        """Copy a batch-1 ``cache`` into a new row with the request's last ``token``, its settings, its
        random stream (None: greedy) and its (1, vocab) seen-token mask (None: the penalty is off); returns
        the row."""
        return self.add_many([(cache, token, params, generator, seen)])[0]

    def add_many(self, rows: Sequence[tuple[ModelCache, int, SamplingParams | None, RowGenerators | None,
                                            torch.Tensor | None]]) -> list[int]:
        """:meth:`add` for several requests at once, (cache, token, params, generator, seen) each: one copy
        per stored tensor for all of them (a GPU launch costs the host more than the bytes cost the device).
        Returns their rows (consecutive)."""
        if not rows:
            return []
        if any(cache.batch_size != 1 for cache, *_ in rows):
            raise ValueError("SlotCache rows come from batch-1 caches")
        n, first = len(rows), self.size
        while first + n > self.capacity:
            if self.fixed_capacity is not None and self.capacity:
                raise RuntimeError(f"{n} more rows do not fit: {self.size} of all {self.capacity} rows are in use")
            self._grow(rows[0][0])
        assert self.sampling is not None
        new = slice(first, first + n)
        for layer, store in enumerate(self._store):
            for name, target in store.items():
                parts = [cache.states[layer].tensors()[name] for cache, *_ in rows]
                target[new].copy_(parts[0] if n == 1 else torch.cat(parts))
        device = self.tokens.device
        self.tokens[new].copy_(host_to_device(torch.tensor([token for _, token, *_ in rows]), device))
        params = [p or SamplingParams(temperature=0) for _, _, p, _, _ in rows]
        for target, values in zip(self.sampling.tensors(), RowSampling.of(params, device).tensors()):
            target[new].copy_(values)
        generators = [g for *_, g, _ in rows]
        if any(g is not None for g in generators):
            zero = torch.zeros(1, dtype=torch.long, device=device)
            self.seeds[new].copy_(torch.cat([zero if g is None else g.seeds[:1] for g in generators]))
            self.draws[new].copy_(torch.cat([zero if g is None else g.draws[:1] for g in generators]))
        else:
            self.seeds[new], self.draws[new] = 0, 0
        seens = [seen for *_, seen in rows]
        if any(seen is not None for seen in seens):
            none = torch.zeros(1, self.vocab, dtype=torch.bool, device=device)
            self.seen[new].copy_(torch.cat([none if seen is None else seen[:1] for seen in seens]))
        else:
            self.seen[new] = False
        self.params.extend(params)
        self._kinds = None
        self.size += n
        return list(range(first, first + n))

    def _grow(self, like: ModelCache) -> None:
        capacity = self.fixed_capacity or max(1, 2 * self.capacity)
        device = next(iter(like.states[0].tensors().values())).device
        new = [{name: t.new_zeros(capacity, *t.shape[1:]) for name, t in s.tensors().items()} for s in like.states]
        sampling = RowSampling.empty(capacity, device)
        tokens = torch.zeros(capacity, dtype=torch.long, device=device)
        seeds, draws = torch.zeros_like(tokens), torch.zeros_like(tokens)
        seen = torch.zeros(capacity, self.vocab, dtype=torch.bool, device=device)
        if self.size:
            grown = [*(t for store in new for t in store.values()), tokens, seeds, draws, seen, *sampling.tensors()]
            for old, t in zip(self._row_tensors(), grown):
                t[: self.size].copy_(old[: self.size])
        self._types = [type(s) for s in like.states]
        self._store, self.sampling = new, sampling
        self.tokens, self.seeds, self.draws, self.seen = tokens, seeds, draws, seen

    def remove(self, row: int, keep: bool) -> ModelCache | None:
        """Take ``row`` out (returned as a batch-1 cache when ``keep``); the last row moves into its place."""
        if not 0 <= row < self.size:
            raise IndexError(f"row {row} is not in use (size {self.size})")
        taken = self.row_cache(row) if keep else None
        last = self.size - 1
        if row != last:
            for t in self._row_tensors():
                t[row].copy_(t[last])
            self.params[row] = self.params[last]
        self._shrink(1)
        return taken

    def remove_many(self, rows: Sequence[int], keep: Sequence[bool]) -> tuple[list[ModelCache | None], dict[int, int]]:
        """Take several rows out at once: the caches of those with ``keep`` (else None), in order, and where
        the rows that moved went ({old row: new row}): the last rows in use fill the holes, with two copies
        per stored tensor for all of them."""
        if len(set(rows)) != len(rows) or any(not 0 <= r < self.size for r in rows):
            raise IndexError(f"rows {list(rows)} are not distinct rows in use (size {self.size})")
        if len(rows) == 1:
            last = self.size - 1
            taken = self.remove(rows[0], keep[0])
            return [taken], ({} if rows[0] == last else {last: rows[0]})
        taken = [self.row_cache(r) if k else None for r, k in zip(rows, keep)]
        size = self.size - len(rows)
        gone = set(rows)
        holes = sorted(r for r in rows if r < size)
        movers = [r for r in range(size, self.size) if r not in gone]
        if holes:
            device = self.tokens.device
            src = host_to_device(torch.tensor(movers), device)
            dst = host_to_device(torch.tensor(holes), device)
            for t in self._row_tensors():
                t.index_copy_(0, dst, t.index_select(0, src))
            for a, b in zip(movers, holes):
                self.params[b] = self.params[a]
        self._shrink(len(rows))
        return taken, dict(zip(movers, holes))

    def _shrink(self, n: int) -> None:
        del self.params[self.size - n:]
        self._kinds = None
        self.size -= n
        if self.size == 0 and self.fixed_capacity is None:
            self._types, self._store, self.sampling = [], [], None
            self.tokens = self.seeds = self.draws = self.seen = torch.empty(0)

    def row_cache(self, row: int) -> ModelCache:
        """A batch-1 copy of one row's cache."""
        return ModelCache([tp(**{n: t[row:row + 1].clone() for n, t in store.items()})
                           for tp, store in zip(self._types, self._store)])

    def view(self, rows: int | None = None) -> ModelCache:
        """A cache of the first ``rows`` rows (default: those in use) whose tensors are views of the storage
        (a forward writes through)."""
        rows = self.size if rows is None else rows
        return ModelCache([tp(**{n: t[:rows] for n, t in store.items()}) for tp, store in zip(self._types, self._store)])

    def write_back(self, view: ModelCache) -> None:
        """Copy into the storage any state tensor a forward replaced instead of updating in place."""
        for store, state in zip(self._store, view.states):
            for name, t in state.tensors().items():
                target = store[name][: t.shape[0]]
                if t.data_ptr() != target.data_ptr():
                    target.copy_(t)

    def kinds(self) -> SamplingKinds:
        """The sampling steps the rows in use need."""
        if self._kinds is None:
            self._kinds = SamplingKinds.of(self.params)
        return self._kinds

    def decode_state(self, rows: int, kinds: SamplingKinds, vocab_size: int) -> DecodeState:
        """The decode state of the first ``rows`` rows (views of the storage: a step updates the rows' caches,
        draw counters and seen masks in place); ``kinds`` says which sampling steps it runs."""
        generators = RowGenerators(self.seeds[:rows], self.draws[:rows]) if kinds.sample else None
        assert self.sampling is not None
        device = self.tokens.device
        return DecodeState(self.view(rows), self.sampling.head(rows, kinds), vocab_size, generators,
                           torch.zeros(0, dtype=torch.long, device=device),
                           torch.zeros(rows, dtype=torch.bool, device=device),
                           self.seen[:rows] if kinds.penalty else None)


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory without waiting for the device (a plain
    copy waits for every kernel queued, e.g. the decode step in flight)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
