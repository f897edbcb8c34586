"""Non-causal sequence mixers: a causal mixer run both ways, and full (unmasked) self-attention.

Dimensions: ``b`` batch, ``l`` length, ``d`` model width, ``h`` heads, ``p`` head width.

Images, time-series histories read as a whole and diffusion tokens have no "future" to hide: every token
may read every other. :class:`Bidirectional` makes any causal mixer of ssmkit (Mamba, Mamba-2, causal
S4D, ...) two-sided the way Vision Mamba and DiS do: one mixer reads the sequence left to right, a second
one (its own weights) reads it right to left, and their outputs are summed. :class:`SelfAttention` is the
matching transformer mixer (ViT/DiT), every query attending to every key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Bidirectional(nn.Module):
    """``y = forward_mixer(x) + flip(backward_mixer(flip(x)))``, flips along the length.

    Args:
        forward_mixer, backward_mixer: causal mixers ``x (b, l, d) -> (b, l, d)`` (two instances of one
            class, each with its own parameters).

    Output position ``i`` therefore depends on ``x[:, :i + 1]`` through the first and on ``x[:, i:]``
    through the second: on the whole row. No recurrent state or decode step (it reads the future).

    Example::

        mixer = Bidirectional(Mamba(64), Mamba(64))
        y = mixer(torch.randn(2, 49, 64))     # (2, 49, 64)
    """

    def __init__(self, forward_mixer: nn.Module, backward_mixer: nn.Module) -> None:
        super().__init__()
        if type(forward_mixer) is not type(backward_mixer):
            raise TypeError("Bidirectional: both directions must be mixers of one class, got "
                            f"{type(forward_mixer).__name__} and {type(backward_mixer).__name__}")
        self.forward_mixer = forward_mixer
        self.backward_mixer = backward_mixer

    def forward(self, x: torch.Tensor, *, seq_idx: torch.Tensor | None = None, initial_state: object = None,
                cache: object = None) -> torch.Tensor:
        """x (b, l, d) -> (b, l, d). ``seq_idx`` (b, l) keeps packed documents apart in both directions."""
        if initial_state is not None or cache is not None:
            raise ValueError("Bidirectional reads future positions, so it has no recurrent state, cache or step")
        flipped_idx = None if seq_idx is None else seq_idx.flip(1)
        ahead = self.forward_mixer(x, seq_idx=seq_idx)
        behind = self.backward_mixer(x.flip(1), seq_idx=flipped_idx).flip(1)
        return ahead + behind


class SelfAttention(nn.Module):
    """Multi-head self-attention without a mask: every position reads every position (ViT, DiT).

    Parameters ``qkv`` [3·h·p, d] and ``out_proj`` [d, h·p] (with biases, as ViT/DiT). No positional
    encoding: add position embeddings to the tokens (as DiT does).

    Example::

        mixer = SelfAttention(64, num_heads=4)
        y = mixer(torch.randn(2, 49, 64))     # (2, 49, 64)
    """

    def __init__(self, d_model: int, num_heads: int, *, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(num_heads, int) or num_heads < 1 or d_model % num_heads:
            raise ValueError(f"SelfAttention: num_heads must be a positive divisor of d_model={d_model}, "
                             f"got {num_heads!r}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, device=device, dtype=dtype)
        self.out_proj = nn.Linear(d_model, d_model, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, *, seq_idx: torch.Tensor | None = None, initial_state: object = None,
                cache: object = None) -> torch.Tensor:
        """x (b, l, d) -> (b, l, d); ``seq_idx`` (b, l) limits attention to positions of equal id."""
        if initial_state is not None or cache is not None:
            raise ValueError("SelfAttention is non-causal: it has no recurrent state, cache or step")
        b, l, _ = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None if seq_idx is None else (seq_idx[:, None, :, None] == seq_idx[:, None, None, :])
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(b, l, self.d_model))
