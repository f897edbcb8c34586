"""Whole-model training step, tokens/s: ssmkit's language models against the same models from mamba_ssm's modules.

For each model, ssmkit's :class:`~ssmkit.models.LanguageModel` of the preset (``mamba2-130m``; ``mamba3-130m``,
24 single-input Mamba-3 layers at mamba_ssm's Mamba3 defaults) and :class:`mamba_ssm_lm.MambaSsmLM`, the same
model built from mamba_ssm 2.3.2's ``Block``, Triton RMSNorm / fused add + norm and its ``Mamba2`` or
``Mamba3`` mixer (from its source under ``.ext/``, as ``benchmarks/mamba_ssm_source.py`` loads it). The peer
is given ssmkit's initial weights (same parameter names); at every length both start from those weights with a
new optimizer and see the same batches, and their first-step losses are printed side by side as a check that
they compute the same model (on CPU, ``benchmarks/train_step_parity_interpreter.py`` checks it exactly).

One training step: forward with the loss (mean next-token cross-entropy in float32 over the tied head's
logits), backward, gradient clipping at norm 1, ``torch.optim.AdamW`` (fused on CUDA, lr 3e-4, weight decay
0.1 on every parameter), ``zero_grad(set_to_none=True)``. Precision: **float32 weights under bf16 autocast**
on CUDA for both (float32 without autocast in the CPU smoke mode). Random token batches from one seed,
``--warmup`` steps first (Triton autotuning and compilation happen there), then the median of ``--steps``
steps, each timed between ``torch.cuda.synchronize()`` calls; tokens/s = batch × L / median step time.
Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps (weights, AdamW state, activations).

mamba_ssm's fused Mamba-2 path (``use_mem_eff_path=True``) calls causal_conv1d's CUDA extension; where that
does not import, its unfused path runs (``nn.Conv1d``, the SSD Triton kernels, the gated-norm kernel) and the
table says so. A peer that cannot be built or run prints why in its row.

``mamba-130m`` (Mamba-1, not run by default) has no mamba_ssm peer here (mamba_ssm's Mamba-1 mixer needs its CUDA
extensions); it compares ssmkit with itself: ``--mamba1-layout channel time`` times one ssmkit row per scan
layout (``ssmkit.layers.mamba.SCAN_LAYOUT``: ``channel``, u/z/Δ channel-contiguous; ``time``, mamba_ssm's layer
layout, unit time stride into the scan, what the default ``auto`` picks on CUDA) on the same weights and batches, and prints the
time/channel ratio.

    python benchmarks/gpu_train_step.py                               # both models, b8 x 2048 and 8192
    python benchmarks/gpu_train_step.py --models mamba3-130m --lengths 2048 --steps 5
    python benchmarks/gpu_train_step.py --device cpu --quick          # smoke run, tiny models, ssmkit rows only
    python benchmarks/gpu_train_step.py --models mamba-130m --mamba1-layout channel time --lengths 2048
    python benchmarks/gpu_train_step.py --device cpu --build-only     # both sides built full size, counts only
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from mamba_ssm_lm import build_peer
from torch import nn

import ssmkit.layers.mamba as mamba1_layer
from ssmkit.models import LanguageModel, ModelConfig, get_preset
from ssmkit.models.config import Mamba2Config, Mamba3Config, MambaConfig

MODELS = ("mamba2-130m", "mamba3-130m", "mamba-130m")
DEFAULT_MODELS = ("mamba2-130m", "mamba3-130m")

# --quick: the presets' layer kinds at a size a CPU steps through in well under a second.
QUICK = {
    "mamba2-130m": lambda: ModelConfig(vocab_size=256, d_model=64, n_layer=2, layer_pattern="2",
                                       mamba2=Mamba2Config(d_state=16, headdim=16, chunk_size=16)),
    "mamba3-130m": lambda: ModelConfig(vocab_size=256, d_model=64, n_layer=2, layer_pattern="3",
                                       mamba3=Mamba3Config(d_state=16, headdim=16, chunk_size=16)),
    "mamba-130m": lambda: ModelConfig(vocab_size=256, d_model=64, n_layer=2, layer_pattern="M",
                                      mamba=MambaConfig(d_state=16)),
}


@dataclass
class Run:
    """One side's result at one length: tokens/s, peak bytes and first-step loss, or why there is none."""

    tokens_per_s: float | None = None
    peak_bytes: int | None = None
    first_loss: float | None = None
    error: str | None = None


def token_batches(vocab_size: int, batch: int, length: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` random (batch, length + 1) id tensors on the CPU: inputs are [:, :-1], targets [:, 1:]."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (batch, length + 1), generator=generator) for _ in range(count)]


def train_steps(loss_fn, model: nn.Module, weights: dict[str, torch.Tensor], batches: list[torch.Tensor],
                warmup: int, device: torch.device) -> Run:
    """Step ``model``, from ``weights`` and a new optimizer, through ``batches`` (the first ``warmup`` untimed);
    the median timed step as tokens/s."""
    cuda = device.type == "cuda"
    model.load_state_dict(weights)  # every length starts from the same initial weights, on both sides
    model.zero_grad(set_to_none=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    times, first_loss = [], None
    for i, ids in enumerate(batches):
        if i == warmup and cuda:
            torch.cuda.reset_peak_memory_stats(device)
        ids = ids.to(device, non_blocking=True)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast:
            loss = loss_fn(model, ids[:, :-1], ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
        if i == 0:
            first_loss = loss.item()
    tokens = batches[0].shape[0] * (batches[0].shape[1] - 1)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return Run(tokens / statistics.median(times), peak, first_loss)


def ssmkit_loss(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return model(ids, targets=targets).loss


def peer_loss(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return model(ids, targets)


def guarded(fn, *args) -> Run:
    """``fn(*args)``, with an out-of-memory or any other failure turned into a row that says why."""
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError:
        return Run(error="out of memory")
    except Exception as e:  # noqa: BLE001 - one side failing must not lose the other rows
        return Run(error=f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def progress(side: str, length: int, run: Run) -> Run:
    """Print one side's result as soon as it is measured (a run cut short by a time limit keeps them)."""
    if run.error is not None:
        print(f"  {side} L={length}: {run.error}", flush=True)
    else:
        peak = "" if run.peak_bytes is None else f", peak {run.peak_bytes / 2**30:.1f} GiB"
        print(f"  {side} L={length}: {run.tokens_per_s:,.0f} tokens/s{peak}, step-0 loss {run.first_loss:.4f}",
              flush=True)
    return run


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bench_model(name: str, config: ModelConfig, args: argparse.Namespace,
                device: torch.device) -> tuple[str, list[list]]:
    """(the model's header line: parameter counts and how mamba_ssm's mixer runs, rows [name, L, ours, theirs]
    at every length); prints the header and each side's result as they come.

    Length by length, ssmkit's side then mamba_ssm's, each on the device only while it runs, so that a run cut
    short by a time limit has printed whole pairs."""
    torch.manual_seed(0)
    ours = LanguageModel(config)
    weights = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    built = build_peer(config, device="cpu")
    if isinstance(built, str):
        theirs, note = None, built
    else:
        theirs, note = built
    n_theirs = "n/a" if theirs is None else f"{count(theirs):,}"
    if theirs is not None:
        try:
            theirs.load_state_dict(weights)  # strict: the same parameters under the same names and shapes
        except RuntimeError as e:
            theirs, note = None, f"ssmkit's weights do not load into it: {str(e)[:300]}"
    header = f"{name}: parameters ssmkit {count(ours):,}, mamba_ssm {n_theirs}; mamba_ssm mixer: {note}"
    print(f"\n{header}", flush=True)
    if device.type != "cuda" and theirs is not None:
        theirs, note = None, "not run: mamba_ssm's Triton kernels need CUDA"
    mamba1 = any(spec.mixer == "mamba" for spec in config.layer_specs())
    # One ssmkit side per Mamba-1 scan layout asked for (the layer reads the switch at every call).
    layouts = args.mamba1_layout if mamba1 else [None]
    sides = [("ssmkit" if layout is None else f"ssmkit {layout}", ssmkit_loss, ours, layout) for layout in layouts]
    sides += [("mamba_ssm", peer_loss, theirs, None)] if theirs is not None else []
    rows = []
    for length in args.lengths:
        batches = token_batches(config.vocab_size, args.batch_size, length, args.warmup + args.steps)
        runs = {"mamba_ssm": Run(error=note)}
        for side, loss_fn, model, layout in sides:
            model.to(device)
            saved, mamba1_layer.SCAN_LAYOUT = mamba1_layer.SCAN_LAYOUT, layout or mamba1_layer.SCAN_LAYOUT
            try:
                runs[side] = progress(side, length, guarded(train_steps, loss_fn, model, weights, batches,
                                                            args.warmup, device))
            finally:
                mamba1_layer.SCAN_LAYOUT = saved
            model.cpu()
        for side, *_ in sides[: len(layouts)]:
            rows.append([name if len(layouts) == 1 else f"{name} ({side.split()[1]} layout)", length, runs[side],
                         runs["mamba_ssm"]])
        if len(layouts) > 1:
            rates = [runs[side].tokens_per_s for side, *_ in sides[: len(layouts)]]
            if None not in rates:
                print(f"  L={length}: " + ", ".join(f"{layouts[i]}/{layouts[0]} tokens/s {rates[i] / rates[0]:.3f}x"
                                                    for i in range(1, len(layouts))), flush=True)
    return header, rows


def print_row(name: str, length: int, ours: Run, theirs: Run) -> None:
    def rate(run: Run) -> str:
        return f"{run.tokens_per_s:,.0f}" if run.tokens_per_s is not None else "n/a"

    def gib(run: Run) -> str:
        return f"{run.peak_bytes / 2**30:.1f}" if run.peak_bytes is not None else "n/a"

    def loss(run: Run) -> str:
        return f"{run.first_loss:.4f}" if run.first_loss is not None else "n/a"

    ratio = (f"{ours.tokens_per_s / theirs.tokens_per_s:.2f}x"
             if ours.tokens_per_s is not None and theirs.tokens_per_s is not None else "n/a")
    print(f"| {name} | {length} | {rate(ours)} | {rate(theirs)} | {ratio} | {gib(ours)} / {gib(theirs)} | "
          f"{loss(ours)} / {loss(theirs)} |", flush=True)
    for side, run in (("ssmkit", ours), ("mamba_ssm", theirs)):
        if run.error is not None:
            print(f"    {side}: {run.error}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(DEFAULT_MODELS))
    parser.add_argument("--mamba1-layout", nargs="+", choices=("auto", "channel", "time"), default=["auto"],
                        help="Mamba-1 models: one ssmkit row per scan layout (ssmkit.layers.mamba.SCAN_LAYOUT)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths (default 2048 8192)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8")
    parser.add_argument("--steps", type=int, default=None, help="timed steps, median taken (default 8)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (autotuning, compilation)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models, L 64, batch 2, 2 steps: a smoke run")
    parser.add_argument("--build-only", action="store_true",
                        help="build both sides of each model (any device), load ssmkit's weights into mamba_ssm's, "
                             "print the parameter counts, run nothing")
    args = parser.parse_args()
    quick = {"lengths": [64], "batch_size": 2, "steps": 2} if args.quick else {}
    defaults = {"lengths": [2048, 8192], "batch_size": 8, "steps": 8}
    for key, value in (defaults | quick).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.warmup = min(args.warmup, 1)
    if args.build_only:
        args.lengths = []
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or min(args.lengths, default=1) < 1:
        parser.error("--steps, --batch-size and --lengths must be positive, --warmup at least 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here: use --device cpu --quick for a smoke run")
    import triton

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    precision = "fp32 weights, bf16 autocast" if device.type == "cuda" else "fp32"
    setup = (f"{where}; torch {torch.__version__}, triton {triton.__version__}; {precision}; batch {args.batch_size}; "
             f"median of {args.steps} steps after {args.warmup} warm-up; AdamW (fused on CUDA) + clip 1.0")
    print(setup)
    headers, results = [], []
    for name in args.models:
        header, rows = bench_model(name, QUICK[name]() if args.quick else get_preset(name), args, device)
        headers.append(header)
        results += rows
    print("\n" + "\n".join([setup, *headers]))
    print("ratio = ssmkit tokens/s / mamba_ssm tokens/s (> 1: ssmkit faster); peak = max allocated, GiB, "
          "ssmkit / mamba_ssm; step-0 loss: same weights, same batch")
    print("| model | L | tokens/s ssmkit | tokens/s mamba_ssm | ratio | peak GiB | step-0 loss |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        print_row(*row)


if __name__ == "__main__":
    main()
