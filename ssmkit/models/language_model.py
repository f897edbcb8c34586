"""Causal language model: embedding → residual blocks → final RMSNorm → head (tied by default).

Dimensions: ``b`` batch, ``l`` length, ``H`` d_model, ``V`` padded vocabulary size.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit.layers import Attention, MoE, RMSNorm
from ssmkit.layers.moe import RouterStats, load_balancing_loss, router_z_loss
from ssmkit.models.blocks import build_blocks, init_weights
from ssmkit.files import shown
from ssmkit.hub import resolve_checkpoint
from ssmkit.models.config import ModelConfig
from ssmkit.models.size import check_model_size

if TYPE_CHECKING:
    from ssmkit.generation.cache import ModelCache

IGNORE_INDEX = -100


@dataclasses.dataclass
class LanguageModelOutput:
    """logits: (b, l, V) (or the last ``logits_to_keep`` positions); loss: scalar training loss or None
    (mean cross-entropy, plus the MoE auxiliary losses times their coefficients).

    For models with MoE layers: ``aux_loss`` is the unweighted Switch load-balancing loss pooled over the
    MoE layers (transformers' ``aux_loss``), ``z_loss`` the pooled router z-loss, and ``router_stats`` one
    :class:`ssmkit.layers.moe.RouterStats` per MoE layer (expert usage for the trainer's metrics); all
    None without MoE layers.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_stats: list[RouterStats] | None = None


class LanguageModel(nn.Module):
    """A stack of residual blocks chosen by ``config.layer_pattern``, with a language-model head.

    State dict names: ``embedding.weight``, ``layers.{i}.norm.weight``, ``layers.{i}.mixer.*``,
    ``layers.{i}.ff_norm.weight`` and ``layers.{i}.ff.*`` for layers with a feed-forward, ``norm_f.weight``
    and, only when embeddings are untied, ``lm_head.weight`` (a tied head reuses ``embedding.weight`` and
    has no entry of its own).

    Example::

        from ssmkit.models import LanguageModel, get_preset
        model = LanguageModel(get_preset("debug-mamba2"))
        out = model(torch.randint(0, 64, (2, 16)), labels=...)
        tokens = model.generate([[1, 2, 3]], max_new_tokens=10, temperature=0)
    """

    def __init__(self, config: ModelConfig, *, device: torch.device | None = None,
                 dtype: torch.dtype | None = None, max_bytes: int | None = None) -> None:
        super().__init__()
        config.validate()
        # Before the first tensor: a config too big for the device's memory (or max_bytes, or
        # SSMKIT_MAX_MODEL_BYTES) is a clear error, not an allocator crash or the OOM killer.
        check_model_size(config, device=device, dtype=dtype, max_bytes=max_bytes)
        self.config = config
        factory = {"device": device, "dtype": dtype}
        vocab, d = config.padded_vocab_size, config.d_model
        self.embedding = nn.Embedding(vocab, d, **factory)
        self.layers = build_blocks(config, factory)
        self.norm_f = RMSNorm(d, eps=config.norm_eps, **factory)
        self.lm_head = None if config.tie_embeddings else nn.Linear(d, vocab, bias=False, **factory)
        init_weights(self, self.layers, config)

    @property
    def head_weight(self) -> torch.Tensor:
        """(V, H) output projection: the embedding when tied."""
        return self.embedding.weight if self.lm_head is None else self.lm_head.weight

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) final-norm output -> (..., V) logits (an int8 head when :meth:`quantize` made one)."""
        if self.lm_head is not None and not isinstance(self.lm_head, nn.Linear):
            return self.lm_head(hidden)
        return F.linear(hidden.to(self.head_weight.dtype), self.head_weight)

    def forward(self, input_ids: torch.Tensor, *, labels: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None, cache: ModelCache | None = None,
                logits_to_keep: int = 0) -> LanguageModelOutput:
        """Logits for ``input_ids`` (b, l) and, with ``labels`` (b, l), the mean next-token cross-entropy.

        Labels follow transformers' convention: ``labels`` is aligned with ``input_ids`` (usually
        ``labels = input_ids``) and shifted here, so position t's logits are scored against
        ``labels[:, t + 1]``; ``-100`` marks positions without a target. With ``seq_idx`` (b, l) integer
        document ids (packed documents; the state restarts where the id changes) the first token of each
        document is not predicted from the previous document. The loss is NaN when no position has a
        target (e.g. l == 1).

        With ``cache`` (from :meth:`allocate_cache`) the tokens continue from the cached state, which is
        updated in place; the cache's state counts as the state of the document ``seq_idx[:, 0]``.
        ``logits_to_keep > 0`` computes logits only for the last that many positions (generation).

        MoE layers: with ``labels`` the loss adds ``moe.router_aux_loss_coef`` × the load-balancing loss
        and ``moe.router_z_loss_coef`` × the router z-loss, each pooled over every MoE layer and token
        (:func:`ssmkit.layers.moe.load_balancing_loss`); the output carries them and the router stats.
        """
        self._check_inputs(input_ids, labels, seq_idx, cache, logits_to_keep)
        residual = self.embedding(input_ids)
        for i, block in enumerate(self.layers):
            residual = block(residual, seq_idx=seq_idx, cache=None if cache is None else cache.states[i])
        if cache is not None:
            cache.seqlen_offset += input_ids.shape[1]
        if logits_to_keep:
            residual = residual[:, -logits_to_keep:]
        logits = self.head_logits(self.norm_f(residual))
        loss = None
        if labels is not None:
            targets = labels[:, 1:]
            if seq_idx is not None:
                targets = targets.masked_fill(seq_idx[:, 1:] != seq_idx[:, :-1], IGNORE_INDEX)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        stats = [block.ff.last_stats for block in self.layers if isinstance(block.ff, MoE)]
        if not stats:
            return LanguageModelOutput(logits=logits, loss=loss)
        aux, z = load_balancing_loss(stats), router_z_loss(stats)
        if loss is not None:
            moe = self.config.moe
            loss = loss + moe.router_aux_loss_coef * aux.to(loss.dtype) + moe.router_z_loss_coef * z.to(loss.dtype)
        return LanguageModelOutput(logits=logits, loss=loss, aux_loss=aux, z_loss=z, router_stats=stats)

    def _check_inputs(self, input_ids: torch.Tensor, labels: torch.Tensor | None, seq_idx: torch.Tensor | None,
                      cache: ModelCache | None, logits_to_keep: int) -> None:
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
        if labels is not None:
            _check_int_tensor("labels", labels)
            if tuple(labels.shape) != shape:
                raise ValueError(f"labels must have the shape of input_ids {shape}, got {tuple(labels.shape)}")
            bad = ((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= vocab)
            if values and bool(bad.any()):
                raise ValueError(
                    f"labels must be token ids in [0, {vocab}) or {IGNORE_INDEX}, got {labels[bad][0].item()}"
                )
            if logits_to_keep:
                raise ValueError("labels need the logits of every position: do not pass logits_to_keep with labels")
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
        if cache is not None:
            if len(cache.states) != len(self.layers):
                raise ValueError(f"cache has {len(cache.states)} layer states, the model has {len(self.layers)} layers")
            if cache.batch_size != shape[0]:
                raise ValueError(f"cache was allocated for batch size {cache.batch_size}, input_ids has {shape[0]}")

    def allocate_cache(self, batch_size: int, dtype: torch.dtype | None = None,
                       device: torch.device | None = None, *, max_length: int | None = None) -> ModelCache:
        """A zero :class:`ssmkit.generation.ModelCache` for ``batch_size`` rows.

        Convolution states and KV caches take ``dtype`` (default: the weights' dtype), SSM states are
        float32 (float64 for a float64 model). SSM and sliding-window states do not grow with the number
        of tokens read; full-attention KV caches do (in blocks of 256 tokens), unless ``max_length``
        preallocates room for that many tokens.
        """
        from ssmkit.generation.cache import ModelCache

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        return ModelCache([
            block.mixer.allocate_state(batch_size, dtype=dtype, device=device, max_length=max_length)
            if isinstance(block.mixer, Attention) else block.allocate_state(batch_size, dtype=dtype, device=device)
            for block in self.layers
        ])

    def cache_nbytes(self, context_length: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int:
        """Bytes of a cache holding ``context_length`` tokens per row (measured on the "meta" device, so
        nothing is allocated): constant for SSM and sliding-window layers, linear in the context for
        full attention (rounded up to whole blocks of 256 tokens)."""
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
            raise ValueError(f"context_length must be a positive int, got {context_length!r}")
        return self.allocate_cache(batch_size, dtype=dtype, device=torch.device("meta"),
                                   max_length=context_length).nbytes

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
        (a folder Hugging Face transformers loads; see :mod:`ssmkit.interop`). Files are written atomically."""
        if format == "ssmkit":
            from ssmkit.models.checkpoint import save_checkpoint

            save_checkpoint(self, Path(path))
        elif format == "transformers":
            from ssmkit.interop import save_transformers_checkpoint

            save_transformers_checkpoint(self, path)
        else:
            raise ValueError(f"format must be 'ssmkit' or 'transformers', got {format!r}")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, revision: str | None = None,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                        max_bytes: int | None = None) -> LanguageModel:
        """Load an ssmkit checkpoint folder, a transformers folder (model_type mamba, mamba2,
        falcon_mamba, jamba), named by its path or by a Hugging Face Hub id such as
        ``"state-spaces/mamba-130m-hf"`` (at ``revision``; see :func:`ssmkit.hub.resolve_checkpoint`), or a
        llama.cpp GGUF file of architecture mamba / mamba2 (see :mod:`ssmkit.interop.gguf`).

        Weights are converted to ``dtype`` (default float32) on ``device``. Missing, truncated or corrupt
        files, tensors that do not match the config, and configs of other model types raise errors naming
        the file. The config's size is checked before any weight is read (see
        :func:`ssmkit.models.size.check_model_size`; ``max_bytes`` overrides the limit).
        """
        from ssmkit.models.checkpoint import (
            CONFIG_NAME,
            checkpoint_kind,
            load_checkpoint,
            load_state_dict_checked,
            read_config,
        )

        if os.fspath(path).endswith(".gguf") and Path(path).is_file():  # llama.cpp's format: interop.gguf
            from ssmkit.interop.gguf import load_gguf_model

            return load_gguf_model(path, device=device, dtype=dtype, max_bytes=max_bytes)
        path = resolve_checkpoint(path, revision)
        transformers = checkpoint_kind(path) == "transformers"
        if transformers:
            from ssmkit.interop import load_transformers_checkpoint, read_transformers_config

            config = read_transformers_config(path)
        else:
            config = read_config(path)
        check_model_size(config, device=device, dtype=dtype, max_bytes=max_bytes, source=shown(path / CONFIG_NAME))
        if transformers:
            config, state_dict = load_transformers_checkpoint(path)
            source = path
        else:
            config, state_dict, source = load_checkpoint(path)
        model = cls(config, device=device, dtype=dtype, max_bytes=max_bytes)
        if not transformers:  # an int8 checkpoint: the same int8 layers before its tensors load
            from ssmkit.models.checkpoint import apply_saved_quantization

            apply_saved_quantization(model, path)
        load_state_dict_checked(model, state_dict, source)
        return model


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
