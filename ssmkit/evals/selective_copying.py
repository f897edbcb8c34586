"""``ssmkit eval selective-copying``: a selective SSM (Mamba) against a time-invariant S4D of the same size.

The claim (Mamba, section 3.1 and table 1): copying data tokens scattered at random among noise needs
content-aware selection; Mamba's input-dependent Δ, B, C solve it, an LTI model such as S4D cannot.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from ssmkit.data.synthetic import selective_copying, selective_copying_vocab
from ssmkit.evals import _common as common
from ssmkit.evals import _merge as merge
from ssmkit.evals.registry import register
from ssmkit.models import LanguageModel

FULL = dict(models=["mamba", "s4d"], seq_len=1024, n_memorize=16, n_values=16, d_model=64, n_layer=2, d_state=16,
            steps=15000, batch_size=64, lr=1e-3, eval_batches=8, seed=0)
SMOKE = dict(models=["mamba", "s4d"], seq_len=16, n_memorize=2, n_values=4, d_model=32, n_layer=2, d_state=8,
             steps=150, batch_size=16, lr=5e-3, eval_batches=8, seed=0)
HELPS = dict(models=f"model kinds to compare ({', '.join(common.MODEL_KINDS)})",
             seq_len="context length (noise with the data tokens in it; the paper uses 4096)",
             n_memorize="data tokens to copy", n_values="distinct data token values", d_model="model width",
             n_layer="layers", d_state="SSM state size", steps="training steps", batch_size="sequences per step",
             lr="peak learning rate", eval_batches="held-out batches (of --batch-size) scored", seed="random seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_options(parser, FULL, SMOKE, HELPS)
    merge.add_option(parser)


def run(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    if args.merge:
        return merge.merge_runs(args, out_dir, "selective-copying", report, FULL)
    cfg = common.settings(args, FULL, SMOKE)
    device = common.resolve_device(args.device)
    vocab = selective_copying_vocab(cfg["n_values"])

    def make_batch(generator: torch.Generator):
        return selective_copying(cfg["batch_size"], cfg["seq_len"], cfg["n_memorize"], cfg["n_values"],
                                 generator=generator)

    # Held-out batches come from a generator the training never touches.
    test_gen = torch.Generator().manual_seed(cfg["seed"] + 10_000)
    test = [make_batch(test_gen) for _ in range(cfg["eval_batches"])]
    result = common.run_info("selective-copying", args, cfg, device)
    result["chance"] = 1 / cfg["n_values"]
    result["models"] = {}
    for kind in cfg["models"]:
        torch.manual_seed(cfg["seed"])
        config = common.model_config(kind, vocab, cfg["d_model"], cfg["n_layer"], cfg["d_state"])
        model = LanguageModel(config).to(device)
        start = time.perf_counter()
        history = common.train(model, make_batch, steps=cfg["steps"], lr=cfg["lr"], device=device, seed=cfg["seed"],
                               label=kind)
        acc = common.accuracy(model, test, device)
        result["models"][kind] = {"pattern": config.layer_pattern, "params": common.n_params(model),
                                  "accuracy": acc, "train_seconds": time.perf_counter() - start,
                                  "history": history, "config": config.to_dict()}
    print(report(result, out_dir))
    common.write_result(out_dir, result)
    return result


def report(result: dict[str, Any], out_dir: Path) -> str:
    """Set ``result["table"]`` and draw ``selective_copying.png`` from a finished result; returns the text to print."""
    cfg = result["settings"]
    rows = [(k, m["pattern"], m["params"], m["accuracy"]) for k, m in result["models"].items()]
    result["table"] = common.format_table(["model", "layers", "params", "accuracy"], rows)
    _plot(result, out_dir)
    return (f"selective copying: context {cfg['seq_len']}, {cfg['n_memorize']} tokens of {cfg['n_values']} values, "
            f"chance {result['chance']:.3f}\n{result['table']}")


def _plot(result: dict[str, Any], out_dir: Path) -> None:
    plt = common.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, m in result["models"].items():
        left.plot([h["step"] for h in m["history"]], [h["loss"] for h in m["history"]], label=kind)
    left.set(xlabel="training step", ylabel="loss at the copy positions", yscale="log", title="training")
    left.legend()
    names = list(result["models"])
    right.bar(names, [result["models"][k]["accuracy"] for k in names], color="tab:blue")
    right.axhline(result["chance"], color="gray", linestyle="--", label="chance")
    right.set(ylim=(0, 1), ylabel="accuracy (held out)", title="selective copying")
    right.legend()
    common.save_figure(fig, out_dir / "selective_copying.png")


register("eval", "selective-copying", "selective copying (Mamba paper): selective SSM vs time-invariant S4D",
         add_arguments, run)
