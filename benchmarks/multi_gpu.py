"""Two GPUs against one: DDP / FSDP2 training throughput and context-parallel SSD at long lengths.

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
    PYTHONPATH=$PWD torchrun --standalone --nproc_per_node 2 benchmarks/multi_gpu.py

(NVLink multicast stays off: the lent machines do not support it.) Run under torchrun with 2 processes;
the one-GPU figures are taken on every GPU at once, each process alone (no communication), so the
comparison shares the same host and clocks. Measured:

1. Training, mamba2-130m preset at 2K context, bf16 autocast, AdamW, gradient clipping, the same per-GPU
   micro-batch everywhere (weak scaling), wrapped by ``ssmkit.train.distributed.parallelize`` as
   ``ssmkit train`` does: tokens/s on 1 GPU, with DDP on 2, with FSDP2 on 2; scaling efficiency =
   tokens/s on 2 / (2 x tokens/s on 1).
2. The SSD scan at L = 256K, batch 1, mamba2-130m layer shapes (24 heads x 64, N 128, one group, bf16):
   ``mamba_chunk_scan_combined`` on one GPU against ``context_parallel_chunk_scan`` over 2 (128K each),
   forward and forward+backward time and peak memory per GPU, and the largest difference of the outputs.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ssmkit.distributed import context_parallel_chunk_scan, split_sequence
from ssmkit.models import LanguageModel, get_preset, param_groups
from ssmkit.ops import mamba_chunk_scan_combined
from ssmkit.train.distributed import Dist, parallelize, unwrap

GIB = 2**30
# `--device cpu` (gloo, tiny sizes) only checks that the script runs, without a GPU.
DEVICE = torch.device("cuda")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, group=None) -> float:
    """Seconds per call of ``fn`` after one warm-up, the slowest rank's (all ranks call it)."""
    fn()
    sync()
    dist.barrier(group)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    elapsed = torch.tensor([(time.perf_counter() - start) / repeats], device=DEVICE)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
    return elapsed.item()


def peak_gib(fn) -> float:
    """Peak memory allocated on this GPU while running ``fn`` once (GiB; NaN on CPU)."""
    if DEVICE.type != "cuda":
        fn()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB


def gathered(value: float) -> list[float]:
    """Every rank's ``value``, in rank order."""
    t = torch.tensor([value], device=DEVICE)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [v.item() for v in out]


def train_step_fn(model, optimizer, batch: int, seq_len: int, vocab: int):
    """One optimiser step on random tokens, as the trainer takes it (bf16 autocast, clip, AdamW)."""
    gen = torch.Generator(device=DEVICE).manual_seed(dist.get_rank())
    ids = torch.randint(0, vocab, (batch, seq_len + 1), device=DEVICE, generator=gen)

    def step():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_training(args, rank: int, world: int) -> list[tuple[str, str, str, str, str]]:
    config = get_preset(args.preset)
    tokens_per_gpu = args.batch * args.seq_len
    rows, single = [], None
    for name, info in (("1 GPU (each alone)", Dist(0, 1, DEVICE)),
                       (f"DDP, {world} GPUs", Dist(rank, world, DEVICE)),
                       (f"FSDP2, {world} GPUs", Dist(rank, world, DEVICE))):
        torch.manual_seed(0)
        model = LanguageModel(config, device=DEVICE)
        model = parallelize(model, info, "fsdp" if name.startswith("FSDP") else "ddp")
        optimizer = torch.optim.AdamW(param_groups(unwrap(model), 0.1), lr=1e-4)
        step = train_step_fn(model, optimizer, args.batch, args.seq_len, config.vocab_size)
        # "1 GPU": every process trains alone at the same time (no collective inside the timed steps).
        seconds = timed(step, args.steps)
        mem = peak_gib(step)
        tokens_s = tokens_per_gpu * info.world_size / seconds
        if single is None:
            single = tokens_s
            efficiency = "1.00"
        else:
            efficiency = f"{tokens_s / (info.world_size * single):.2f}"
        rows.append((name, f"{tokens_s:,.0f}", f"{seconds * 1e3:.0f}", efficiency,
                     " / ".join(f"{m:.1f}" for m in gathered(mem))))
        del model, optimizer, step
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def scan_inputs(length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """mamba2-130m layer shapes at batch 1: x (1, L, 24, 64), dt (1, L, 24), B, C (1, L, 1, 128), bf16."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    h, p, n = 24, 64, 128

    def rand(*shape, dtype=torch.bfloat16, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=DEVICE, generator=g) * scale + shift).to(dtype)

    return {"x": rand(1, length, h, p), "dt": rand(1, length, h, scale=0.5, shift=-2.0),
            "A": -torch.rand(h, device=DEVICE, generator=g) - 0.1, "B": rand(1, length, 1, n),
            "C": rand(1, length, 1, n), "D": rand(h, dtype=torch.float32),
            "dt_bias": rand(h, dtype=torch.float32, scale=0.1)}


def bench_context_parallel(args, rank: int, world: int) -> tuple[list[tuple[str, ...]], float]:
    group = dist.new_group(list(range(world)))
    full = scan_inputs(args.cp_len)
    kwargs = {"chunk_size": 256, "dt_softplus": True}
    mine = {k: split_sequence(v, group).contiguous() if v.dim() >= 3 else v for k, v in full.items()}
    grad_out = torch.randn_like(full["x"])
    my_grad_out = split_sequence(grad_out, group).contiguous()

    def run(inputs, grad, backward, fn, **extra):
        leaves = {k: v.detach().requires_grad_(backward) for k, v in inputs.items()}

        def call():
            with torch.set_grad_enabled(backward):
                out = fn(**leaves, **kwargs, **extra)
                if backward:
                    out.backward(grad)
            return out

        return call

    rows = []
    for what, backward in (("forward", False), ("forward+backward", True)):
        one = run(full, grad_out, backward, mamba_chunk_scan_combined)
        split = run(mine, my_grad_out, backward, context_parallel_chunk_scan, group=group)
        t_one, m_one = timed(one, args.repeats), peak_gib(one)
        t_two, m_two = timed(split, args.repeats, group), peak_gib(split)
        rows.append((what, f"{t_one * 1e3:.0f}", f"{t_two * 1e3:.0f}", f"{t_one / t_two:.2f}",
                     " / ".join(f"{m:.1f}" for m in gathered(m_one)), " / ".join(f"{m:.1f}" for m in gathered(m_two))))
    with torch.no_grad():
        reference = split_sequence(mamba_chunk_scan_combined(**full, **kwargs), group).float()
        ours = context_parallel_chunk_scan(**mine, **kwargs, group=group).float()
        err = torch.tensor([((ours - reference).abs().max() / reference.abs().max()).item()], device=DEVICE)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    return rows, err.item()


def table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = [f"\n{title}", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mamba2-130m", help="model trained in part 1")
    parser.add_argument("--batch", type=int, default=8, help="rows per GPU per training step")
    parser.add_argument("--seq-len", type=int, default=2048, help="training context")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per setting")
    parser.add_argument("--cp-len", type=int, default=256 * 1024, help="scan length split across the GPUs")
    parser.add_argument("--repeats", type=int, default=3, help="timed scan calls per setting")
    parser.add_argument("--skip", choices=("train", "scan"), action="append", default=[], help="leave a part out")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: gloo, a smoke run of the script itself (pass small sizes)")
    args = parser.parse_args()
    if "WORLD_SIZE" not in os.environ:
        raise SystemExit("run under torchrun: torchrun --standalone --nproc_per_node 2 benchmarks/multi_gpu.py")
    global DEVICE
    if args.device == "cuda":
        if os.environ.get("NCCL_NVLS_ENABLE") != "0" or os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST") != "1":
            raise SystemExit("export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 first (no NVLink multicast)")
        local_rank = int(os.environ["LOCAL_RANK"])
        DEVICE = torch.device("cuda", local_rank)
        torch.cuda.set_device(DEVICE)
        dist.init_process_group("nccl", device_id=DEVICE)
        name = torch.cuda.get_device_name()
    else:
        DEVICE = torch.device("cpu")
        dist.init_process_group("gloo")
        name = "CPU (smoke run)"
    rank, world = dist.get_rank(), dist.get_world_size()
    start = time.perf_counter()
    out = [f"{world} x {name}; torch {torch.__version__}"]
    try:
        if "train" not in args.skip:
            rows = bench_training(args, rank, world)
            out.append(table(f"Training {args.preset}, {args.batch} x {args.seq_len} tokens per GPU per step, bf16 "
                             f"autocast, AdamW ({args.steps} timed steps)",
                             ("setting", "tokens/s", "ms/step", "scaling efficiency", "peak GiB per GPU"), rows))
        if "scan" not in args.skip:
            rows, err = bench_context_parallel(args, rank, world)
            out.append(table(f"SSD scan, L = {args.cp_len:,}, b 1, 24 heads x 64, N 128, bf16: one GPU vs "
                             f"context parallel over {world} ({args.cp_len // world:,} each)",
                             ("pass", "1 GPU ms", f"{world} GPUs ms", "speed-up", "1 GPU peak GiB (each alone)",
                              f"{world} GPUs peak GiB per GPU"), rows))
            out.append(f"context-parallel output vs one GPU: max |difference| / max |output| = {err:.2e}")
        out.append(f"\ntotal {time.perf_counter() - start:.0f} s")
        if rank == 0:
            print("\n".join(out), flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
