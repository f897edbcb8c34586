"""``ssmkit bench scaling``: cost of each sequence mixer against sequence length, and decode cost and memory.

For each mixer (Mamba, Mamba-2, Mamba-3, S4D, attention) a stack of ``--n-layer`` blocks of that mixer at
width ``--d-model`` (byte embedding → blocks, no vocabulary head, so the head's length x vocabulary
logits do not blur the picture) runs on one sequence of length L = ``--min-len``, 2 x, 4 x ... up to
``--max-len``. What is measured, per L:

- training step: forward, loss (mean square of the output), backward; wall time (median of
  ``--repeats`` after one warm-up call);
- memory of that step: on a GPU, ``torch.cuda.max_memory_allocated`` above what was allocated
  before (weights); on every device, the bytes of the tensors autograd keeps for the backward pass
  (through ``torch.autograd.graph.saved_tensors_hooks``, each storage counted once, weights left out),
  which is what grows with L. CPU process memory (RSS) is not used: the allocator keeps freed memory;
- prefill (inference): a fresh cache reads the whole sequence in one call under
  ``torch.inference_mode`` (the parallel form; attention's empty-cache path is the same causal SDPA);
- decode: then ``--decode-steps`` one-token steps from that cache, time per token;
- cache: the bytes of that cache after the L tokens (``ModelCache.nbytes``). SSM states do not depend
  on L; attention's KV cache grows linearly (in blocks of 256 tokens).

A series stops at the first length whose training step exceeds ``--max-seconds`` (that point is
kept), whose predicted time exceeds twice that, whose memory would pass ``--max-memory-gb``, or that
runs out of memory. Each series' log-log slope over its last points says how the cost grows
(1 = linear, 2 = quadratic).
"""

from __future__ import annotations

import argparse
import math
import statistics
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ssmkit.evals._common import add_options, resolve_device
from ssmkit.evals._common import settings as experiment_settings
from ssmkit.evals._report import (
    check_names,
    format_table,
    pyplot,
    save_figure,
    synchronize,
    timed,
    write_result,
)
from ssmkit.evals.registry import register
from ssmkit.models import ModelCache
from ssmkit.models import LanguageModel
from ssmkit.models.config import (
    AttentionConfig,
    Mamba2Config,
    Mamba3Config,
    MambaConfig,
    ModelConfig,
    S4DConfig,
)

MIXERS = ("mamba", "mamba2", "mamba3", "s4d", "attention")
LABELS = {"mamba": "Mamba", "mamba2": "Mamba-2", "mamba3": "Mamba-3", "s4d": "S4D", "attention": "Attention"}
HEAD_DIM = 32


def mixer_config(mixer: str, d_model: int, n_layer: int) -> ModelConfig:
    """``n_layer`` blocks of ``mixer`` (no feed-forward) at width ``d_model``, byte vocabulary."""
    common: dict[str, Any] = {"vocab_size": 256, "d_model": d_model, "n_layer": n_layer}
    if mixer == "mamba":
        return ModelConfig(**common, layer_pattern="M", mamba=MambaConfig(d_state=16))
    if mixer == "mamba2":
        return ModelConfig(**common, layer_pattern="2", mamba2=Mamba2Config(d_state=64, headdim=HEAD_DIM))
    if mixer == "mamba3":
        return ModelConfig(**common, layer_pattern="3", mamba3=Mamba3Config(d_state=64, headdim=HEAD_DIM))
    if mixer == "s4d":
        return ModelConfig(**common, layer_pattern="S", s4d=S4DConfig(d_state=64))
    if mixer == "attention":
        return ModelConfig(**common, layer_pattern="A",
                           attention=AttentionConfig(num_heads=max(1, d_model // HEAD_DIM), rotary_emb_dim=HEAD_DIM))
    raise ValueError(f"unknown mixer {mixer!r}; known: {', '.join(MIXERS)}")


def stack_output(model: LanguageModel, ids: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
    """Embedding and blocks of ``model`` on ``ids`` (b, l): the residual stream (b, l, d_model).

    With ``cache`` the tokens continue from it and it is updated in place (prefill, then decode steps).
    """
    residual = inputs = model.embedding(ids)
    for i, block in enumerate(model.layers):
        residual = block(residual, cache=None if cache is None else cache.states[i], inputs=inputs)
    if cache is not None:
        cache.seqlen_offset += ids.shape[1]
    return residual


def saved_activation_bytes(model: LanguageModel, ids: torch.Tensor, autocast: Any) -> int:
    """Bytes of the tensors autograd saves for backward in one forward of ``ids`` (weights excluded,
    each storage counted once)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        stack_output(model, ids)
    return sum(storages.values())


def measure(model: LanguageModel, length: int, device: torch.device, autocast: Any, cache_dtype: torch.dtype,
            repeats: int, max_seconds: float, decode_steps: int) -> dict[str, Any]:
    """Training-step, prefill and decode figures of one sequence of ``length`` tokens (see the module doc)."""
    ids = torch.randint(0, 256, (1, length), device=device)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast:
            out = stack_output(model, ids)
        out.float().square().mean().backward()

    def prefill() -> ModelCache:
        cache = model.allocate_cache(1, dtype=cache_dtype, device=device)
        with torch.inference_mode(), autocast:
            stack_output(model, ids, cache)
        return cache

    record: dict[str, Any] = {"length": length, "saved_bytes": saved_activation_bytes(model, ids, autocast)}
    for name, fn in (("train", train_step), ("infer", prefill)):
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        first, cache = timed(fn, device)
        if device.type == "cuda":
            record[f"{name}_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        # The first call pays one-off costs (kernel compilation and autotuning for a new length, allocator
        # growth), so it is never the figure unless it alone is over the limit; when slow, one repeat.
        n_timed = repeats if first < max_seconds / 4 else 1 if first <= max_seconds else 0
        times = [timed(fn, device)[0] for _ in range(n_timed)]
        record[f"{name}_s"] = statistics.median(times) if times else first
    model.zero_grad(set_to_none=True)
    record["cache_bytes"] = cache.nbytes

    token = ids[:, -1:]

    def decode() -> None:
        with torch.inference_mode(), autocast:
            for _ in range(decode_steps):
                stack_output(model, token, cache)

    # One step first: a KV cache filled to its capacity grows by a block here, not in the timed steps.
    with torch.inference_mode(), autocast:
        stack_output(model, token, cache)
    record["decode_s"] = timed(decode, device)[0] / decode_steps
    return record


# A CPU training step's peak memory per byte of saved activations (see _predicted_over).
CPU_PEAK_PER_SAVED_BYTE = 2.6

FULL = {"mixers": list(MIXERS), "d_model": 256, "n_layer": 2, "min_len": 1024, "max_len": 2**20, "max_seconds": 5.0,
        "repeats": 2, "decode_steps": 16, "precision": "auto", "seed": 0}
SMOKE = {**FULL, "d_model": 32, "n_layer": 1, "min_len": 256, "max_len": 2048, "repeats": 1, "decode_steps": 4}
HELP = {
    "mixers": f"sequence mixers to measure, from {', '.join(MIXERS)}",
    "d_model": "width of every stack",
    "n_layer": "blocks per stack",
    "min_len": "shortest sequence (then doubled up to --max-len)",
    "max_len": "longest sequence",
    "max_seconds": "stop a series after a training step slower than this",
    "repeats": "timed calls after the warm-up (the median is reported)",
    "decode_steps": "one-token steps timed after each prefill (the mean is reported)",
    "precision": "auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16",
    "seed": "seed of the weights and inputs",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, FULL, SMOKE, HELP)
    parser.add_argument("--max-memory-gb", type=float, default=None, metavar="GB",
                        help="stop a series before its memory would pass this (default: 90%% of the GPU's "
                             "memory; on CPU 4 GB, the step's peak taken as 2.6 times its saved activations)")


def run(args: argparse.Namespace, out_dir: Any) -> dict[str, Any]:
    """Measure every series, print the tables, write ``result.json`` and ``scaling.png``."""
    settings = {**experiment_settings(args, FULL, SMOKE), "max_memory_gb": args.max_memory_gb}
    mixers = check_names(settings["mixers"], MIXERS, "--mixers")
    if settings["precision"] not in ("auto", "fp32", "bf16"):
        raise ValueError(f"--precision must be auto, fp32 or bf16, got {settings['precision']!r}")
    for name in ("d_model", "n_layer", "min_len", "max_len", "repeats", "decode_steps"):
        if settings[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {settings[name]}")
    if settings["max_len"] < settings["min_len"]:
        raise ValueError(f"--max-len {settings['max_len']} is below --min-len {settings['min_len']}")
    device = resolve_device(args.device)
    precision = settings["precision"]
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    cache_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    limit_gb = settings["max_memory_gb"]
    if limit_gb is None:
        limit_gb = 0.9 * torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 4.0
    lengths = [settings["min_len"] << k for k in range(64) if settings["min_len"] << k <= settings["max_len"]]

    series: dict[str, dict[str, Any]] = {}
    for mixer in mixers:
        torch.manual_seed(settings["seed"])
        config = mixer_config(mixer, settings["d_model"], settings["n_layer"])
        model = LanguageModel(config, device=device)
        points: list[dict[str, Any]] = []
        stopped = "reached --max-len"
        for length in lengths:
            reason = _predicted_over(points, length, settings["max_seconds"], limit_gb, device)
            if reason:
                stopped = reason
                break
            try:
                point = measure(model, length, device, autocast, cache_dtype, settings["repeats"],
                                settings["max_seconds"], settings["decode_steps"])
            except torch.OutOfMemoryError:
                stopped = f"out of memory at L={length:,}"
                break
            finally:
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            points.append(point)
            print(f"{LABELS[mixer]:>9} L={length:>9,}: train {point['train_s'] * 1e3:9.1f} ms, "
                  f"prefill {point['infer_s'] * 1e3:9.1f} ms, decode {point['decode_s'] * 1e3:6.2f} ms/token, "
                  f"saved activations {point['saved_bytes'] / 2**20:9.1f} MiB, "
                  f"cache {point['cache_bytes'] / 2**10:9.1f} KiB")
            if point["train_s"] > settings["max_seconds"]:
                stopped = f"training step over {settings['max_seconds']} s at L={length:,}"
                break
        series[mixer] = {"label": LABELS[mixer], "config": config.to_dict(),
                         "params": sum(p.numel() for p in model.parameters()), "points": points, "stopped": stopped,
                         "slopes": {key: _slope(points, key)
                                    for key in ("train_s", "infer_s", "decode_s", "saved_bytes", "cache_bytes")}}
        del model
        # Written after every series, so that a run killed later (the OS's out-of-memory killer at the
        # longest lengths) keeps what it measured.
        result = _write(out_dir, series, lengths, settings={**settings, "max_memory_gb": limit_gb},
                        smoke=bool(args.smoke), device=device, precision=precision)

    for title, table in result["tables"].items():
        print(f"\n{title}\n{table}")
    for s in series.values():
        print(f"{s['label']}: {s['stopped']}")
    return result


def _write(out_dir: Any, series: dict[str, dict[str, Any]], lengths: list[int], *, settings: dict[str, Any],
           smoke: bool, device: torch.device, precision: str) -> dict[str, Any]:
    """Tables, plot and ``result.json`` of the series measured so far."""
    tables = _tables(series, lengths, device)
    plot = _plot(series, Path(out_dir) / "scaling.png", settings, device, precision)
    result = {"bench": "scaling", "smoke": smoke, "device": str(device), "precision": precision,
              "settings": settings, "lengths": lengths, "series": series, "tables": tables, "plots": [plot.name]}
    write_result(Path(out_dir), result)
    return result


def _predicted_over(points: list[dict[str, Any]], length: int, max_seconds: float, limit_gb: float,
                    device: torch.device) -> str:
    """Why the next length should not be run (empty when it should): extrapolated from the last two points."""
    if len(points) < 2:
        return ""
    a, b = points[-2], points[-1]

    def predicted(key: str) -> float:
        # Growth at least linear, and as steep as between the last two points.
        exponent = math.log(max(b[key], 1e-12) / max(a[key], 1e-12)) / math.log(b["length"] / a["length"])
        return b[key] * (length / b["length"]) ** max(1.0, exponent)

    if predicted("train_s") > 2 * max_seconds:
        return f"predicted training step over 2 x {max_seconds} s at L={length:,}"
    if device.type == "cuda":
        memory = predicted("train_peak_bytes")
    else:
        # The CPU has no peak counter; during the backward the activations' gradients live beside the
        # saved activations. Measured on a 23 GB machine at L = 2^20: Mamba (9.0 GB saved) finished once
        # and was killed once by the OS, Mamba-2 (10.9 GB) was killed: the peak is about 2.5 times.
        memory = CPU_PEAK_PER_SAVED_BYTE * predicted("saved_bytes")
    if memory > limit_gb * 2**30:
        return f"predicted memory over {limit_gb:.1f} GB at L={length:,}"
    return ""


def _slope(points: list[dict[str, Any]], key: str, last: int = 3) -> float | None:
    """Least-squares slope of log(value) against log(L) over the last ``last`` points."""
    pts = [(math.log(p["length"]), math.log(p[key])) for p in points[-last:] if p[key] > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def _tables(series: dict[str, dict[str, Any]], lengths: list[int], device: torch.device) -> dict[str, str]:
    """One table per quantity: mixers as rows, lengths as columns, plus the log-log slope."""
    quantities = {"training step (ms)": ("train_s", 1e3), "prefill of L tokens (ms)": ("infer_s", 1e3),
                  "decode after L tokens (ms per token)": ("decode_s", 1e3),
                  "saved activations for backward (MiB)": ("saved_bytes", 2**-20),
                  "cache after L tokens (KiB)": ("cache_bytes", 2**-10)}
    if device.type == "cuda":
        quantities["training step peak GPU memory (MiB)"] = ("train_peak_bytes", 2**-20)
    tables = {}
    for title, (key, scale) in quantities.items():
        rows = []
        for s in series.values():
            by_length = {p["length"]: p[key] * scale for p in s["points"]}
            slope = _slope(s["points"], key)
            rows.append([s["label"], *(by_length.get(n) for n in lengths), None if slope is None else round(slope, 2)])
        tables[title] = format_table(["mixer", *(_short(n) for n in lengths), "slope"], rows)
    return tables


def _short(n: int) -> str:
    return f"{n >> 20}M" if n >= 2**20 and n % 2**20 == 0 else f"{n >> 10}K" if n % 1024 == 0 else str(n)


def _plot(series: dict[str, dict[str, Any]], path: Path, settings: dict[str, Any], device: torch.device,
          precision: str) -> Path:
    plt = pyplot()
    memory_key = "train_peak_bytes" if device.type == "cuda" else "saved_bytes"
    memory_label = "peak GPU memory of a training step (MiB)" if device.type == "cuda" else \
        "activations saved for backward (MiB)"
    panels = [("train_s", 1e3, "training step (ms)"), ("infer_s", 1e3, "prefill of L tokens (ms)"),
              ("decode_s", 1e3, "decode after L tokens (ms per token)"), (memory_key, 2**-20, memory_label),
              ("cache_bytes", 2**-10, "cache after L tokens (KiB)")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    axes.flat[-1].axis("off")
    for ax, (key, scale, label) in zip(axes.flat, panels):
        for s in series.values():
            pts = [(p["length"], p[key] * scale) for p in s["points"] if p.get(key)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=s["label"])
        ax.set(xscale="log", yscale="log", xlabel="sequence length L (tokens)", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{settings['n_layer']} blocks, d_model {settings['d_model']}, batch 1, {device.type} {precision}")
    return save_figure(fig, path)


ENTRY = register("bench", "scaling",
                 "training/inference time and memory vs sequence length per mixer; decode cache vs tokens read",
                 add_arguments, run)
