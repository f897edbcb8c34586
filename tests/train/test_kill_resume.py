"""A run killed with SIGKILL mid-training and resumed logs exactly the losses of an uninterrupted run."""

import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(sysconfig.get_paths()["stdlib"]) / "json"
ARGS = ["--preset", "debug-mamba2", "--data", str(DATA), "--steps", "40", "--data.seq_len", "32",
        "--train.batch_size", "4", "--train.checkpoint_every", "10", "--train.log_every", "1",
        "--train.eval_every", "0", "--train.eval_tokens", "512", "--train.sample_tokens", "0",
        "--train.warmup_steps", "5", "--train.progress", "false", "--train.checkpoint_minutes", "0"]


def _env():
    # One thread: the same float reduction order in every run (and no fight with xdist workers).
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _train(out, *extra):
    cmd = [sys.executable, "-m", "ssmkit", "train", "--out", str(out), *ARGS, *extra]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def _log(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r], [r for r in records if "val_bpb" in r]


def test_sigkill_then_resume_logs_the_same_losses(tmp_path):
    straight = tmp_path / "straight"
    done = _train(straight)
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ssmkit", "train", "--out", str(killed), *ARGS]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    # Kill once the first checkpoint exists and training has moved a few steps past it.
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = killed / "metrics.jsonl"
        steps = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        if (killed / "checkpoints" / "step_0000010").is_dir() and steps >= 13:
            proc.kill()
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -9, f"the run was not killed mid-training (rc {proc.returncode}): {proc.stderr.read()}"
    partial, _ = _log(killed)
    assert 13 <= len(partial) < 40

    resumed = _train(killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout

    expected_losses, expected_val = _log(straight)
    losses, val = _log(killed)
    assert [s for s, _ in expected_losses] == list(range(1, 41))
    assert losses == expected_losses
    assert val == expected_val
