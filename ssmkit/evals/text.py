"""``ssmkit eval text``: bits per byte (and perplexity for token models) of a trained model on some text.

Also reachable as ``ssmkit eval --checkpoint DIR`` (the older form), which prints the figures and writes
nothing. With a folder to write to, it also plots the loss by position in the row: how much the model
gains from longer context.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ssmkit.data import (
    IGNORE,
    DataConfig,
    EvalSet,
    encode_documents,
    eval_batches,
    load_datasets,
    read_documents,
)
from ssmkit.evals import _common as common
from ssmkit.evals.registry import register
from ssmkit.models.loading import load_model
from ssmkit.models.run_folder import RUN_FILE
from ssmkit.train.options import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="model folder or training run folder")
    parser.add_argument("--data", nargs="+", metavar="PATH",
                        help="files or folders (default: the training run's validation documents)")
    parser.add_argument("--seq-len", type=int, metavar="N", help="row length (default: the run's, else 1024)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N")


def run(args: argparse.Namespace, out_dir: Path | None) -> dict[str, Any]:
    from ssmkit.train.checkpoint import read_run_file
    from ssmkit.train.options import simple_from_dict
    from ssmkit.train.trainer import evaluate

    model, tokenizer, folder = load_model(args.checkpoint, args.device, revision=getattr(args, "revision", None))
    run_file = next((p / RUN_FILE for p in (folder, *folder.parents[:3]) if (p / RUN_FILE).is_file()), None)
    run_data = read_run_file(run_file)["data"] if run_file else None
    if not args.data and run_data is None:
        raise UsageError(f"{folder} is not part of a training run: give the text to evaluate with --data")
    config = simple_from_dict(DataConfig, run_data, f"{run_file}: data") if run_data else DataConfig(seq_len=1024)
    if args.seq_len is not None:
        config.seq_len = args.seq_len
    if args.data:
        # Every document given is scored: no split.
        docs = read_documents(args.data, [])
        data = EvalSet.build(encode_documents(docs, tokenizer), config, 0)
    else:
        data = load_datasets(config, batch_size=args.batch_size, eval_tokens=0, tokenizer=tokenizer).val
        if data is None:
            raise ValueError("the run has no validation documents (data.val_fraction was 0): pass --data")
    device = next(model.parameters()).device
    metrics = evaluate(model, data, args.batch_size, device, tokenizer.kind)
    stream = data.rows.stream
    print(f"{folder}: {stream.n_docs:,} documents, {stream.n_bytes:,} bytes, seq_len {config.seq_len}")
    print("  " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    result = {"task": "text", "checkpoint": str(folder), "device": str(device), "documents": stream.n_docs,
              "bytes": stream.n_bytes, "seq_len": config.seq_len, **metrics}
    if out_dir is None:
        return result
    result["loss_by_position"] = _loss_by_position(model, data, args.batch_size, device)
    _plot(result, out_dir)
    common.write_result(out_dir, result)
    return result


@torch.no_grad()
def _loss_by_position(model: torch.nn.Module, data: EvalSet, batch_size: int, device: torch.device
                      ) -> list[dict[str, float]]:
    """Mean loss (nats per token) of the targets in position bins 1, 2-3, 4-7, ... of the rows."""
    sums, counts = np.zeros(0), np.zeros(0)
    for batch, counted in eval_batches(data.rows, data.index, batch_size):
        if not counted:
            continue
        batch = batch.to(device)
        logits = model(batch.input_ids, seq_idx=batch.seq_idx).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE,
                               reduction="none").view(batch.targets.shape)
        kept = (batch.targets != IGNORE).float()
        row_sum, row_count = (loss * kept).sum(0).cpu().numpy(), kept.sum(0).cpu().numpy()
        # Bucketed rows differ in length: grow the sums to the longest seen.
        if len(row_sum) > len(sums):
            sums, counts = np.pad(sums, (0, len(row_sum) - len(sums))), np.pad(counts, (0, len(row_sum) - len(counts)))
        sums[:len(row_sum)] += row_sum
        counts[:len(row_sum)] += row_count
    bins = []
    for k in range(int(math.log2(len(sums))) + 1):
        lo, hi = 2 ** k - 1, min(2 ** (k + 1) - 1, len(sums))
        if counts[lo:hi].sum():
            bins.append({"from": lo + 1, "to": hi, "loss": float(sums[lo:hi].sum() / counts[lo:hi].sum())})
    return bins


def _plot(result: dict[str, Any], out_dir: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = result["loss_by_position"]
    ax.plot([b["to"] for b in bins], [b["loss"] for b in bins], marker="o")
    ax.set(xscale="log", xlabel="position in the row (upper end of each bin)", ylabel="loss (nats per token)",
           title=f"{Path(result['checkpoint']).name}: loss by context position")
    common.save_figure(fig, out_dir / "loss_by_position.png")


register("eval", "text", "bits per byte (and perplexity for token models) of a trained model on some text",
         add_arguments, run)
