"""The training batch order: shuffled per epoch from a seed, split across ranks and micro-batches, resumable.

A *global batch* is what one optimiser step sees, summed over every rank and accumulation micro-batch, so
changing the number of processes or of accumulation steps changes how the work is split, not the maths.
The order of epoch ``e`` is a pure function of ``(seed, e)``; the position ``(epoch, step)`` is all a
checkpoint needs to continue exactly where it stopped.
"""

from __future__ import annotations

import numpy as np
import torch

from ssmkit.data.packing import Batch, BucketedRows, PackedRows


class BatchLoader:
    """Endless iterator over global batches; ``next()`` returns this rank's micro-batches of one step.

    Example::

        loader = BatchLoader(PackedRows(stream, 512), batch_size=16, seed=0, micro_batches=2)
        micro = loader.next()          # 2 Batches of 8 rows each
        state = loader.state_dict()    # {"epoch": 0, "step": 1}
    """

    def __init__(
        self,
        rows: PackedRows | BucketedRows,
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        micro_batches: int = 1,
    ) -> None:
        per_micro, rest = divmod(batch_size, world_size * micro_batches)
        if rest or per_micro == 0:
            raise ValueError(
                f"train.batch_size ({batch_size}) must be a multiple of world size ({world_size}) x "
                f"train.grad_accum ({micro_batches})"
            )
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.micro_batches = micro_batches
        self.epoch = 0
        self.step = 0
        # Shuffled units: single rows when packing, whole length buckets when bucketing.
        if isinstance(rows, PackedRows):
            self._units = np.arange(len(rows))[:, None]
        else:
            # A short last bucket would not split evenly across ranks and micro-batches.
            full = [u for u in rows.units(batch_size) if len(u) == batch_size]
            self._units = np.stack(full) if full else np.zeros((0, batch_size), dtype=np.int64)
        self.steps_per_epoch = self._units.size // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training data makes {len(rows)} rows of up to {rows.seq_len} tokens, fewer than one "
                f"batch of {batch_size}: add data or lower train.batch_size / data.seq_len"
            )
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        """Rows of the current epoch in visiting order."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(len(self._units), generator=g).numpy()
        return self._units[perm].reshape(-1)

    def next(self) -> list[Batch]:
        """This rank's micro-batches of the next global batch."""
        if self._order is None:
            self._order = self._epoch_order()
        start = self.step * self.batch_size
        rows = self._order[start:start + self.batch_size]
        per_rank = self.batch_size // self.world_size
        mine = rows[self.rank * per_rank:(self.rank + 1) * per_rank]
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step, self._order = self.epoch + 1, 0, None
        return [self.rows.batch(part) for part in np.split(mine, self.micro_batches)]

    def state_dict(self) -> dict[str, int]:
        """The position: epoch and step within it (plus the seed, checked on load)."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by :meth:`state_dict` with the same data and seed."""
        if state["seed"] != self.seed or state["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(
                f"checkpoint data position does not fit this data: saved seed {state['seed']} / "
                f"{state['steps_per_epoch']} steps per epoch, now {self.seed} / {self.steps_per_epoch} "
                f"(the data files, seq_len, batching or batch size changed)"
            )
        self.epoch, self.step, self._order = state["epoch"], state["step"], None


def eval_batches(rows: PackedRows | BucketedRows, index: np.ndarray, batch_size: int, *, rank: int = 0,
                 world_size: int = 1):
    """The rows ``index``, ``batch_size`` at a time, as ``(batch, counted)`` pairs.

    Rank ``r`` takes every world_size-th batch. All ranks get the same number of batches, because under
    FSDP every forward is a collective: a rank that has run out repeats its first batch with
    ``counted=False``. Bucketed rows are visited longest first, so batches hold similar lengths.
    """
    if isinstance(rows, BucketedRows):
        index = index[np.argsort(-rows.row_lengths[index], kind="stable")]
    starts = list(range(0, len(index), batch_size))
    rounds = -(-len(starts) // world_size)
    for i in range(rounds):
        k = i * world_size + rank
        counted = k < len(starts)
        start = starts[k] if counted else 0
        yield rows.batch(index[start:start + batch_size]), counted
