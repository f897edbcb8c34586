"""Sequence classifier: the residual stack of :class:`LanguageModel` with a pooled head.

Dimensions: ``b`` batch, ``l`` length, ``H`` d_model, ``k`` classes, ``i`` d_input.

For non-causal tasks (classification of text, images read as pixel sequences, genomic windows) the
mixers may be bidirectional (``s4.bidirectional`` / ``s4d.bidirectional``); any layer pattern works.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit.layers import RMSNorm
from ssmkit.layers.embedding import token_embedding
from ssmkit.models.blocks import build_blocks, init_weights
from ssmkit.models.config import ModelConfig
from ssmkit.models.size import check_model_size

POOLINGS = ("mean", "last")


@dataclasses.dataclass
class ClassifierOutput:
    """logits (b, k); loss: mean cross-entropy or None; pooled: the (b, H) features fed to the head."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    pooled: torch.Tensor


class SequenceClassifier(nn.Module):
    """Embedding (or a linear encoder of real-valued inputs) → blocks → RMSNorm → pooling → Linear.

    Args:
        config: the stack (``vocab_size`` is unused when ``d_input`` is given); bidirectional S4/S4D
            layers are allowed here.
        num_classes: k. pooling: ``"mean"`` over the valid positions, or ``"last"`` (the last valid
            position: what a causal stack has read everything by).
        d_input: feed real-valued (b, l, i) ``inputs`` through ``Linear(i, H)`` instead of token ids.

    ``forward(input_ids=None, *, inputs=None, mask=None, labels=None)``: ``mask`` (b, l) bool marks
    the valid positions (False = padding, on either side). Padding is kept apart from the sequence
    exactly: each run of valid positions and each run of padding becomes its own segment
    (``seq_idx``), so no mixer, causal or bidirectional, lets padding reach a valid position, and a
    padded row gives the same output as the unpadded sequence alone. ``labels`` (b,) class ids.

    State dict names: ``embedding.weight`` (or ``encoder.weight``/``encoder.bias``), ``layers.{i}.*``
    as in :class:`LanguageModel`, ``norm_f.weight``, ``head.weight``, ``head.bias``.

    Example::

        cfg = ModelConfig(vocab_size=256, d_model=64, n_layer=2, layer_pattern="S",
                          s4d=S4DConfig(bidirectional=True))
        model = SequenceClassifier(cfg, num_classes=2)
        out = model(ids, mask=ids != pad_id, labels=y)
    """

    def __init__(self, config: ModelConfig, num_classes: int, *, pooling: str = "mean", d_input: int | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        config.validate()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if d_input is not None and (isinstance(d_input, bool) or not isinstance(d_input, int) or d_input < 1):
            raise ValueError(f"d_input must be a positive int or None, got {d_input!r}")
        self.config, self.num_classes, self.pooling, self.d_input = config, num_classes, pooling, d_input
        # The stack and embedding are LanguageModel's (the k-class head is small): its size check applies.
        check_model_size(config, device=device, dtype=dtype)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        d = config.d_model
        self.embedding = (token_embedding(config.padded_vocab_size, d, config.embedding_multiplier, **factory)
                          if d_input is None else None)
        self.encoder = nn.Linear(d_input, d, **factory) if d_input is not None else None
        # Blocks (feed-forwards included) built and initialised as in LanguageModel; bidirectional allowed.
        self.layers = build_blocks(config, factory, causal=False)
        self.norm_f = RMSNorm(d, eps=config.norm_eps, **factory)
        self.head = nn.Linear(d, num_classes, **factory)
        init_weights(self, self.layers, config)

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> ClassifierOutput:
        """Class logits for token ids (b, l) or, with ``d_input``, real inputs (b, l, i)."""
        x = self._embed(input_ids, inputs)
        batch, length = x.shape[:2]
        seq_idx = None
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor (True = valid position), got "
                                f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
            if tuple(mask.shape) != (batch, length):
                raise ValueError(f"mask must have shape (batch, length) = {(batch, length)}, got {tuple(mask.shape)}")
            if not bool(mask.any(dim=1).all()):
                raise ValueError("mask has a row with no valid position: nothing to pool")
            seq_idx = torch.zeros(batch, length, dtype=torch.int32, device=x.device)
            seq_idx[:, 1:] = (mask[:, 1:] != mask[:, :-1]).cumsum(dim=1)
        residual = x
        for block in self.layers:
            residual = block(residual, seq_idx=seq_idx)
        hidden = self.norm_f(residual)
        hidden = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
        valid = torch.ones(batch, length, dtype=torch.bool, device=x.device) if mask is None else mask
        if self.pooling == "mean":
            weights = valid.to(hidden.dtype)
            pooled = (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
        else:
            last = length - 1 - valid.flip(1).int().argmax(dim=1)
            pooled = hidden[torch.arange(batch, device=x.device), last]
        logits = self.head(pooled.to(self.head.weight.dtype))
        loss = None
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != (batch,) or labels.is_floating_point():
                raise ValueError(f"labels must be an integer tensor of shape ({batch},)")
            if bool(((labels < 0) | (labels >= self.num_classes)).any()):
                raise ValueError(f"labels must be class ids in [0, {self.num_classes})")
            loss = F.cross_entropy(logits.float(), labels)
        return ClassifierOutput(logits=logits, loss=loss, pooled=pooled)

    def _embed(self, input_ids: torch.Tensor | None, inputs: torch.Tensor | None) -> torch.Tensor:
        if self.encoder is None:
            if inputs is not None or input_ids is None:
                raise ValueError("this classifier reads token ids: pass input_ids (b, l), not inputs")
            if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.dim() != 2:
                raise ValueError(f"input_ids must be an integer tensor (b, l), got "
                                 f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids}")
            if input_ids.numel() == 0:
                raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
            lo, hi = (int(v) for v in torch.aminmax(input_ids))
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids has ids outside [0, {self.config.vocab_size}): min {lo}, max {hi}")
            return self.embedding(input_ids)
        if input_ids is not None or inputs is None:
            raise ValueError(f"this classifier reads real-valued inputs (b, l, {self.d_input}): pass inputs=")
        if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point() or inputs.dim() != 3 \
                or inputs.shape[-1] != self.d_input or 0 in inputs.shape:
            raise ValueError(f"inputs must be a non-empty float tensor (b, l, {self.d_input}), got "
                             f"{tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__}")
        return self.encoder(inputs.to(self.encoder.weight.dtype))
