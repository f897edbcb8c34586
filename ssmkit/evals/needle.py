"""``ssmkit eval needle``: a key-value line hidden at some depth of long text, asked for at the end.

Byte-level: the haystack is source text (by default the Python standard library, the trainer's default
corpus; prompts are cut from held-out files), the needle ``# the secret code of KEY is 12345`` and the
question ``# the secret code of KEY is ``. A prompt counts as answered when all five digits come out right
(greedy). Either a trained byte model is tested as it is (``--checkpoint``), or small models are trained
here on such prompts (the text as language modelling plus the answer) and tested at longer lengths.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from ssmkit.data import read_documents, split_documents
from ssmkit.data.synthetic import needle_batch
from ssmkit.data.tokenizer import BYTE_BOS, BYTE_VOCAB_SIZE
from ssmkit.evals import _common as common
from ssmkit.evals import _merge as merge
from ssmkit.evals.registry import register
from ssmkit.models import LanguageModel
from ssmkit.models.loading import load_model

VALUE_LEN = 5
FULL = dict(models=["mamba", "hybrid"], train_len=1024, lengths=[512, 1024, 2048, 4096, 8192],
            depths=[0.0, 0.25, 0.5, 0.75, 1.0], d_model=128, n_layer=4, d_state=32, steps=3000, batch_size=32, lr=1e-3,
            lm_weight=1.0, eval_prompts=32, seed=0)
SMOKE = dict(models=["mamba2"], train_len=96, lengths=[96, 192], depths=[0.0, 1.0], d_model=32, n_layer=2,
             d_state=8, steps=10, batch_size=4, lr=5e-3, lm_weight=1.0, eval_prompts=4, seed=0)
HELPS = dict(models=f"model kinds to train ({', '.join(common.MODEL_KINDS)}); ignored with --checkpoint",
             train_len="training prompt length in bytes", lengths="test prompt lengths in bytes",
             depths="needle depths (0 = start of the text, 1 = just before the question)", d_model="model width",
             n_layer="layers", d_state="SSM state size", steps="training steps", batch_size="prompts per step",
             lr="peak learning rate", lm_weight="weight of the next-byte loss on the text (the answer weighs 1)",
             eval_prompts="test prompts per length and depth", seed="random seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="DIR", default=None,
                        help="test this trained byte model (model or training run folder) instead of training")
    parser.add_argument("--data", nargs="+", metavar="PATH", default=None,
                        help="haystack text files or folders (default: the Python standard library's source); "
                             "training prompts come from 90%% of the files, test prompts from the rest")
    common.add_options(parser, FULL, SMOKE, HELPS)
    merge.add_option(parser)


def _haystacks(paths: list[str] | None, longest: int) -> tuple[bytes, bytes]:
    docs = read_documents(paths or [], [] if paths else [".py"])
    train, held_out = split_documents(docs, 0.1)
    train_text, test_text = b"\n".join(d.data for d in train), b"\n".join(d.data for d in held_out)
    if len(test_text) < longest:
        raise ValueError(f"the held-out haystack has {len(test_text):,} bytes, fewer than the longest test prompt "
                         f"({longest:,}); give more text with --data or shorter --lengths")
    return train_text, test_text


def run(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    if args.merge:
        return merge.merge_runs(args, out_dir, "needle", report, [*FULL, "checkpoint", "revision", "data"])
    cfg = common.settings(args, FULL, SMOKE)
    device = common.resolve_device(args.device)
    train_text, test_text = _haystacks(args.data, max(cfg["lengths"]))
    result = common.run_info("needle", args, cfg, device)
    result["checkpoint"] = args.checkpoint
    # The haystack's source: --merge refuses runs made on different text.
    result["data"] = [str(Path(d).resolve()) for d in args.data] if args.data else "python standard library"
    result["models"] = {}
    if args.checkpoint:
        model, tokenizer, folder = load_model(args.checkpoint, args.device, revision=getattr(args, "revision", None))
        if tokenizer.kind != "bytes":
            raise ValueError(f"{folder}: needle prompts are bytes; this model's tokenizer is {tokenizer.kind!r}")
        trained = {folder.name: (model, {"train_seconds": 0.0, "history": []})}
    else:
        trained = {kind: _train(kind, cfg, train_text, device) for kind in cfg["models"]}
    for name, (model, info) in trained.items():
        grid = {}
        for length in cfg["lengths"]:
            for depth in cfg["depths"]:
                grid[f"{length}@{depth}"] = _exact(model, test_text, cfg, length, depth, device)
            print(f"  {name}: length {length:,}: " + " ".join(f"{grid[f'{length}@{d}']:.2f}" for d in cfg["depths"]),
                  flush=True)
        result["models"][name] = {"pattern": model.config.layer_pattern, "params": common.n_params(model),
                                  "accuracy": grid, **info, "config": model.config.to_dict()}
    print(report(result, out_dir))
    common.write_result(out_dir, result)
    return result


def report(result: dict[str, Any], out_dir: Path) -> str:
    """Set ``result["table"]`` and draw ``needle.png`` from a finished result; returns the text to print."""
    cfg = result["settings"]
    headers = ["model", "length", *(f"depth {d}" for d in cfg["depths"])]
    rows = [[name, n, *(m["accuracy"][f"{n}@{d}"] for d in cfg["depths"])]
            for name, m in result["models"].items() for n in cfg["lengths"]]
    result["table"] = common.format_table(headers, rows)
    _plot(result, cfg, out_dir)
    return (f"needle in a haystack: fraction of prompts whose {VALUE_LEN}-digit answer is exact (trained at "
            f"{cfg['train_len']} bytes)\n{result['table']}")


def _train(kind: str, cfg: dict[str, Any], text: bytes, device: torch.device) -> tuple[LanguageModel, dict]:
    torch.manual_seed(cfg["seed"])
    config = common.model_config(kind, BYTE_VOCAB_SIZE, cfg["d_model"], cfg["n_layer"], cfg["d_state"])
    model = LanguageModel(config).to(device)

    def make_batch(generator: torch.Generator):
        return needle_batch(text, cfg["batch_size"], cfg["train_len"], None, bos_id=BYTE_BOS, generator=generator,
                            value_len=VALUE_LEN)

    start = time.perf_counter()
    history = common.train(model, make_batch, steps=cfg["steps"], lr=cfg["lr"], device=device, seed=cfg["seed"],
                           label=kind, lm_weight=cfg["lm_weight"])
    return model, {"train_seconds": time.perf_counter() - start, "history": history}


def _exact(model: LanguageModel, text: bytes, cfg: dict[str, Any], length: int, depth: float,
           device: torch.device) -> float:
    """Fraction of ``eval_prompts`` prompts whose whole answer the model gets right."""
    generator = torch.Generator().manual_seed(cfg["seed"] + 10_000 + length + round(depth * 1000))
    right = 0
    for start in range(0, cfg["eval_prompts"], 16):
        n = min(16, cfg["eval_prompts"] - start)
        batch = needle_batch(text, n, length, depth, bos_id=BYTE_BOS, generator=generator, value_len=VALUE_LEN)
        pred, want = common.predict_scored(model, batch, device)
        right += int((pred.view(n, VALUE_LEN) == want.view(n, VALUE_LEN)).all(dim=1).sum())
    return right / cfg["eval_prompts"]


def _plot(result: dict[str, Any], cfg: dict[str, Any], out_dir: Path) -> None:
    plt = common.pyplot()
    names = list(result["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], names):
        grid = [[result["models"][name]["accuracy"][f"{n}@{d}"] for n in cfg["lengths"]] for d in cfg["depths"]]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        ax.set_xticks(range(len(cfg["lengths"])), [str(n) for n in cfg["lengths"]])
        ax.set_yticks(range(len(cfg["depths"])), [str(d) for d in cfg["depths"]])
        ax.set(xlabel="prompt length (bytes)", ylabel="needle depth", title=name)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.5 else "black")
    fig.colorbar(image, ax=axes[0].tolist(), label="exact answers")
    common.save_figure(fig, out_dir / "needle.png")


register("eval", "needle", "needle in a haystack on a byte model: accuracy by needle depth and prompt length",
         add_arguments, run)
