"""``ssmkit eval byte-lm``: Mamba, Mamba-2, Mamba-3 and a transformer of equal size trained on the same bytes.

The MambaByte claim at small scale: byte-level models of equal parameter count, trained with the same
recipe on the same bytes in the same order for the same number of tokens, compared by validation bits
per byte against training FLOPs.

- Sizes: every model has ``--n-layer`` mixer layers (the transformer ``--n-layer / 2`` blocks of
  attention + SwiGLU MLP, the usual pairing: one such block has about the parameters of two Mamba
  layers). Each family's width is searched so that its total parameter count is the closest to
  ``--params`` (the transformer's MLP width is then fitted too); the table reports the exact counts.
- Training: :class:`ssmkit.train.Trainer` with one :class:`~ssmkit.train.TrainConfig` for all (AdamW,
  warm-up + cosine, bf16 on GPU, fp32 on CPU), same seed, so the same batches in the same order.
- FLOPs: one training step (forward and backward) of a single ``(1, seq_len)`` row is counted by
  ``torch.utils.flop_counter`` on CPU (matrix products, convolutions and attention; the scans' element-wise
  work is not counted), divided by ``seq_len``; training FLOPs = that x tokens trained.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ssmkit.data import DataConfig, default_corpus_root
from ssmkit.evals._report import format_table, parse_names, pyplot, resolve_device, save_figure, write_result
from ssmkit.evals.registry import register
from ssmkit.models import LanguageModel
from ssmkit.models.config import AttentionConfig, Mamba2Config, Mamba3Config, MambaConfig, MLPConfig, ModelConfig
from ssmkit.models.presets import BYTE_VOCAB_SIZE
from ssmkit.train import Trainer, TrainConfig
from ssmkit.train.metrics import read_metrics

FAMILIES = ("mamba", "mamba2", "mamba3", "transformer")
LABELS = {"mamba": "Mamba", "mamba2": "Mamba-2", "mamba3": "Mamba-3", "transformer": "Transformer"}
# Heads of 32 channels for Mamba-2/3 and attention: widths move in steps of 16 (SSMs, expand 2) or 32.
HEAD_DIM = 32


def family_config(family: str, d_model: int, n_layer: int, *, d_intermediate: int | None = None) -> ModelConfig:
    """The byte-level config of ``family`` at width ``d_model`` with ``n_layer`` mixer layers."""
    common: dict[str, Any] = {"vocab_size": BYTE_VOCAB_SIZE, "d_model": d_model}
    if family == "mamba":
        return ModelConfig(**common, n_layer=n_layer, layer_pattern="M", mamba=MambaConfig(d_state=16))
    if family == "mamba2":
        return ModelConfig(**common, n_layer=n_layer, layer_pattern="2",
                           mamba2=Mamba2Config(d_state=64, headdim=HEAD_DIM, chunk_size=64))
    if family == "mamba3":
        return ModelConfig(**common, n_layer=n_layer, layer_pattern="3",
                           mamba3=Mamba3Config(d_state=64, headdim=HEAD_DIM, chunk_size=64))
    if family == "transformer":
        heads = d_model // HEAD_DIM
        return ModelConfig(**common, n_layer=max(1, n_layer // 2), layer_pattern="Am",
                           attention=AttentionConfig(num_heads=heads, rotary_emb_dim=HEAD_DIM),
                           mlp=MLPConfig(d_intermediate=d_intermediate or 8 * d_model // 3 // 8 * 8))
    raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")


def count_parameters(config: ModelConfig) -> int:
    """Parameters of a :class:`LanguageModel` built from ``config`` (on the meta device: nothing allocated)."""
    return sum(p.numel() for p in LanguageModel(config, device=torch.device("meta")).parameters())


def sized_config(family: str, target_params: int, n_layer: int) -> ModelConfig:
    """The config of ``family`` whose parameter count is the closest to ``target_params``.

    SSMs: the width is searched in steps of 16. Transformer: widths in steps of 32 (heads of 32), and for
    each the SwiGLU width (a multiple of 8 in [2, 4] x d_model) that best fits the rest.
    """
    step = HEAD_DIM if family == "transformer" else HEAD_DIM // 2
    best: tuple[int, ModelConfig] | None = None
    for d_model in range(step, 4097, step):
        candidates = [family_config(family, d_model, n_layer)]
        if family == "transformer":
            small, large = (family_config(family, d_model, n_layer, d_intermediate=k * d_model) for k in (2, 4))
            p_small, p_large = count_parameters(small), count_parameters(large)
            # Parameters are linear in the MLP width: solve for the one that hits the target.
            width = 2 * d_model + (target_params - p_small) * (2 * d_model) / max(p_large - p_small, 1)
            width = min(max(round(width / 8) * 8, 2 * d_model), 4 * d_model)
            candidates = [family_config(family, d_model, n_layer, d_intermediate=width)]
        for config in candidates:
            error = abs(count_parameters(config) - target_params)
            if best is None or error < best[0]:
                best = (error, config)
        if count_parameters(candidates[0]) > 2 * target_params:
            break
    assert best is not None
    return best[1]


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs of one ``(1, seq_len)`` row, per token, counted by torch's flop counter."""
    model = LanguageModel(config)
    ids = torch.randint(0, 256, (1, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).loss.backward()
    return counter.get_total_flops() / seq_len


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(FAMILIES),
                        help=f"comma-separated model families to train, from {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--params", type=int, default=4_000_000,
                        help="target parameter count of every model, embedding included (default 4,000,000)")
    parser.add_argument("--n-layer", type=int, default=8,
                        help="mixer layers of each SSM; the transformer gets half as many attention+MLP blocks "
                             "(default 8)")
    parser.add_argument("--tokens", type=int, default=2**24,
                        help="training budget in tokens (bytes) for every model (default 2^24 = 16.8M)")
    parser.add_argument("--seq-len", type=int, default=512, help="bytes per training row (default 512)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per optimiser step (default 32)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, the same for all (default 2e-3)")
    parser.add_argument("--evals", type=int, default=8,
                        help="validation points along each run, for the curve (default 8)")
    parser.add_argument("--eval-tokens", type=int, default=2**18,
                        help="validation budget in bytes at each point (default 2^18)")
    parser.add_argument("--data", nargs="+", metavar="PATH",
                        help="files or folders of text (default: the Python standard library's .py files)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch order (default 0)")


def smoke_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The CI configuration: tiny models, a few dozen steps on one stdlib package."""
    return {"params": 60_000, "n_layer": 2, "tokens": 30 * 8 * 128, "seq_len": 128, "batch_size": 8, "evals": 2,
            "eval_tokens": 4096, "data": args.data or [str(default_corpus_root() / "json")]}


def run(args: argparse.Namespace, out_dir: Any) -> dict[str, Any]:
    """Train each family, print the table, write ``result.json`` and ``bpb_vs_flops.png``."""
    settings = {k: getattr(args, k) for k in ("models", "params", "n_layer", "tokens", "seq_len", "batch_size",
                                              "lr", "evals", "eval_tokens", "data", "seed")}
    if args.smoke:
        settings.update(smoke_overrides(args))
    families = parse_names(settings["models"], FAMILIES, "--models")
    for name in ("params", "n_layer", "tokens", "seq_len", "batch_size", "evals"):
        if settings[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {settings[name]}")
    device = resolve_device(args.device)
    out = Path(out_dir)
    tokens_per_step = settings["batch_size"] * settings["seq_len"]
    steps = max(1, settings["tokens"] // tokens_per_step)
    data = DataConfig(paths=list(settings["data"] or []), seq_len=settings["seq_len"])
    train = dict(steps=steps, batch_size=settings["batch_size"], lr=settings["lr"],
                 warmup_steps=min(100, max(1, steps // 10)), eval_every=max(1, steps // settings["evals"]),
                 eval_tokens=settings["eval_tokens"], checkpoint_every=0, checkpoint_minutes=0.0,
                 sample_tokens=0, progress=False, device=str(device), seed=settings["seed"], log_every=10)

    runs = []
    for family in families:
        config = sized_config(family, settings["params"], settings["n_layer"])
        flops_per_token = training_flops_per_token(config, settings["seq_len"])
        run_dir = out / "runs" / family
        # A rerun into the same --out starts this model's run afresh.
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"== {LABELS[family]}: d_model {config.d_model}, {config.n_layer} layers '{config.layer_pattern}'")
        fit = Trainer(config, TrainConfig(**train), data, run_dir).fit()
        curve = [{"step": r["step"], "tokens": r["step"] * tokens_per_step,
                  "flops": r["step"] * tokens_per_step * flops_per_token, "val_bpb": r["val_bpb"]}
                 for r in read_metrics(run_dir / "metrics.jsonl") if "val_bpb" in r]
        runs.append({"family": family, "label": LABELS[family], "config": config.to_dict(),
                     "params": count_parameters(config), "d_model": config.d_model, "n_layer": config.n_layer,
                     "layer_pattern": config.layer_pattern, "flops_per_token": flops_per_token,
                     "tokens": fit["tokens"], "steps": fit["step"],
                     "train_flops": fit["step"] * tokens_per_step * flops_per_token,
                     "val_bpb": fit.get("val_bpb", float("nan")), "train_seconds": fit["elapsed_s"],
                     "curve": curve, "run_dir": str(run_dir)})

    headers = ["model", "params", "d_model", "layers", "train FLOPs/token", "tokens", "train FLOPs", "val bpb",
               "train s"]
    rows = [[r["label"], r["params"], r["d_model"], r["n_layer"], float(r["flops_per_token"]), r["tokens"],
             float(r["train_flops"]), r["val_bpb"], r["train_seconds"]] for r in runs]
    table = format_table(headers, rows)
    print(table)
    plot = _plot(runs, out / "bpb_vs_flops.png", settings)
    result = {"task": "byte-lm", "smoke": bool(args.smoke), "device": str(device),
              "settings": settings,
              "steps": steps, "table": table, "runs": runs, "plots": [plot.name]}
    write_result(out, result)
    return result


def _plot(runs: list[dict[str, Any]], path: Path, settings: dict[str, Any]) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in runs:
        points = [(p["flops"], p["val_bpb"]) for p in r["curve"]]
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{r['label']} ({r['params'] / 1e6:.2f}M)")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (forward + backward, torch.utils.flop_counter)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(f"byte-level LM, {settings['tokens']:,} training bytes, seq {settings['seq_len']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


ENTRY = register("eval", "byte-lm",
                 "bits per byte vs training FLOPs: Mamba, Mamba-2, Mamba-3 and a transformer of equal size",
                 add_arguments, run)
