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
  ``torch.utils.flop_counter`` on CPU (matrix products and convolutions, which include attention and
  the chunked SSD form of Mamba-2/3; the scans' element-wise work is not counted), divided by
  ``seq_len``; training FLOPs = that x tokens trained. Attention is counted as PyTorch's math backend
  computes it: the full L x L score matrix (causal GPU kernels skip about half of it).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ssmkit.data import DataConfig, default_corpus_root
from ssmkit.evals._common import add_options, resolve_device
from ssmkit.evals._common import settings as experiment_settings
from ssmkit.evals._merge import add_option as add_merge_option
from ssmkit.evals._merge import merge_runs, relocate_run_dirs
from ssmkit.evals._report import (
    check_names,
    format_table,
    pyplot,
    save_figure,
    write_result,
)
from ssmkit.evals.registry import register
from ssmkit.models import LanguageModel
from ssmkit.models.config import (
    AttentionConfig,
    Mamba2Config,
    Mamba3Config,
    MambaConfig,
    MLPConfig,
    ModelConfig,
)
from ssmkit.data.tokenizer import BYTE_VOCAB_SIZE
from ssmkit.train import TrainConfig, Trainer
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
        config = family_config(family, d_model, n_layer)
        if family == "transformer":
            small, large = (family_config(family, d_model, n_layer, d_intermediate=k * d_model) for k in (2, 4))
            p_small, p_large = count_parameters(small), count_parameters(large)
            # Parameters are linear in the MLP width: solve for the one that hits the target.
            width = 2 * d_model + (target_params - p_small) * (2 * d_model) / max(p_large - p_small, 1)
            width = min(max(round(width / 8) * 8, 2 * d_model), 4 * d_model)
            config = family_config(family, d_model, n_layer, d_intermediate=width)
        params = count_parameters(config)
        if best is None or abs(params - target_params) < best[0]:
            best = (abs(params - target_params), config)
        if params > 2 * target_params:
            break
    assert best is not None
    return best[1]


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs of one ``(1, seq_len)`` row, per token, counted by torch's flop counter."""
    model = LanguageModel(config)
    ids = torch.randint(0, 256, (1, seq_len))
    # The math backend spells attention out as matrix products, which the counter sees (it has no
    # formula for the CPU flash kernel): the full L x L scores, where a causal GPU kernel skips about half.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(ids, labels=ids).loss.backward()
    return counter.get_total_flops() / seq_len


FULL = {"models": list(FAMILIES), "params": 4_000_000, "n_layer": 8, "tokens": 2**23, "seq_len": 512,
        "batch_size": 32, "lr": 2e-3, "evals": 8, "eval_tokens": 2**18, "seed": 0}
SMOKE = {**FULL, "params": 60_000, "n_layer": 2, "tokens": 30 * 8 * 128, "seq_len": 128,
         "batch_size": 8, "evals": 2, "eval_tokens": 4096}
HELP = {
    "models": f"model families to train, from {', '.join(FAMILIES)}",
    "params": "target parameter count of every model, embedding included",
    "n_layer": "mixer layers of each SSM; the transformer gets half as many attention+MLP blocks",
    "tokens": "training budget in tokens (bytes), the same for every model",
    "seq_len": "bytes per training row",
    "batch_size": "rows per optimiser step",
    "lr": "peak learning rate (AdamW, warm-up then cosine), the same for every model",
    "evals": "validation points along each run (the curve)",
    "eval_tokens": "validation budget in bytes at each point",
    "seed": "seed of the weights and the batch order",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, FULL, SMOKE, HELP)
    parser.add_argument("--data", nargs="+", metavar="PATH", default=None,
                        help="files or folders of text (default: the Python standard library's .py files; "
                             "with --smoke: its json package)")
    add_merge_option(parser)


def run(args: argparse.Namespace, out_dir: Any) -> dict[str, Any]:
    """Train each family, print the table, write ``result.json`` and ``bpb_vs_flops.png``."""
    if args.merge:
        # Each run's training folder stays in its part; run_dir then points there from --out.
        return merge_runs(args, Path(out_dir), "byte-lm", report, [*FULL, "data"], runs_key="runs",
                          name_key="family", relocate=relocate_run_dirs)
    settings = experiment_settings(args, FULL, SMOKE)
    settings["data"] = args.data or ([str(default_corpus_root() / "json")] if args.smoke else [])
    families = check_names(settings["models"], FAMILIES, "--models")
    for name in ("params", "n_layer", "tokens", "seq_len", "batch_size", "evals"):
        if settings[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {settings[name]}")
    device = resolve_device(args.device)
    out = Path(out_dir)
    tokens_per_step = settings["batch_size"] * settings["seq_len"]
    steps = max(1, settings["tokens"] // tokens_per_step)
    data = DataConfig(paths=list(settings["data"]), seq_len=settings["seq_len"])
    train = {"steps": steps, "batch_size": settings["batch_size"], "lr": settings["lr"],
             "warmup_steps": min(100, max(1, steps // 10)), "eval_every": max(1, -(-steps // settings["evals"])),
             "eval_tokens": settings["eval_tokens"], "checkpoint_every": 0, "checkpoint_minutes": 0.0,
             "sample_tokens": 0, "progress": False, "device": str(device), "seed": settings["seed"], "log_every": 10}

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
                     "curve": curve, "run_dir": str(run_dir.relative_to(out))})

    result = {"task": "byte-lm", "smoke": bool(args.smoke), "device": str(device), "settings": settings,
              "steps": steps, "runs": runs}
    print(report(result, out))
    write_result(out, result)
    return result


def report(result: dict[str, Any], out_dir: Path) -> str:
    """Set ``result["table"]`` and ``result["plots"]``, drawing ``bpb_vs_flops.png``, from a finished result;
    returns the table."""
    runs = result["runs"]
    headers = ["model", "params", "d_model", "layers", "train FLOPs/token", "tokens", "train FLOPs", "val bpb",
               "train s"]
    # float(): a diverged run's NaN comes back from result.json as the string "nan".
    rows = [[r["label"], r["params"], r["d_model"], r["n_layer"], float(r["flops_per_token"]), r["tokens"],
             float(r["train_flops"]), float(r["val_bpb"]), r["train_seconds"]] for r in runs]
    result["table"] = format_table(headers, rows)
    result["plots"] = [_plot(runs, Path(out_dir) / "bpb_vs_flops.png", result["settings"]).name]
    return result["table"]


def _plot(runs: list[dict[str, Any]], path: Path, settings: dict[str, Any]) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in runs:
        points = [(p["flops"], float(p["val_bpb"])) for p in r["curve"]]
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
