"""The rows of the engine's batched decode: every request's cache and decode settings, packed as one batch."""

from __future__ import annotations

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
        if cache.batch_size != 1:
            raise ValueError(f"SlotCache rows come from batch-1 caches, got batch size {cache.batch_size}")
        if self.size == self.capacity:
            if self.fixed_capacity is not None and self.capacity:
                raise RuntimeError(f"all {self.capacity} rows are in use")
            self._grow(cache)
        row = self.size
        for store, state in zip(self._store, cache.states):
            for name, t in state.tensors().items():
                store[name][row].copy_(t[0])
        params = params or SamplingParams(temperature=0)
        assert self.sampling is not None
        self.tokens[row] = token
        self.sampling.set_row(row, params)
        if generator is None:
            self.seeds[row], self.draws[row] = 0, 0
        else:
            self.seeds[row].copy_(generator.seeds[0])
            self.draws[row].copy_(generator.draws[0])
        if seen is None:
            self.seen[row] = False
        else:
            self.seen[row].copy_(seen[0])
        self.params.append(params)
        self._kinds = None
        self.size += 1
        return row

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
        self.params.pop()
        self._kinds = None
        self.size -= 1
        if self.size == 0 and self.fixed_capacity is None:
            self._types, self._store, self.sampling = [], [], None
            self.tokens = self.seeds = self.draws = self.seen = torch.empty(0)
        return taken

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
