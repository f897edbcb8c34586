"""``ssmkit eval mqar``: multi-query associative recall, pure SSM against a hybrid with one attention layer.

The claim (Zoology, Arora et al. 2023; Jamba): a fixed-size recurrent state must compress every
key-value pair it has seen, so recall degrades as the pairs grow; one attention layer among the SSM
layers looks them up exactly, and the hybrid of the same size solves the task.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from ssmkit.data.synthetic import SyntheticBatch, mqar
from ssmkit.evals import _common as common
from ssmkit.evals import _merge as merge
from ssmkit.evals.registry import register
from ssmkit.models import LanguageModel

FULL = dict(models=["mamba", "hybrid"], seq_len=256, vocab_size=8192, kv_counts=[4, 8, 16, 32, 64], d_model=128,
            n_layer=4, d_state=16, steps=6000, batch_size=64, lr=1e-3, eval_sequences=256, seed=0)
SMOKE = dict(models=["mamba", "hybrid"], seq_len=32, vocab_size=64, kv_counts=[2, 4], d_model=32, n_layer=2,
             d_state=8, steps=150, batch_size=16, lr=5e-3, eval_sequences=128, seed=0)
HELPS = dict(models=f"model kinds to compare ({', '.join(common.MODEL_KINDS)})", seq_len="sequence length",
             vocab_size="vocabulary (keys from the lower half, values from the upper half)",
             kv_counts="key-value pair counts; training mixes them equally, testing reports each",
             d_model="model width", n_layer="layers (the hybrid's second layer is attention)",
             d_state="SSM state size", steps="training steps", batch_size="sequences per step",
             lr="peak learning rate", eval_sequences="test sequences per key-value count", seed="random seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_options(parser, FULL, SMOKE, HELPS)
    merge.add_option(parser)


def run(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    if args.merge:
        return merge.merge_runs(args, out_dir, "mqar", report, FULL)
    cfg = common.settings(args, FULL, SMOKE)
    device = common.resolve_device(args.device)
    counts = cfg["kv_counts"]
    # Checks every count once, before any training.
    for n_kv in counts:
        mqar(1, cfg["seq_len"], n_kv, cfg["vocab_size"])
    step = [0]

    def make_batch(generator: torch.Generator) -> SyntheticBatch:
        # Each step draws one count, in turn, so every count gets the same share of training.
        n_kv = counts[step[0] % len(counts)]
        step[0] += 1
        return mqar(cfg["batch_size"], cfg["seq_len"], n_kv, cfg["vocab_size"], generator=generator)

    test = {}
    for n_kv in counts:
        generator = torch.Generator().manual_seed(cfg["seed"] + 10_000 + n_kv)
        test[n_kv] = [mqar(min(64, cfg["eval_sequences"]), cfg["seq_len"], n_kv, cfg["vocab_size"], generator=generator)
                      for _ in range(max(1, cfg["eval_sequences"] // 64))]
    result = common.run_info("mqar", args, cfg, device)
    result["chance"] = 1 / (cfg["vocab_size"] - cfg["vocab_size"] // 2)
    result["models"] = {}
    for kind in cfg["models"]:
        torch.manual_seed(cfg["seed"])
        step[0] = 0
        config = common.model_config(kind, cfg["vocab_size"], cfg["d_model"], cfg["n_layer"], cfg["d_state"])
        model = LanguageModel(config).to(device)
        start = time.perf_counter()
        history = common.train(model, make_batch, steps=cfg["steps"], lr=cfg["lr"], device=device, seed=cfg["seed"],
                               label=kind)
        accuracies = {str(n): common.accuracy(model, test[n], device) for n in counts}
        result["models"][kind] = {"pattern": config.layer_pattern, "params": common.n_params(model),
                                  "accuracy": accuracies, "train_seconds": time.perf_counter() - start,
                                  "history": history, "config": config.to_dict()}
    print(report(result, out_dir))
    common.write_result(out_dir, result)
    return result


def report(result: dict[str, Any], out_dir: Path) -> str:
    """Set ``result["table"]`` and draw ``mqar.png`` from a finished result; returns the text to print."""
    cfg = result["settings"]
    counts = cfg["kv_counts"]
    headers = ["model", "layers", "params", *(f"{n} kv" for n in counts)]
    rows = [[k, m["pattern"], m["params"], *(m["accuracy"][str(n)] for n in counts)]
            for k, m in result["models"].items()]
    result["table"] = common.format_table(headers, rows)
    _plot(result, counts, out_dir)
    return (f"MQAR: length {cfg['seq_len']}, vocabulary {cfg['vocab_size']}; accuracy by key-value count "
            f"(params without the embedding)\n{result['table']}")


def _plot(result: dict[str, Any], counts: list[int], out_dir: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, m in result["models"].items():
        ax.plot(counts, [m["accuracy"][str(n)] for n in counts], marker="o",
                label=f"{kind} ({m['pattern']}, {m['params']:,} params)")
    ax.axhline(result["chance"], color="gray", linestyle="--", label="chance")
    ax.set(xlabel="key-value pairs", ylabel="recall accuracy", ylim=(0, 1.02),
           title=f"MQAR at length {result['settings']['seq_len']}")
    ax.set_xscale("log", base=2)
    ax.legend(loc="center right")
    common.save_figure(fig, out_dir / "mqar.png")


register("eval", "mqar", "multi-query associative recall: pure SSM vs a hybrid with one attention layer",
         add_arguments, run)
