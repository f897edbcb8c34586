"""The lean decode step on CPU: a language model's one-token forward through :mod:`ssmkit.layers.lean_step`.

At batch 1 on CPU a decode step is bound by reading the weights once, if nothing else gets in the way:
the blocks' own step (``forward_one_layers``) spends about a fifth of a 130M model's step in argument
checks, backend dispatch and small ops. A :class:`LeanDecoder` is built once per model (its parameters
cast, its matmuls chosen) and kept on the model while its parameters are unchanged; a step is then an
embedding row, one lean step per block and the final norm and head.

Dimensions: ``b`` batch, ``H`` d_model, ``V`` padded vocabulary.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit.layers.lean_step import (
    Linear,
    Mamba2Step,
    MambaStep,
    lean_block_step,
    linear_fn,
    state_fits,
)
from ssmkit.layers.quantized import Int8Linear

# model -> (its parameters' version key, its LeanDecoder or None where the lean step does not apply)
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LeanDecoder:
    """``(token (b,) long, cache) -> logits (b, V)`` for a CPU model made of Mamba / Mamba-2 blocks;
    updates the cache's states in place (not ``seqlen_offset``). The same function as
    :func:`ssmkit.generation.decode.forward_one_layers`, up to float rounding. Built by
    :func:`lean_decoder`, which checks that it applies; calling it checks nothing."""

    def __init__(self, model: Any, steps: list[MambaStep | Mamba2Step]) -> None:
        self.steps = steps
        self.fp32_residual = [bool(block.residual_in_fp32) for block in model.layers]
        self.embedding = model.embedding.weight.detach()
        # µP scales (Falcon-H1-style configs): 1.0 for most models, then no multiply is done.
        self.embedding_multiplier = float(getattr(model.embedding, "multiplier", 1.0))
        self.logits_multiplier = float(getattr(getattr(model, "config", None), "logits_multiplier", 1.0))
        self.norm_weight, self.eps = model.norm_f.weight.detach().to(torch.float32), model.norm_f.eps
        self.head = _head_fn(model)

    def __call__(self, token: torch.Tensor, cache: Any) -> torch.Tensor:
        with torch.no_grad():
            r = F.embedding(token, self.embedding)  # (b, H)
            if self.embedding_multiplier != 1.0:
                r = r * self.embedding_multiplier
            for step, state, fp32 in zip(self.steps, cache.states, self.fp32_residual):
                if fp32:
                    r = r.to(torch.promote_types(r.dtype, torch.float32))
                r = step(r, state)
            h = F.rms_norm(r.to(torch.float32), self.norm_weight.shape, self.norm_weight, self.eps)
            logits = self.head(h.to(r.dtype))
            return logits if self.logits_multiplier == 1.0 else logits * self.logits_multiplier

    def fits(self, cache: Any) -> bool:
        """Whether ``cache`` holds one state per block of the kinds and shapes the steps update."""
        states = getattr(cache, "states", None)
        if not isinstance(states, list) or len(states) != len(self.steps):
            return False
        batch = cache.batch_size
        return all(state_fits(step, state, batch) for step, state in zip(self.steps, states))


def _head_fn(model: Any) -> Linear:
    """``LanguageModel.head_logits`` as a lean matmul: an int8 head, an untied or the tied head."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, (nn.Linear, Int8Linear)):
        linear = linear_fn(head)
        dtype = head.compute_dtype if isinstance(head, Int8Linear) else head.weight.dtype
    else:
        weight = model.head_weight.detach()
        tied = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        tied.weight = nn.Parameter(weight, requires_grad=False)
        linear, dtype = linear_fn(tied), weight.dtype
    if isinstance(head, Int8Linear):
        return linear  # Int8Linear takes the hidden state in its own dtype, as head_logits
    return lambda h: linear(h.to(dtype))


def _version_key(model: nn.Module) -> tuple:
    """Changes when any parameter or buffer is replaced or updated in place (``_version``)."""
    return tuple((t.data_ptr(), t._version, t.dtype) for t in (*model.parameters(), *model.buffers()))


def lean_decoder(model: Any, cache: Any) -> LeanDecoder | None:
    """``model``'s :class:`LeanDecoder` for ``cache``, or None where the lean step does not apply: autograd
    on, a model off the CPU, a block without a lean step (:func:`ssmkit.layers.lean_step.lean_block_step`),
    a model without the language-model parts (embedding, ``norm_f``, head), or a cache of other shapes.

    Built on the first call and kept (beside the model, not in it: copies and state dicts never see it)
    until a parameter or buffer changes or the model is freed; one pass over the parameters per call,
    so call this once per generation, not per token. A decoder references the tensors it was built
    from: after ``model.to(...)`` the old ones stay alive until the next call rebuilds it.
    """
    if torch.is_grad_enabled() or not isinstance(model, nn.Module):
        return None
    embedding = getattr(model, "embedding", None)
    if not isinstance(embedding, nn.Embedding) or embedding.weight.device.type != "cpu":
        return None
    key = _version_key(model)
    cached = _DECODERS.get(model)
    if cached is None or cached[0] != key:
        cached = _DECODERS[model] = (key, _build(model))
    decoder = cached[1]
    return decoder if decoder is not None and decoder.fits(cache) else None


def _build(model: Any) -> LeanDecoder | None:
    layers, norm_f = getattr(model, "layers", None), getattr(model, "norm_f", None)
    if layers is None or not hasattr(norm_f, "eps") or getattr(norm_f, "bias", None) is not None:
        return None
    head = getattr(model, "lm_head", None)
    if head is not None and not isinstance(head, (nn.Linear, Int8Linear)):
        return None
    steps = [lean_block_step(block) for block in layers]
    if not steps or any(s is None for s in steps):
        return None
    return LeanDecoder(model, steps)
