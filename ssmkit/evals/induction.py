"""``ssmkit eval induction-heads``: trained at one length, tested at lengths up to 4096 times longer.

The claim (Mamba, section 4.1.2 and table 2): a selective SSM that learns the induction-head task at
length 256 keeps solving it at lengths far beyond, up to a million tokens, because its state holds the
answer whatever came between. Long test sequences are read in chunks through the model's recurrent cache,
so memory does not grow with the length.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from ssmkit.data.synthetic import induction_heads
from ssmkit.evals import _common as common
from ssmkit.evals import _merge as merge
from ssmkit.evals.registry import register
from ssmkit.models import LanguageModel

FULL = dict(models=["mamba", "mamba2"], train_len=256, vocab_size=16, d_model=64, n_layer=2, d_state=16, steps=4000,
            batch_size=64, lr=2e-3, min_log2_len=8, max_log2_len=0, eval_sequences=64, chunk_len=0, seed=0)
SMOKE = dict(models=["mamba"], train_len=16, vocab_size=6, d_model=32, n_layer=2, d_state=8, steps=200,
             batch_size=16, lr=5e-3, min_log2_len=4, max_log2_len=8, eval_sequences=64, chunk_len=64, seed=0)
HELPS = dict(models=f"model kinds ({', '.join(common.MODEL_KINDS)}; attention costs quadratic time at long lengths)",
             train_len="training sequence length", vocab_size="vocabulary, the trigger token included",
             d_model="model width", n_layer="layers", d_state="SSM state size", steps="training steps",
             batch_size="sequences per step", lr="peak learning rate",
             min_log2_len="shortest test length, as a power of two",
             max_log2_len="longest test length, as a power of two (0: 20 on a GPU, 16 on a CPU)",
             eval_sequences="test sequences per length",
             chunk_len="positions per chunk of recurrent inference: memory is bounded by it times --eval-sequences "
                       "(0: 8192 on a GPU, 1024 on a CPU)", seed="random seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_options(parser, FULL, SMOKE, HELPS)
    merge.add_option(parser)


def run(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    if args.merge:
        return merge.merge_runs(args, out_dir, "induction-heads", report, FULL)
    cfg = common.settings(args, FULL, SMOKE)
    device = common.resolve_device(args.device)
    if not cfg["max_log2_len"]:
        cfg["max_log2_len"] = 20 if device.type == "cuda" else 16
    if not cfg["chunk_len"]:
        cfg["chunk_len"] = 8192 if device.type == "cuda" else 1024
    if cfg["min_log2_len"] > cfg["max_log2_len"]:
        raise ValueError(f"--min-log2-len {cfg['min_log2_len']} is above --max-log2-len {cfg['max_log2_len']}")
    lengths = [2 ** k for k in range(cfg["min_log2_len"], cfg["max_log2_len"] + 1)]

    def make_batch(generator: torch.Generator):
        return induction_heads(cfg["batch_size"], cfg["train_len"], cfg["vocab_size"], generator=generator)

    result = common.run_info("induction-heads", args, cfg, device)
    result["chance"] = 1 / (cfg["vocab_size"] - 1)
    result["lengths"] = lengths
    result["models"] = {}
    for kind in cfg["models"]:
        torch.manual_seed(cfg["seed"])
        config = common.model_config(kind, cfg["vocab_size"], cfg["d_model"], cfg["n_layer"], cfg["d_state"])
        model = LanguageModel(config).to(device)
        start = time.perf_counter()
        history = common.train(model, make_batch, steps=cfg["steps"], lr=cfg["lr"], device=device, seed=cfg["seed"],
                               label=kind)
        train_seconds = time.perf_counter() - start
        accuracies = {}
        for length in lengths:
            accuracies[length] = _test(model, cfg, length, device)
            print(f"  {kind}: length {length:,} accuracy {accuracies[length]:.4f}", flush=True)
        result["models"][kind] = {"pattern": config.layer_pattern, "params": common.n_params(model),
                                  "accuracy": {str(n): a for n, a in accuracies.items()},
                                  "train_seconds": train_seconds, "history": history, "config": config.to_dict()}
    print(report(result, out_dir))
    common.write_result(out_dir, result)
    return result


def report(result: dict[str, Any], out_dir: Path) -> str:
    """Set ``result["table"]`` and draw ``induction_heads.png`` from a finished result; returns the text to print."""
    cfg = result["settings"]
    headers = ["length", *(f"{k} ({m['params']:,} params)" for k, m in result["models"].items())]
    rows = [[n, *(m["accuracy"][str(n)] for m in result["models"].values())] for n in result["lengths"]]
    result["table"] = common.format_table(headers, rows)
    _plot(result, cfg, out_dir)
    return (f"induction heads: trained at length {cfg['train_len']}, vocabulary {cfg['vocab_size']}, "
            f"chance {result['chance']:.3f}; accuracy by test length\n{result['table']}")


def _test(model: LanguageModel, cfg: dict[str, Any], length: int, device: torch.device) -> float:
    """Accuracy at one length on sequences from a generator of its own (each length is independent)."""
    generator = torch.Generator().manual_seed(cfg["seed"] + 10_000 + length)
    batch = induction_heads(cfg["eval_sequences"], length, cfg["vocab_size"], generator=generator)
    return common.accuracy(model, [batch], device, chunk_len=cfg["chunk_len"])


def _plot(result: dict[str, Any], cfg: dict[str, Any], out_dir: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    lengths = result["lengths"]
    for kind, m in result["models"].items():
        ax.plot(lengths, [m["accuracy"][str(n)] for n in lengths], marker="o", label=kind)
    ax.axvline(cfg["train_len"], color="gray", linestyle=":", label="training length")
    ax.axhline(result["chance"], color="gray", linestyle="--", label="chance")
    ax.set(xscale="log", xlabel="test sequence length", ylabel="accuracy", ylim=(0, 1.02),
           title="induction heads: length extrapolation")
    ax.set_xscale("log", base=2)
    ax.legend()
    common.save_figure(fig, out_dir / "induction_heads.png")


register("eval", "induction-heads", "induction heads: trained at length 256, tested up to 2^16 (CPU) / 2^20 (GPU)",
         add_arguments, run)
