"""Several processes through PyTorch's own engine: ``torchrun`` sets the environment, we read it.

    torchrun --nproc_per_node 8 -m ssmkit train --preset mamba2-130m --out runs/x --train.parallel fsdp

DDP keeps a full model per process and averages gradients; FSDP2 (``fully_shard``) shards parameters,
gradients and optimiser state, one unit per residual block plus the root (embedding, final norm, head
stay together so a tied head remains tied). Both average gradients over processes.

Context parallelism (``--train.context_parallel N``) splits each sequence across N consecutive ranks
(:mod:`ssmkit.distributed.context_parallel`); those ranks read the same rows, each its part of the length,
and DDP / FSDP2 still average over every process, which sums the parts' gradients as the loss needs.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ssmkit.data import IGNORE
from ssmkit.data.packing import Batch


@dataclass(frozen=True)
class Dist:
    """Where this process sits: rank, world size, its device and its context-parallel group (if any)."""

    rank: int
    world_size: int
    device: torch.device
    cp_size: int = 1
    cp_group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cp_rank(self) -> int:
        """Which part of each sequence this process holds."""
        return self.rank % self.cp_size

    @property
    def dp_rank(self) -> int:
        """Which share of the batch's rows this process (and its context-parallel group) reads."""
        return self.rank // self.cp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.cp_size


def setup(device: str, context_parallel: int = 1) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1) and pick this process's device.

    ``device`` is 'auto', 'cpu', 'cuda' or 'cuda:N'; under torchrun CUDA processes use cuda:LOCAL_RANK and
    talk through NCCL, CPU processes through gloo. ``context_parallel`` consecutive ranks form a group
    that splits each sequence.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size % context_parallel:
        raise ValueError(f"train.context_parallel ({context_parallel}) must divide the number of processes "
                         f"({world_size}; launch with torchrun --nproc_per_node N)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={device!r} but no CUDA device is available; use --train.device cpu")
        if world_size > 1 or dev.index is None:
            dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if world_size == 1:
        return Dist(0, 1, dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank, cp_group = dist.get_rank(), None
    if context_parallel > 1:
        # new_group is collective: every process creates every group and keeps its own.
        for start in range(0, world_size, context_parallel):
            group = dist.new_group(list(range(start, start + context_parallel)))
            if start <= rank < start + context_parallel:
                cp_group = group
    return Dist(rank, world_size, dev, context_parallel, cp_group)


def teardown(wait_for_all: bool = True) -> None:
    """Leave the process groups (if any): wait for every process, then free the groups here.

    The wait keeps a process from leaving while another still works (rank 0 writes the final model
    after the others are done); skip it when leaving on an error, as the others may never arrive.
    ``destroy_process_group`` only forgets the groups: the DDP wrapper and the context-parallel layers
    keep them alive, often in reference cycles, and a gloo group left for interpreter exit is torn
    down there, with its worker threads still running, which under load can abort the process
    ("terminate called without an active exception"). So the caller drops its references first and
    the collections below free the groups, and join their threads, now.
    """
    if not dist.is_initialized():
        return
    if wait_for_all:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


def parallelize(model: nn.Module, info: Dist, parallel: str) -> nn.Module:
    """Wrap ``model`` for ``info.world_size`` processes: DDP or FSDP2; unchanged for one process."""
    if info.world_size == 1:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


_MIN_PART = 16


def shard_batch(batch: Batch, info: Dist) -> Batch:
    """This process's part of every row of ``batch`` under context parallelism (``batch`` itself without).

    The length is padded at the end to a multiple of the group size, and parts to at least
    ``_MIN_PART`` positions, as a convolution reads the previous part only (padding is scored nowhere
    and, being last, changes no earlier output). ``n_tokens`` stays with the group's first rank, so sums
    over processes count each token once.
    """
    if info.cp_size == 1:
        return batch
    length = batch.input_ids.shape[1]
    pad = max(-(-length // info.cp_size), _MIN_PART) * info.cp_size - length
    input_ids, targets, seq_idx = F.pad(batch.input_ids, (0, pad)), F.pad(batch.targets, (0, pad), value=IGNORE), None
    if batch.seq_idx is not None:
        seq_idx = torch.cat([batch.seq_idx, batch.seq_idx[:, -1:].expand(-1, pad)], dim=1)
    part = input_ids.shape[1] // info.cp_size
    mine = slice(info.cp_rank * part, (info.cp_rank + 1) * part)
    return Batch(input_ids[:, mine], targets[:, mine], None if seq_idx is None else seq_idx[:, mine],
                 batch.n_tokens if info.cp_rank == 0 else 0)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place, so that is the module itself)."""
    return getattr(model, "module", model)


def gradient_sync(model: nn.Module, enabled: bool):
    """Context in which backward averages gradients across processes only if ``enabled`` (accumulation)."""
    if hasattr(model, "no_sync"):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Sum (or max) ``values`` over processes; returned unchanged with one process."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
