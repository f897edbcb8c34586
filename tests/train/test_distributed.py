"""Two CPU processes through torchrun (gloo) train like one process with the whole batch."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

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
    """DDP and FSDP2 (each 2 processes x 2 rows) log the losses of 1 process x 4 rows, within fp32 tolerance."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _, single, single_val = _run([sys.executable], tmp_path / "single")
    assert len(single) == 8
    for parallel in ("ddp", "fsdp"):
        done, multi, multi_val = _run(torchrun, tmp_path / parallel, "--train.parallel", parallel)
        assert "2 process(es)" in done.stdout
        assert_close(torch.tensor(multi), torch.tensor(single), torch.float32, name=f"{parallel} losses")
        assert_close(torch.tensor(multi_val), torch.tensor(single_val), torch.float32, name=f"{parallel} val bpb")
