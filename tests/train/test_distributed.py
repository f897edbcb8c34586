"""Two CPU processes through torchrun (gloo) train like one process with the whole batch."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from ssmkit.testing import assert_close

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(sysconfig.get_paths()["stdlib"]) / "json"
ARGS = ["--preset", "debug-mamba2", "--data", str(DATA), "--data.separator", "\n\n", "--steps", "8",
        "--data.seq_len", "32", "--train.batch_size", "4", "--train.checkpoint_every", "4", "--train.log_every", "1",
        "--train.eval_every", "0", "--train.eval_tokens", "256", "--train.sample_tokens", "0",
        "--train.warmup_steps", "2", "--train.progress", "false", "--train.checkpoint_minutes", "0"]


def _run(launcher, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [*launcher, "-m", "ssmkit", "train", "--out", str(out), *ARGS, *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return done, [r["loss"] for r in records if "loss" in r], [r["val_bpb"] for r in records if "val_bpb" in r]


def test_two_gloo_processes_match_one_process(tmp_path):
    """DDP and FSDP2 (each 2 processes x 2 rows, or 2 processes x half of 4 rows) log the losses of 1 process
    x 4 rows, within fp32 tolerance."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _, single, single_val = _run([sys.executable], tmp_path / "single")
    assert len(single) == 8
    # context_parallel 2: both processes read the same rows, each half of every sequence (documents cross
    # the boundary), under DDP and FSDP2 alike.
    for parallel, cp in (("ddp", 1), ("fsdp", 1), ("ddp", 2), ("fsdp", 2)):
        name = f"{parallel} cp{cp}"
        done, multi, multi_val = _run(torchrun, tmp_path / name, "--train.parallel", parallel,
                                      "--train.context_parallel", str(cp))
        assert "2 process(es)" in done.stdout
        assert ("2-way context parallel" in done.stdout) == (cp == 2)
        assert_close(torch.tensor(multi), torch.tensor(single), torch.float32, name=f"{name} losses")
        assert_close(torch.tensor(multi_val), torch.tensor(single_val), torch.float32, name=f"{name} val bpb")


def test_shard_batch_pads_and_splits_the_length():
    """Lengths are padded (scoring nothing, continuing the last document) to parts of at least 16
    positions; tokens stay with part 0."""
    from ssmkit.data import IGNORE
    from ssmkit.data.packing import Batch
    from ssmkit.train.config import TrainConfig
    from ssmkit.train.distributed import Dist, shard_batch

    ids = torch.arange(66).view(2, 33)
    seq_idx = torch.zeros(2, 33, dtype=torch.int32)
    seq_idx[0, 20:], seq_idx[1, 32] = 1, 2
    batch = Batch(ids, ids + 1, seq_idx, 65)
    parts = [shard_batch(batch, Dist(r, 4, torch.device("cpu"), cp_size=2)) for r in (2, 3)]
    assert [p.input_ids.shape[1] for p in parts] == [17, 17]
    assert torch.equal(torch.cat([p.input_ids for p in parts], 1)[:, :33], ids)
    assert torch.equal(parts[1].targets[:, -1], torch.full((2,), IGNORE))
    assert parts[1].seq_idx[:, -1].tolist() == [1, 2]
    short = Batch(ids[:, :5], ids[:, :5], None, 10)
    assert shard_batch(short, Dist(1, 2, torch.device("cpu"), cp_size=2)).input_ids.shape == (2, 16)
    assert [p.n_tokens for p in parts] == [65, 0]
    assert shard_batch(batch, Dist(0, 2, torch.device("cpu"))) is batch
    with pytest.raises(ValueError, match="context_parallel must be >= 1"):
        TrainConfig(context_parallel=0).validate()


# Training through the CLI, counting this process's threads around the trainer's teardown.
TEARDOWN_SCRIPT = """
import os, sys
import ssmkit.train.trainer as trainer
from ssmkit.cli import main

def counted(*args, **kwargs):
    before = len(os.listdir("/proc/self/task"))
    teardown(*args, **kwargs)
    print("threads", os.environ["RANK"], before, len(os.listdir("/proc/self/task")), file=sys.stderr)

teardown, trainer.teardown = trainer.teardown, counted
sys.exit(main())
"""


def test_teardown_joins_the_gloo_threads(tmp_path):
    """After training no gloo group is left for interpreter exit, where its worker threads would abort the
    process ("terminate called without an active exception"), though DDP and the context-parallel layers
    held the groups."""
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    steps = ARGS.index("--steps") + 1
    args = [*ARGS[:steps], "2", *ARGS[steps + 1:]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "train", "--out", str(tmp_path / "run"), *args, "--train.parallel", "ddp", "--train.context_parallel", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    counts = sorted(line.split()[1:] for line in done.stderr.splitlines() if line.startswith("threads"))
    assert [rank for rank, *_ in counts] == ["0", "1"], done.stderr[-3000:]
    for rank, before, after in counts:
        assert int(after) < int(before), f"rank {rank}: gloo threads still running after teardown: {before} -> {after}"
