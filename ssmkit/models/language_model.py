"""Causal language model: embedding → residual blocks → final RMSNorm → head (tied by default).

Dimensions: ``b`` batch, ``l`` length, ``H`` d_model, ``V`` padded vocabulary size.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit.data.packing import IGNORE
from ssmkit.layers import MoE, RMSNorm
from ssmkit.layers.embedding import token_embedding
from ssmkit.layers.moe import RouterStats, load_balancing_loss, router_z_loss
from ssmkit.layers.registry import flops_per_token
from ssmkit.models.blocks import build_blocks, build_shared, init_weights
from ssmkit.io.files import shown
from ssmkit.io.hub import resolve_checkpoint
from ssmkit.models.cache import ModelCache
from ssmkit.models.config import ModelConfig
from ssmkit.models.formats.native import (
    CONFIG_NAME,
    checkpoint_kind,
    load_checkpoint,
    load_state_dict_checked,
    read_config,
    save_checkpoint,
)
from ssmkit.models.formats.transformers import (
    load_transformers_checkpoint,
    read_transformers_config,
    save_transformers_checkpoint,
)
from ssmkit.models.size import check_model_size


@dataclasses.dataclass
class LanguageModelOutput:
    """What :meth:`LanguageModel.forward` returns. Only ``logits`` is set without targets.

    logits: (b, l, V), or the last ``logits_to_keep`` positions.
    loss: the training objective of this call: ``loss_sum / n_targets`` (mean cross-entropy, NaN when no
        position has a target) plus ``auxiliary``.
    loss_sum: () float32 summed cross-entropy over the scored positions; n_targets: () int64 their number.
        Sums, so that a mean over several calls (micro-batches, processes) is exact: see :meth:`loss_share`.
    aux_loss, z_loss: models with MoE layers only: the unweighted Switch load-balancing loss pooled over the
        MoE layers (transformers' ``aux_loss``) and the pooled router z-loss, computed with or without targets;
        auxiliary: ``router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss``, what they add to
        ``loss``; router_stats: one :class:`ssmkit.layers.moe.RouterStats` per MoE layer (expert usage).
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    n_targets: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    auxiliary: torch.Tensor | None = None
    router_stats: list[RouterStats] | None = None

    def loss_share(self, total_targets: float | torch.Tensor) -> torch.Tensor:
        """This call's part of a loss over ``total_targets`` scored positions of several calls:
        ``(loss_sum + n_targets * auxiliary) / total_targets``.

        Summed over the calls that make a batch (micro-batches, processes), it is the mean cross-entropy
        over all their targets plus the target-weighted mean of their auxiliary losses, whatever the split.
        """
        if self.loss_sum is None:
            raise ValueError("loss_share needs the loss: call the model with targets (or labels)")
        share = self.loss_sum
        if self.auxiliary is not None:
            share = share + self.n_targets * self.auxiliary.to(share.dtype)
        return share / total_targets


class LanguageModel(nn.Module):
    """A stack of residual blocks chosen by ``config.layer_pattern``, with a language-model head.

    ``context_parallel`` (:class:`ssmkit.distributed.ContextParallel`) splits every sequence across the
    ranks of a process group (Mamba-2 mixers only): each rank then passes its part of the sequence.

    State dict names: ``embedding.weight``, ``shared.<kind>.*`` for layer kinds that share modules across
    layers (Zamba2's transformer blocks, once), ``layers.{i}.norm.weight``, ``layers.{i}.mixer.*``,
    ``layers.{i}.ff_norm.weight`` and ``layers.{i}.ff.*`` for layers with a feed-forward, ``norm_f.weight``
    and, only when embeddings are untied, ``lm_head.weight`` (a tied head reuses ``embedding.weight`` and
    has no entry of its own).

    Example::

        from ssmkit.models import LanguageModel, get_preset
        model = LanguageModel(get_preset("debug-mamba2"))
        ids = torch.randint(0, 64, (2, 17))
        out = model(ids[:, :-1], targets=ids[:, 1:])       # out.loss: mean next-token cross-entropy
        out.loss.backward()
        tokens = model.generate([[1, 2, 3]], max_new_tokens=10, temperature=0)
    """

    def __init__(self, config: ModelConfig, *, device: torch.device | None = None, dtype: torch.dtype | None = None,
                 max_bytes: int | None = None, context_parallel: Any = None) -> None:
        super().__init__()
        config.validate()
        # Before the first tensor: a config too big for the device's memory (or max_bytes, or
        # SSMKIT_MAX_MODEL_BYTES) is a clear error, not an allocator crash or the OOM killer.
        check_model_size(config, device=device, dtype=dtype, max_bytes=max_bytes)
        self.config = config
        factory = {"device": device, "dtype": dtype}
        vocab, d = config.padded_vocab_size, config.d_model
        self.embedding = token_embedding(vocab, d, config.embedding_multiplier, **factory)
        # Modules that several layers share (Zamba2's transformer blocks): held once, here.
        self.shared = build_shared(config, factory)
        self.layers = build_blocks(config, factory, context_parallel=context_parallel, shared=self.shared)
        self.norm_f = RMSNorm(d, eps=config.norm_eps, **factory)
        self.lm_head = None if config.tie_embeddings else nn.Linear(d, vocab, bias=False, **factory)
        init_weights(self, self.layers, config)

    @property
    def head_weight(self) -> torch.Tensor:
        """(V, H) output projection: the embedding when tied."""
        return self.embedding.weight if self.lm_head is None else self.lm_head.weight

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) final-norm output -> (..., V) logits (an int8 head when :meth:`quantize` made one), times
        ``config.logits_multiplier``."""
        if self.lm_head is not None and not isinstance(self.lm_head, nn.Linear):
            logits = self.lm_head(hidden)
        else:
            logits = F.linear(hidden.to(self.head_weight.dtype), self.head_weight)
        multiplier = self.config.logits_multiplier
        return logits if multiplier == 1.0 else logits * multiplier

    def rms_head(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(final norm weight (H,), head weight (V, H), eps) when the logits are exactly
        ``F.linear(rms_norm(h), head_weight)`` in a half or float32 dtype (an ``nn.Linear`` head without bias or
        the tied embedding, no logits multiplier), so a fused norm + head kernel may stand in for
        :meth:`head_logits`; else None (an int8 head, a subclass's own head, float64)."""
        head, weight = self.lm_head, self.head_weight
        plain = (type(self).head_logits is LanguageModel.head_logits and isinstance(self.norm_f, RMSNorm)
                 and (head is None or (type(head) is nn.Linear and head.bias is None))
                 and self.config.logits_multiplier == 1.0 and weight.dtype != torch.float64)
        return (self.norm_f.weight, weight, self.norm_f.eps) if plain else None

    def forward(self, input_ids: torch.Tensor, *, targets: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
                cache: ModelCache | None = None, logits_to_keep: int = 0) -> LanguageModelOutput:
        """Logits for ``input_ids`` (b, l) and, with ``targets`` (b, l), the loss.

        ``targets`` are aligned with the predictions (already shifted, as nanoGPT's and
        :class:`ssmkit.data.Batch`'s): ``targets[:, t]`` is the token that position t's logits should
        predict, usually ``input_ids[:, t + 1]``; ``-100`` (:data:`ssmkit.data.IGNORE`) marks positions
        without a target (document boundaries, padding). ``labels`` is the other convention, transformers':
        aligned with ``input_ids`` (usually ``labels = input_ids``) and shifted here, so position t is
        scored against ``labels[:, t + 1]``, the last position against nothing, and, with ``seq_idx``, not
        across a change of document. Pass one of the two.

        With ``seq_idx`` (b, l) integer document ids (packed documents) the state restarts where the id
        changes. With ``cache`` (from :meth:`allocate_cache`) the tokens continue from the cached state,
        which is updated in place; the cache's state counts as the state of the document ``seq_idx[:, 0]``.
        ``logits_to_keep > 0`` computes logits only for the last that many positions (generation).

        The output holds the summed cross-entropy and the number of targets beside the mean, and for MoE
        models the load-balancing and z losses with their weighted sum ``auxiliary``
        (``moe.router_aux_loss_coef`` × load balancing + ``moe.router_z_loss_coef`` × z-loss, each pooled
        over every MoE layer and token, :func:`ssmkit.layers.moe.load_balancing_loss`), which ``loss``
        includes. See :class:`LanguageModelOutput`.
        """
        self._check_inputs(input_ids, targets, labels, seq_idx, cache, logits_to_keep)
        if labels is not None:
            targets = shift_labels(labels, seq_idx)
        residual = inputs = self.embedding(input_ids)
        for i, block in enumerate(self.layers):
            residual = block(residual, seq_idx=seq_idx, cache=None if cache is None else cache.states[i],
                             inputs=inputs)
        if cache is not None:
            cache.seqlen_offset += input_ids.shape[1]
        if logits_to_keep:
            residual = residual[:, -logits_to_keep:]
        out = LanguageModelOutput(logits=self.head_logits(self.norm_f(residual)))
        stats = [block.ff.last_stats for block in self.layers if isinstance(block.ff, MoE)]
        if stats:
            moe = self.config.moe
            out.router_stats, out.aux_loss, out.z_loss = stats, load_balancing_loss(stats), router_z_loss(stats)
            out.auxiliary = moe.router_aux_loss_coef * out.aux_loss + moe.router_z_loss_coef * out.z_loss
        if targets is not None:
            out.loss_sum = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                           reduction="sum")
            out.n_targets = (targets != IGNORE).sum()
            out.loss = out.loss_sum / out.n_targets
            if out.auxiliary is not None:
                out.loss = out.loss + out.auxiliary.to(out.loss.dtype)
        return out

    def _check_inputs(self, input_ids: torch.Tensor, targets: torch.Tensor | None, labels: torch.Tensor | None,
                      seq_idx: torch.Tensor | None, cache: ModelCache | None, logits_to_keep: int) -> None:
        vocab = self.config.vocab_size
        _check_int_tensor("input_ids", input_ids)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)} (need batch >= 1 and length >= 1)")
        values = _can_read_values(input_ids)
        if values:
            lo, hi = (int(v) for v in torch.aminmax(input_ids))
            if lo < 0 or hi >= vocab:
                raise ValueError(f"input_ids has token ids outside [0, {vocab}) (vocab_size): min {lo}, max {hi}")
        shape = tuple(input_ids.shape)
        if seq_idx is not None:
            _check_int_tensor("seq_idx", seq_idx)
            if tuple(seq_idx.shape) != shape:
                raise ValueError(f"seq_idx must have the shape of input_ids {shape}, got {tuple(seq_idx.shape)}")
        if targets is not None and labels is not None:
            raise ValueError("pass targets (aligned with the predictions) or labels (aligned with input_ids), "
                             "not both")
        for name, ids in (("targets", targets), ("labels", labels)):
            if ids is None:
                continue
            _check_int_tensor(name, ids)
            if tuple(ids.shape) != shape:
                raise ValueError(f"{name} must have the shape of input_ids {shape}, got {tuple(ids.shape)}")
            bad = ((ids < 0) & (ids != IGNORE)) | (ids >= vocab)
            if values and bool(bad.any()):
                raise ValueError(f"{name} must be token ids in [0, {vocab}) or {IGNORE}, got {ids[bad][0].item()}")
            if logits_to_keep:
                raise ValueError(f"{name} need the logits of every position: do not pass logits_to_keep with {name}")
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
        if cache is not None:
            if len(cache.states) != len(self.layers):
                raise ValueError(f"cache has {len(cache.states)} layer states, the model has {len(self.layers)} layers")
            if cache.batch_size != shape[0]:
                raise ValueError(f"cache was allocated for batch size {cache.batch_size}, input_ids has {shape[0]}")

    def allocate_cache(self, batch_size: int, dtype: torch.dtype | None = None,
                       device: torch.device | None = None, *, max_length: int | None = None) -> ModelCache:
        """A zero :class:`ssmkit.models.ModelCache` for ``batch_size`` rows.

        Convolution states and KV caches take ``dtype`` (default: the weights' dtype), SSM states are
        float32 (float64 for a float64 model). SSM and sliding-window states do not grow with the number
        of tokens read; full-attention KV caches do (in blocks of 256 tokens), unless ``max_length``
        preallocates room for that many tokens.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        return ModelCache([block.allocate_state(batch_size, dtype=dtype, device=device, max_length=max_length)
                           for block in self.layers])

    def cache_nbytes(self, context_length: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int:
        """Bytes of a cache holding ``context_length`` tokens per row (measured on the "meta" device, so
        nothing is allocated): constant for SSM and sliding-window layers, linear in the context for
        full attention (rounded up to whole blocks of 256 tokens)."""
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
            raise ValueError(f"context_length must be a positive int, got {context_length!r}")
        return self.allocate_cache(batch_size, dtype=dtype, device=torch.device("meta"),
                                   max_length=context_length).nbytes

    def flops_per_token(self, length: int = 256) -> float:
        """Forward FLOPs per token when reading sequences of ``length`` tokens: each layer's formula from the
        layer registry (MoE layers count their top-k experts) plus the head. Training costs about 3x."""
        return flops_per_token(self.layers, length) + 2.0 * self.head_weight.numel()

    def generate(self, prompts: torch.Tensor | list, max_new_tokens: int, **kwargs: Any) -> torch.Tensor | list:
        """:func:`ssmkit.generation.generate` with this model (same arguments and result)."""
        from ssmkit.generation import generate

        return generate(self, prompts, max_new_tokens, **kwargs)

    def stream(self, prompts: torch.Tensor | list, max_new_tokens: int, **kwargs: Any) -> Iterator[torch.Tensor]:
        """:func:`ssmkit.generation.stream` with this model: yields (b,) tokens as they come."""
        from ssmkit.generation import stream

        return stream(self, prompts, max_new_tokens, **kwargs)

    def quantize(self, method: str = "int8", *, head: bool = True) -> LanguageModel:
        """Weight-only int8 in place (per-output-channel symmetric scales) of the mixers' in/x/out
        projections and, with ``head``, of the output head (a tied head gets an int8 copy; the embedding
        stays float); see :mod:`ssmkit.layers.quantized`. ``save_pretrained`` keeps it; returns ``self``."""
        from ssmkit.layers.quantized import quantize_int8_

        if method != "int8":
            raise ValueError(f"method must be 'int8', got {method!r}")
        if not quantize_int8_(self, head=head):
            raise ValueError("nothing to quantise (already quantised, or no in_proj/x_proj/out_proj)")
        return self

    def save_pretrained(self, path: str | os.PathLike, format: str = "ssmkit") -> None:
        """Write a checkpoint folder: ``"ssmkit"`` (config.json + model.safetensors) or ``"transformers"``
        (a folder Hugging Face transformers loads; see :mod:`ssmkit.models.formats`). Files are written atomically."""
        if format == "ssmkit":
            save_checkpoint(self, Path(path))
        elif format == "transformers":
            save_transformers_checkpoint(self, path)
        else:
            raise ValueError(f"format must be 'ssmkit' or 'transformers', got {format!r}")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, revision: str | None = None,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                        max_bytes: int | None = None) -> LanguageModel:
        """Load an ssmkit checkpoint folder, a transformers folder (model_type mamba, mamba2,
        falcon_mamba, jamba, bamba, nemotron_h, zamba2, granitemoehybrid), named by its path or by a Hugging Face
        Hub id such as ``"state-spaces/mamba-130m-hf"`` (at ``revision``; see
        :func:`ssmkit.io.hub.resolve_checkpoint`), or a
        llama.cpp GGUF file of architecture mamba / mamba2 (see :mod:`ssmkit.models.formats.gguf`).

        Weights are converted to ``dtype`` (default float32) on ``device``. Missing, truncated or corrupt
        files, tensors that do not match the config, and configs of other model types raise errors naming
        the file. The config's size is checked before any weight is read (see
        :func:`ssmkit.models.size.check_model_size`; ``max_bytes`` overrides the limit).
        """
        if os.fspath(path).endswith(".gguf") and Path(path).is_file():  # llama.cpp's format: formats.gguf
            from ssmkit.models.formats.gguf import load_gguf_model

            return load_gguf_model(path, device=device, dtype=dtype, max_bytes=max_bytes)
        path = resolve_checkpoint(path, revision)
        transformers = checkpoint_kind(path) == "transformers"
        config = read_transformers_config(path) if transformers else read_config(path)
        check_model_size(config, device=device, dtype=dtype, max_bytes=max_bytes, source=shown(path / CONFIG_NAME))
        if transformers:
            config, state_dict = load_transformers_checkpoint(path)
            source = path
        else:
            config, state_dict, source = load_checkpoint(path)
        model = cls(config, device=device, dtype=dtype, max_bytes=max_bytes)
        if not transformers:  # an int8 checkpoint: the same int8 layers before its tensors load
            from ssmkit.models.formats.native import apply_saved_quantization

            apply_saved_quantization(model, path)
        load_state_dict_checked(model, state_dict, source)
        return model


def shift_labels(labels: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Targets (b, l) from transformers-style labels (b, l): ``labels[:, t + 1]`` at position t, ``-100``
    at the last position and, with ``seq_idx``, where position t + 1 starts another document."""
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    if seq_idx is not None:
        targets[:, :-1].masked_fill_(seq_idx[:, 1:] != seq_idx[:, :-1], IGNORE)
    return targets


def _can_read_values(t: torch.Tensor) -> bool:
    """Whether the value checks may read ``t``: not on the meta device (shape-only runs such as
    ``ssmkit info`` of a 52B preset), and not while torch.compile traces or a CUDA graph captures,
    where reading a value would break the graph."""
    if t.device.type == "meta" or torch.compiler.is_compiling():
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _check_int_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer ids, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got {t.dtype}")


def no_weight_decay_param_names(model: nn.Module) -> set[str]:
    """Names of the parameters to keep out of weight decay.

    Those marked ``_no_weight_decay`` (A_log, D, dt_bias, norms, biases), any parameter with fewer than
    2 dimensions, and, by name, ``A_log``/``D``/``dt_bias`` (the mark does not survive every module
    conversion, e.g. FSDP).
    """
    names = set()
    for name, p in model.named_parameters():
        if getattr(p, "_no_weight_decay", False) or p.dim() < 2 or name.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias"):
            names.add(name)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups, ``[{params: decayed, weight_decay}, {params: the rest, weight_decay: 0}]``.

    Example: ``torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4)``.
    """
    skip = no_weight_decay_param_names(model)
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n not in skip and p.requires_grad], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n in skip and p.requires_grad], "weight_decay": 0.0},
    ]
