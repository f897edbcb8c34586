"""The training loop, meant to be read top to bottom.

``Trainer.fit`` builds the data, the model and AdamW, restores a checkpoint when resuming, then repeats:
set the learning rate (warm-up, then cosine), run the step's micro-batches forward and backward (gradients
averaged over processes on the last one), check the loss and gradient norm for NaN/inf (skip the step if
so), clip, step; log, validate and checkpoint on schedule. At the end it saves the model, draws the loss
curve and prints a sample.

The model computes its own loss (:meth:`LanguageModel.forward` with ``targets``): the summed cross-entropy,
the number of targets and, for MoE models, the router losses times their coefficients. The objective of a
step is the mean cross-entropy over every scored token of the global batch plus the target-weighted mean
of those router losses: each micro-batch contributes :meth:`LanguageModelOutput.loss_share` of the global
target count, so the result is the same however the batch is split across processes and accumulation
steps. ``metrics.jsonl`` logs the cross-entropy as ``loss`` and, for MoE models, the unweighted
``aux_loss`` (load balancing), ``z_loss`` and ``expert_entropy`` (the entropy, in nats, of the share of
routed slots per expert, averaged over the MoE layers; log(num_experts) is a perfectly even load).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssmkit.data import (
    BatchLoader,
    DataConfig,
    EvalSet,
    describe,
    eval_batches,
    load_datasets,
)
from ssmkit.distributed import ContextParallel
from ssmkit.models import LanguageModel, ModelConfig, param_groups
from ssmkit.models.run_folder import CHECKPOINTS, MODEL_DIR, RUN_FILE
from ssmkit.train import checkpoint
from ssmkit.train.config import TrainConfig
from ssmkit.train.distributed import (
    Dist,
    all_reduce,
    gradient_sync,
    parallelize,
    setup,
    shard_batch,
    teardown,
    unwrap,
)
from ssmkit.train.errors import TrainingError
from ssmkit.train.metrics import MetricsLog, Progress, plot_losses


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Learning rate of ``step``: linear warm-up, then a cosine over ``progress`` in [0, 1] down to
    ``lr * min_lr_ratio`` (progress is step/steps, or elapsed/budget in a timed run)."""
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    cosine = 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return cfg.lr * warmup * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on a GPU that supports it, fp16 on other GPUs, fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: EvalSet, batch_size: int, device: torch.device, tokenizer_kind: str, *,
             autocast: Any = None, rank: int = 0, world_size: int = 1, info: Dist | None = None) -> dict[str, float]:
    """Loss per scored token and bits per byte of an :class:`~ssmkit.data.EvalSet`; perplexity too for
    token models. Processes split the rows and add up their sums; with ``info`` (training's processes)
    they split the rows as its data-parallel ranks and the length as its context-parallel ones."""
    if info is not None:
        rank, world_size = info.dp_rank, info.dp_size
    was_training = model.training
    model.eval()
    nats, targets = 0.0, 0
    for batch, counted in eval_batches(data.rows, data.index, batch_size, rank=rank, world_size=world_size):
        batch = (batch if info is None else shard_batch(batch, info)).to(device)
        with autocast or nullcontext():
            out = model(batch.input_ids, targets=batch.targets, seq_idx=batch.seq_idx)
        if counted:
            nats += out.loss_sum.item()
            targets += batch.n_targets
    model.train(was_training)
    nats, targets = all_reduce([nats, float(targets)])
    result = {"val_loss": nats / targets, "val_bpb": nats / math.log(2) / (targets * data.bytes_per_target)}
    if tokenizer_kind != "bytes":
        result["val_ppl"] = math.exp(min(nats / targets, 700.0))
    return result


class Trainer:
    """Train a :class:`~ssmkit.models.LanguageModel` on a :class:`~ssmkit.data.DataConfig`'s text.

    Example::

        from ssmkit.models import get_preset
        Trainer(get_preset("byte-small"), TrainConfig(steps=500), DataConfig(), "runs/demo").fit()
    """

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, data_config: DataConfig,
                 out_dir: str | os.PathLike, *, resume: bool = False) -> None:
        train_config.validate()
        data_config.validate()
        self.model_config = model_config
        self.cfg = train_config
        self.data_config = data_config
        self.out = Path(out_dir)
        self.resume = resume
        self._stop_requested = False

    def fit(self) -> dict[str, Any]:
        """Run training to the end (steps or time budget); returns the final step and validation figures."""
        finished = False
        try:
            # No reference to the process groups outlives _fit: teardown frees them (see there).
            result = self._fit(setup(self.cfg.device, self.cfg.context_parallel))
            finished = True
            return result
        finally:
            teardown(wait_for_all=finished)

    def _fit(self, info: Dist) -> dict[str, Any]:
        cfg, out = self.cfg, self.out
        ckpt_root = out / CHECKPOINTS
        if not self.resume and checkpoint.list_checkpoints(ckpt_root):
            raise FileExistsError(f"{out} already holds a run's checkpoints: pass --resume to continue it, "
                                  "or choose another --out")
        say = print if info.is_main else (lambda *a, **k: None)

        seed_everything(cfg.seed)
        data = load_datasets(self.data_config, batch_size=cfg.batch_size, eval_tokens=cfg.eval_tokens)
        tokenizer = data.tokenizer
        if self.model_config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"model.vocab_size is {self.model_config.vocab_size} but the tokenizer needs "
                             f"{tokenizer.vocab_size} (its vocabulary plus pad/bos/eos)")
        split = None if info.cp_group is None else ContextParallel(info.cp_group)
        model = LanguageModel(self.model_config, device=info.device, context_parallel=split)
        n_params = sum(p.numel() for p in model.parameters())
        if cfg.compile:
            model.compile()
        model = parallelize(model, info, cfg.parallel)
        optimizer = torch.optim.AdamW(param_groups(unwrap(model), cfg.weight_decay), lr=cfg.lr,
                                      betas=(cfg.beta1, cfg.beta2), eps=1e-8)
        loader = BatchLoader(data.train, cfg.batch_size, cfg.seed, rank=info.dp_rank, world_size=info.dp_size,
                             micro_batches=cfg.grad_accum)
        precision = resolve_precision(cfg.precision, info.device)
        autocast = (nullcontext() if precision == "fp32" else
                    torch.autocast(info.device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16))
        scaler = torch.amp.GradScaler(info.device.type, enabled=precision == "fp16")

        counters = {"step": 0, "elapsed": 0.0, "tokens": 0, "bad_steps": 0}
        if self.resume:
            found = checkpoint.find_resumable(ckpt_root)
            if found is None:
                raise FileNotFoundError(f"--resume: no usable checkpoint under {ckpt_root}")
            folder, saved = found
            checkpoint.load(folder, saved, model, optimizer)
            loader.load_state_dict(saved["data"])
            counters = saved["counters"]
            say(f"resuming from {folder} (step {counters['step']})")
        elif info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            run = {"model": self.model_config.to_dict(), "train": asdict(cfg), "data": asdict(self.data_config)}
            (out / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")
        if info.is_main:
            checkpoint.remove_leftovers(ckpt_root)
        log = MetricsLog(out / "metrics.jsonl", resume_step=counters["step"] if self.resume else None,
                         enabled=info.is_main)

        say(describe(data.summary, self.data_config))
        say(f"model: {n_params:,} parameters ({self._shape()}); {info.world_size} process(es) on {info.device}, "
            f"{precision}{f', {info.cp_size}-way context parallel' if info.cp_size > 1 else ''}; "
            f"{cfg.batch_size} x {self.data_config.seq_len} tokens per step")
        progress = Progress(total_steps=cfg.steps, time_budget_s=cfg.time_minutes * 60, start_step=counters["step"],
                            start_elapsed=counters["elapsed"], enabled=cfg.progress and info.is_main)
        previous_handler = signal.signal(signal.SIGINT, self._request_stop)
        try:
            step, val = self._loop(model, optimizer, scaler, autocast, precision, loader, data, tokenizer, counters,
                                   log, progress, info)
        finally:
            progress.close()
            log.close()
            signal.signal(signal.SIGINT, previous_handler)
        result = {"step": step, "bad_steps": counters["bad_steps"], "tokens": counters["tokens"],
                  "elapsed_s": counters["elapsed"], "interrupted": self._stop_requested, **val}
        if info.is_main and not self._stop_requested:
            result.update(self._finish(ckpt_root, tokenizer, val, step, info.device))
        return result

    def _loop(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
              autocast: Any, precision: str, loader: BatchLoader, data: Any, tokenizer: Any,
              counters: dict[str, Any], log: MetricsLog, progress: Progress, info: Dist) -> tuple[int, dict]:
        """Steps until the step count or time budget is reached (or Ctrl-C); returns the last step and the
        last validation figures. Saves the final checkpoint and runs the final validation."""
        cfg = self.cfg
        ckpt_root = self.out / CHECKPOINTS
        say = print if info.is_main else (lambda *a, **k: None)
        budget = cfg.time_minutes * 60
        step, elapsed = counters["step"], counters["elapsed"]
        last_ckpt_step, last_ckpt_time, last_eval_step = (step if self.resume else -1), elapsed, -1
        val: dict[str, float] = {}
        window_tokens, window_start = 0, time.perf_counter()
        start = time.perf_counter() - elapsed
        model.train()
        while (elapsed < budget) if budget else (step < cfg.steps):
            lr = lr_at(cfg, step, elapsed / budget if budget else step / cfg.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            micro = [shard_batch(b, info) for b in loader.next()]
            local_targets = sum(b.n_targets for b in micro)
            (n_targets,) = all_reduce([float(local_targets)])
            router = RouterTotals()
            for i, batch in enumerate(micro):
                batch = batch.to(info.device)
                with gradient_sync(model, enabled=i == len(micro) - 1):
                    with autocast:
                        out = model(batch.input_ids, targets=batch.targets, seq_idx=batch.seq_idx)
                    # Processes average gradients, so scale by world size to get the global-target mean.
                    scaler.scale(out.loss_share(max(n_targets, 1.0)) * info.world_size).backward()
                router.add(out)
            total, tokens, *router_sums = all_reduce([router.loss_sum.item(), float(sum(b.n_tokens for b in micro)),
                                                      *router.sums()])
            # Every process must agree on when to stop and checkpoint: take the slowest clock.
            stop_flag, now = all_reduce([float(self._stop_requested), time.perf_counter() - start], op="max")
            loss = total / max(n_targets, 1.0)
            moe = router.metrics(router_sums, n_targets)

            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            # fp16 overflow is the scaler's business (it skips and lowers the scale); anything else is a bad step.
            bad = (not math.isfinite(loss) or not all(map(math.isfinite, moe.values()))
                   or (not math.isfinite(grad_norm) and precision != "fp16"))
            if bad:
                counters["bad_steps"] += 1
                progress.write(f"step {step + 1}: loss {loss} / gradient norm {grad_norm} is not finite; "
                               f"step skipped ({counters['bad_steps']} so far)")
                if counters["bad_steps"] > cfg.max_bad_steps:
                    raise TrainingError(
                        f"stopping: {counters['bad_steps']} steps had a NaN/inf loss or gradient "
                        f"(train.max_bad_steps = {cfg.max_bad_steps}). Try a lower --train.lr, "
                        f"--train.precision fp32, or resume from an earlier checkpoint in {ckpt_root}")
                if precision == "fp16":
                    scaler.update()
            else:
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)

            step += 1
            counters.update(step=step, tokens=counters["tokens"] + int(tokens), elapsed=now)
            elapsed = now
            window_tokens += tokens
            tokens_per_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
            progress.update(step, elapsed, loss, tokens_per_s)
            if step % cfg.log_every == 0 or bad:
                log.write({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": counters["tokens"],
                           "tokens_per_s": tokens_per_s, "elapsed_s": elapsed, "skipped": bad, **moe})
                window_tokens, window_start = 0, time.perf_counter()

            finished = (elapsed >= budget) if budget else (step >= cfg.steps)
            if cfg.eval_every and step % cfg.eval_every == 0 and not finished and data.val is not None:
                val = self._evaluate(model, data, autocast, info)
                last_eval_step = step
                log.write({"step": step, **val})
                progress.write(f"step {step}: validation {_fmt(val)}")
            by_time = cfg.checkpoint_minutes and elapsed - last_ckpt_time >= cfg.checkpoint_minutes * 60
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or by_time or finished or stop_flag:
                self._save(ckpt_root, step, model, optimizer, tokenizer, loader, counters, info)
                last_ckpt_step, last_ckpt_time = step, elapsed
            if stop_flag:
                progress.close()
                say(f"interrupted: checkpoint saved at step {step}; continue with --resume")
                return step, val

        if last_ckpt_step != step:
            self._save(ckpt_root, step, model, optimizer, tokenizer, loader, counters, info)
        if data.val is not None and last_eval_step != step:
            val = self._evaluate(model, data, autocast, info)
            log.write({"step": step, **val})
        return step, val

    def _shape(self) -> str:
        c = self.model_config
        return f"{c.n_layer} layers of pattern {c.layer_pattern!r}, d_model {c.d_model}"

    def _request_stop(self, signum: int, frame: Any) -> None:
        """First Ctrl-C: finish the current step, save, exit. A second one interrupts at once."""
        self._stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _evaluate(self, model: torch.nn.Module, data: Any, autocast: Any, info: Dist) -> dict[str, float]:
        return evaluate(model, data.val, self.cfg.eval_batch_size, info.device, data.tokenizer.kind,
                        autocast=autocast, info=info)

    def _save(self, root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              tokenizer: Any, loader: BatchLoader, counters: dict[str, Any], info: Dist) -> None:
        state = {"counters": dict(counters), "data": loader.state_dict(), "world_size": info.world_size,
                 "schedule": {"lr": self.cfg.lr, "warmup_steps": self.cfg.warmup_steps, "steps": self.cfg.steps,
                              "time_minutes": self.cfg.time_minutes, "min_lr_ratio": self.cfg.min_lr_ratio}}
        checkpoint.save(root, step, model, optimizer, self.model_config, tokenizer, state, info,
                        self.cfg.keep_checkpoints)

    def _finish(self, ckpt_root: Path, tokenizer: Any, val: dict[str, float], step: int,
                device: torch.device) -> dict[str, Any]:
        """Copy the last checkpoint's model to ``<out>/model``, draw the loss curve, print a sample."""
        model_dir = self.out / MODEL_DIR
        tmp = self.out / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        last = checkpoint.list_checkpoints(ckpt_root)[0]
        for name in os.listdir(last):
            if name in ("config.json", "model.safetensors", "ssmkit_tokenizer.json", "tokenizer.json"):
                shutil.copyfile(last / name, tmp / name)
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(tmp, model_dir)
        plotted = plot_losses(self.out / "metrics.jsonl", self.out / "loss.png",
                              f"{self._shape()}: step {step}")
        print(f"saved {model_dir}" + (f"; loss curve {self.out / 'loss.png'}" if plotted else
                                       " (no loss plot: pip install matplotlib)"))
        if val:
            print(f"final validation: {_fmt(val)}")
        result: dict[str, Any] = {"model_dir": str(model_dir)}
        if self.cfg.sample_prompt and self.cfg.sample_tokens:
            model = LanguageModel.from_pretrained(model_dir, device=device)
            prompt = [tokenizer.bos_id, *tokenizer.encode(self.cfg.sample_prompt)]
            new = model.generate([prompt], self.cfg.sample_tokens, temperature=0.8, top_p=0.95,
                                 eos_token_id=tokenizer.eos_id, seed=self.cfg.seed)[0]
            result["sample"] = self.cfg.sample_prompt + tokenizer.decode(new)
            print(f"sample (temperature 0.8, top-p 0.95):\n{result['sample']}")
        return result


class RouterTotals:
    """A step's sums over its micro-batches: cross-entropy, and for MoE models the router losses weighted
    by each micro-batch's targets and the slots routed to each expert of each MoE layer."""

    def __init__(self) -> None:
        self.loss_sum: torch.Tensor | float = 0.0
        self.n_targets = 0.0
        self.aux = self.z = 0.0
        self.counts: list[torch.Tensor] = []

    def add(self, out: Any) -> None:
        self.loss_sum = self.loss_sum + out.loss_sum.detach().float()
        if out.aux_loss is None:
            return
        n = out.n_targets.detach().float()
        self.aux = self.aux + n * out.aux_loss.detach().float()
        self.z = self.z + n * out.z_loss.detach().float()
        counts = [s.expert_counts.detach().float() for s in out.router_stats]
        self.counts = counts if not self.counts else [a + b for a, b in zip(self.counts, counts)]

    def sums(self) -> list[float]:
        """What processes add up: the weighted aux and z sums, then every layer's expert counts."""
        if not self.counts:
            return []
        return [float(self.aux), float(self.z), *torch.cat(self.counts).tolist()]

    def metrics(self, sums: list[float], n_targets: float) -> dict[str, float]:
        """``aux_loss``, ``z_loss`` (target-weighted means) and ``expert_entropy`` of MoE models, else {}."""
        if not sums:
            return {}
        aux, z, counts = sums[0], sums[1], torch.tensor(sums[2:], dtype=torch.float64)
        shares = counts.view(len(self.counts), -1)
        shares = shares / shares.sum(-1, keepdim=True).clamp_min(1)
        entropy = -(shares * shares.clamp_min(1e-30).log()).sum(-1).mean()
        return {"aux_loss": aux / max(n_targets, 1.0), "z_loss": z / max(n_targets, 1.0),
                "expert_entropy": float(entropy)}


def _fmt(val: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in val.items())
