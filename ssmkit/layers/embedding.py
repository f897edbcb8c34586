"""Token embedding with a constant output scale (µP models such as Falcon-H1 multiply the embedding's output)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ScaledEmbedding(nn.Embedding):
    """``multiplier · weight[ids]``: an ``nn.Embedding`` (same parameter, same state dict) whose lookups are
    scaled. A head tied to it reads the unscaled ``weight``, as transformers' Falcon-H1 does.

    Example::

        emb = ScaledEmbedding(100, 16, multiplier=5.66)
        x = emb(torch.tensor([[1, 2]]))   # (1, 2, 16) == 5.66 * emb.weight[[1, 2]]
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, multiplier: float, **kwargs: Any) -> None:
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        self.multiplier = float(multiplier)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) * self.multiplier

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, multiplier={self.multiplier}"


def token_embedding(num_embeddings: int, embedding_dim: int, multiplier: float = 1.0, **factory: Any) -> nn.Embedding:
    """A plain ``nn.Embedding`` when ``multiplier`` is 1, else a :class:`ScaledEmbedding`."""
    if multiplier == 1.0:
        return nn.Embedding(num_embeddings, embedding_dim, **factory)
    return ScaledEmbedding(num_embeddings, embedding_dim, multiplier=multiplier, **factory)
