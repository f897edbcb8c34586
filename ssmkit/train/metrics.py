"""What a run reports: a JSONL metrics file, a PNG loss curve, and a progress bar with tokens/s and ETA."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per line, flushed at once (a kill loses nothing).

    On resume from step ``s`` the lines of steps after ``s`` (written by the run that died) are dropped,
    so the file reads as if the run had never stopped.
    """

    def __init__(self, path: Path, *, resume_step: int | None, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step] if resume_step is not None else []
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
        self._file = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file (a torn last line, from a kill mid-write, is ignored)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def plot_losses(metrics_path: Path, png_path: Path, title: str) -> bool:
    """Training loss and validation bits per byte against step, saved as a PNG.

    Returns False (and draws nothing) when matplotlib is not installed: ``pip install 'ssmkit[plots]'``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_bpb"]) for r in records if "val_bpb" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    if train:
        steps, losses = zip(*train)
        bits = [x / math.log(2) for x in losses]
        ax.plot(steps, bits, color="tab:blue", alpha=0.35, linewidth=0.8, label="train (per step)")
        ax.plot(steps, _smooth(bits), color="tab:blue", linewidth=1.6, label="train (smoothed)")
    if val:
        steps, bpb = zip(*val)
        ax.plot(steps, bpb, "o-", color="tab:orange", linewidth=1.6, label="validation, bits per byte")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per token (train) / bits per byte (validation)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return True


def _smooth(values: list[float]) -> list[float]:
    """Debiased exponential moving average spanning about 1/30 of the points (any run length)."""
    decay = 1 - 1 / max(1.0, len(values) / 30)
    out, avg = [], 0.0
    for k, v in enumerate(values, start=1):
        avg = decay * avg + (1 - decay) * v
        out.append(avg / (1 - decay**k) if decay else v)
    return out


class Progress:
    """A tqdm bar over steps (or over seconds in a timed run) showing loss, tokens/s and the ETA."""

    def __init__(self, *, total_steps: int, time_budget_s: float, start_step: int, start_elapsed: float,
                 enabled: bool) -> None:
        self.timed = time_budget_s > 0
        if self.timed:
            self.bar = tqdm(total=round(time_budget_s), initial=round(start_elapsed), unit="s", disable=not enabled,
                            dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}s [{remaining} left{postfix}]")
        else:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", disable=not enabled,
                            dynamic_ncols=True)
        self._last = round(start_elapsed)

    def update(self, step: int, elapsed: float, loss: float, tokens_per_s: float) -> None:
        if self.timed:
            now = min(round(elapsed), self.bar.total)
            self.bar.update(now - self._last)
            self._last = now
        else:
            self.bar.update(1)
        self.bar.set_postfix_str(f"step {step} loss {loss:.3f} {tokens_per_s:,.0f} tok/s", refresh=False)

    def write(self, text: str) -> None:
        """Print a line above the bar."""
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
