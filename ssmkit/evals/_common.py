"""Machinery shared by the synthetic-task evals: options with full and ``--smoke`` defaults, model configs of
matched size, a small training loop, accuracy with chunked (recurrent) inference, tables and result files."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ssmkit.data.synthetic import IGNORE, SyntheticBatch
from ssmkit.models import LanguageModel, LanguageModelOutput, ModelConfig
from ssmkit.models.config import (
    AttentionConfig,
    Mamba2Config,
    MambaConfig,
    MLPConfig,
    S4DConfig,
    write_text_atomic,
)
from ssmkit.models.language_model import param_groups

MODEL_KINDS = ("mamba", "mamba2", "s4d", "attention", "hybrid")


def add_options(parser: argparse.ArgumentParser, full: dict[str, Any], smoke: dict[str, Any],
                helps: dict[str, str]) -> None:
    """One ``--key`` option per entry of ``full``: default None, filled by :func:`settings` from ``full`` or,
    with ``--smoke``, from ``smoke``. Lists take several values; their element type is the first one's."""
    for key, value in full.items():
        flag = "--" + key.replace("_", "-")
        shown = f"(default: {_show(value)}; with --smoke: {_show(smoke[key])})"
        if isinstance(value, list):
            parser.add_argument(flag, dest=key, nargs="+", type=type(value[0]), default=None,
                                metavar=key.upper(), help=f"{helps[key]} {shown}")
        else:
            parser.add_argument(flag, dest=key, type=type(value), default=None, metavar=key.upper(),
                                help=f"{helps[key]} {shown}")


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def settings(args: argparse.Namespace, full: dict[str, Any], smoke: dict[str, Any]) -> dict[str, Any]:
    """The run's settings: options given on the command line, else the full (or smoke) defaults."""
    base = smoke if getattr(args, "smoke", False) else full
    return {k: base[k] if getattr(args, k, None) is None else getattr(args, k) for k in full}


def resolve_device(name: str) -> torch.device:
    """``auto`` = cuda when available, else cpu; asking for cuda without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available")
    return torch.device(name)


def n_params(model: torch.nn.Module, *, embedding: bool = False) -> int:
    """Parameters of ``model``, without the (tied) embedding unless asked."""
    total = sum(p.numel() for p in model.parameters())
    return total if embedding else total - model.embedding.weight.numel()


def _layer_params(config: ModelConfig) -> int:
    return n_params(LanguageModel(config)) // config.n_layer


def model_config(kind: str, vocab_size: int, d_model: int, n_layer: int, d_state: int) -> ModelConfig:
    """A model of ``kind`` (one of :data:`MODEL_KINDS`) whose layers have about the parameters of a Mamba
    layer of the same ``d_model``, so models of one size differ only in how they mix the sequence.

    mamba: Mamba (S6) layers. mamba2: Mamba-2, heads of 16. s4d: S4D layers (time-invariant) with a SwiGLU
    MLP sized to match. attention: causal attention with rotary positions and a matching MLP. hybrid:
    Mamba layers with one matched attention layer at index 1 (the second layer).
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose from {', '.join(MODEL_KINDS)}")
    common = dict(vocab_size=vocab_size, d_model=d_model, mamba=MambaConfig(d_state=d_state))
    if kind == "mamba":
        return ModelConfig(n_layer=n_layer, layer_pattern="M", **common)
    if kind == "mamba2":
        return ModelConfig(n_layer=n_layer, layer_pattern="2", **common,
                           mamba2=Mamba2Config(d_state=d_state, headdim=16, chunk_size=64))
    target = _layer_params(ModelConfig(n_layer=1, layer_pattern="M", **common))
    heads = max(1, d_model // 16)
    mixer = {"s4d": "S", "attention": "A", "hybrid": "A"}[kind]
    extra = dict(s4d=S4DConfig(d_state=d_state),
                 attention=AttentionConfig(num_heads=heads, rotary_emb_dim=0 if kind == "hybrid" else 16))
    bare = _layer_params(ModelConfig(n_layer=1, layer_pattern=mixer, **common, **extra))
    # A SwiGLU MLP of width w has 3 * d_model * w weights: make up the difference, in multiples of 8.
    width = max(8, round((target - bare) / (3 * d_model) / 8) * 8)
    extra["mlp"] = MLPConfig(d_intermediate=width)
    if kind == "hybrid":
        if n_layer < 2:
            raise ValueError("a hybrid needs n_layer >= 2 (one attention layer among Mamba layers)")
        pattern = "MAm" + "M" * (n_layer - 2)
    else:
        pattern = mixer + "m"
    return ModelConfig(n_layer=n_layer, layer_pattern=pattern, **common, **extra)


def _autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return torch.autocast("cpu", enabled=False)


def scored_loss(out: LanguageModelOutput, batch: SyntheticBatch, lm_weight: float = 0.0) -> torch.Tensor:
    """The model's loss for ``targets=batch.targets`` (mean cross-entropy at the scored positions, plus the
    router losses of MoE models), plus ``lm_weight`` times the next-token loss of the inputs (for tasks that
    are also language modelling)."""
    loss = out.loss
    if lm_weight:
        lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), batch.inputs[:, 1:].flatten())
        loss = loss + lm_weight * lm
    return loss


def train(model: LanguageModel, make_batch: Callable[[torch.Generator], SyntheticBatch], *, steps: int, lr: float,
          device: torch.device, seed: int, label: str, lm_weight: float = 0.0, log_every: int = 0,
          weight_decay: float = 0.1) -> list[dict[str, float]]:
    """Train ``model`` on fresh batches for ``steps`` AdamW steps (linear warm-up over 10%, cosine to 10% of
    ``lr``, gradients clipped at 1); returns the loss history ``[{step, loss, seconds}]``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    history, start, running = [], time.perf_counter(), 0.0
    log_every = log_every or max(1, steps // 10)
    model.train()
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        batch = make_batch(generator)
        batch = SyntheticBatch(batch.inputs.to(device), batch.targets.to(device))
        with _autocast(device):
            out = model(batch.inputs, targets=batch.targets)
        loss = scored_loss(out, batch, lm_weight)
        if not torch.isfinite(loss):
            raise ValueError(f"{label}: the loss became {loss.item()} at step {step}; try a lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            history.append({"step": step + 1, "loss": running / n, "seconds": time.perf_counter() - start})
            print(f"  {label}: step {step + 1}/{steps} loss {running / n:.4f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
            running = 0.0
    model.eval()
    return history


@torch.no_grad()
def predict_scored(model: LanguageModel, batch: SyntheticBatch, device: torch.device,
                   chunk_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax predictions and targets at the scored positions, each flattened to (k,) in row-major order
    (row by row, left to right).

    With ``chunk_len`` > 0 the sequence is read ``chunk_len`` positions at a time through the model's
    cache (recurrent inference: memory bounded by the chunk, whatever the length), else in one pass.
    Inference runs in the weights' dtype (float32), so the cache and the activations agree.
    """
    model.eval()
    inputs, targets = batch.inputs.to(device), batch.targets.to(device)
    vocab = model.config.vocab_size
    length = inputs.shape[1]
    step = chunk_len if 0 < chunk_len < length else length
    cache = model.allocate_cache(inputs.shape[0], device=device) if step < length else None
    preds, wanted, where = [], [], []
    for start in range(0, length, step):
        part = targets[:, start:start + step]
        logits = model(inputs[:, start:start + step], cache=cache).logits
        keep = part != IGNORE
        preds.append(logits[..., :vocab][keep].argmax(-1))
        wanted.append(part[keep])
        row, col = keep.nonzero(as_tuple=True)
        where.append(row * length + col + start)
    order = torch.cat(where).argsort()
    return torch.cat(preds)[order].cpu(), torch.cat(wanted)[order].cpu()


def accuracy(model: LanguageModel, batches: Sequence[SyntheticBatch], device: torch.device,
             chunk_len: int = 0) -> float:
    """Fraction of scored positions, over ``batches``, where the model's argmax is the target."""
    right = total = 0
    for batch in batches:
        pred, want = predict_scored(model, batch, device, chunk_len)
        right += int((pred == want).sum())
        total += want.numel()
    return right / max(total, 1)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table, columns aligned (numbers right, text left)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_result(out_dir: Path, result: dict[str, Any]) -> Path:
    """``result.json`` in ``out_dir``, written atomically."""
    path = Path(out_dir) / "result.json"
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    return path


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'ssmkit[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Save ``fig`` as a PNG through a temporary name (atomic) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    tmp.replace(path)
    return path


def run_info(task: str, args: argparse.Namespace, config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The header of every result.json: what ran, with which settings, where."""
    return {"task": task, "smoke": bool(getattr(args, "smoke", False)), "device": str(device),
            "torch": torch.__version__, "settings": config}
