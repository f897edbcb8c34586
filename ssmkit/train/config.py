"""Settings of a training run (optimiser, schedule, precision, checkpoints, logging, parallelism)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class TrainConfig:
    """How to train. Every field can be set from the command line as ``--train.<field> VALUE``.

    Example::

        TrainConfig(steps=2000, batch_size=32, lr=1e-3, grad_accum=2)
    """

    steps: int = 1000
    """Optimiser steps to run (ignored when time_minutes is set)."""

    time_minutes: float = 0.0
    """Train for this many minutes of training time instead of a step count; the cosine schedule then
    follows elapsed time (not bit-for-bit reproducible; use steps for that)."""

    batch_size: int = 8
    """Rows per optimiser step, summed over all processes and accumulation micro-batches."""

    grad_accum: int = 1
    """Micro-batches per step on each process (gradients summed before the step)."""

    lr: float = 2e-3
    """Peak learning rate of AdamW."""

    min_lr_ratio: float = 0.1
    """The cosine decays the learning rate to lr * min_lr_ratio."""

    warmup_steps: int = 50
    """Linear warm-up from 0 to lr over this many steps."""

    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to matrices and embeddings only (never to A_log, D, dt_bias,
    norms or biases)."""

    beta1: float = 0.9
    """AdamW beta1."""

    beta2: float = 0.95
    """AdamW beta2."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""

    precision: str = "auto"
    """'auto' (bf16 autocast on a GPU that supports it, else fp16 on GPU, fp32 on CPU), 'fp32', 'bf16' or
    'fp16' (fp16 uses a gradient scaler)."""

    device: str = "auto"
    """'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'. Under torchrun each process
    uses cuda:LOCAL_RANK."""

    compile: bool = False
    """Wrap the model in torch.compile (opt-in: compiling takes a while and needs a C++ compiler on CPU)."""

    parallel: str = "ddp"
    """With several processes (torchrun): 'ddp' replicates the model, 'fsdp' shards parameters, gradients
    and optimiser state (FSDP2, one unit per layer)."""

    context_parallel: int = 1
    """Split every sequence across this many consecutive processes (context parallelism, for sequences too
    long for one device; Mamba-2 layers only). The rest of the world size is data parallel (ddp or fsdp
    over every process): torchrun --nproc_per_node 8 with 2 here trains 4 batches of 2-part sequences."""

    seed: int = 0
    """Seeds the weights, the data order and every random generator."""

    eval_every: int = 200
    """Validate every this many steps (and at the end); 0 = only at the end."""

    eval_tokens: int = 65536
    """Validation budget in tokens (whole documents, at least one; 0 = the whole validation split)."""

    eval_batch_size: int = 16
    """Rows per validation batch."""

    checkpoint_every: int = 500
    """Save a resumable checkpoint every this many steps (and at the end); 0 = only at the end."""

    checkpoint_minutes: float = 10.0
    """Also save when this many minutes passed since the last checkpoint (0 = never by time)."""

    keep_checkpoints: int = 3
    """Keep this many most recent checkpoints (at least 2, so a corrupt latest one has a fallback)."""

    log_every: int = 5
    """Write a line to metrics.jsonl every this many steps."""

    max_bad_steps: int = 20
    """A step whose loss or gradient norm is NaN/inf is skipped and counted; stop after this many."""

    sample_prompt: str = "def "
    """At the end, print a sample continuing this prompt (empty = no sample)."""

    sample_tokens: int = 300
    """Length of the final sample in tokens."""

    progress: bool = True
    """Show a progress bar (tokens/s, loss, ETA)."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        positive = ("steps", "batch_size", "grad_accum", "eval_batch_size", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        non_negative = ("time_minutes", "warmup_steps", "weight_decay", "grad_clip", "eval_every", "eval_tokens",
                        "checkpoint_every", "checkpoint_minutes", "max_bad_steps", "sample_tokens")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"train.parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.context_parallel < 1:
            raise ValueError(f"train.context_parallel must be >= 1, got {self.context_parallel}")
        if self.keep_checkpoints < 2:
            raise ValueError(f"train.keep_checkpoints must be >= 2 (a fallback for a corrupt latest checkpoint), "
                             f"got {self.keep_checkpoints}")
