"""Several processes through PyTorch's own engine: ``torchrun`` sets the environment, we read it.

    torchrun --nproc_per_node 8 -m ssmkit train --preset mamba2-130m --out runs/x --train.parallel fsdp

DDP keeps a full model per process and averages gradients; FSDP2 (``fully_shard``) shards parameters,
gradients and optimiser state, one unit per residual block plus the root (embedding, final norm, head
stay together so a tied head remains tied). Both average gradients over processes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    """Where this process sits: rank, world size and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1) and pick this process's device.

    ``device`` is 'auto', 'cpu', 'cuda' or 'cuda:N'; under torchrun CUDA processes use cuda:LOCAL_RANK and
    talk through NCCL, CPU processes through gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
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
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def teardown() -> None:
    """Leave the process group (if any)."""
    if dist.is_initialized():
        dist.destroy_process_group()


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
