"""The residual block: pre-norm, a sequence mixer, an optional pre-norm feed-forward.

``r ← r + mixer(norm(r))`` then, when the block has one, ``r ← r + ff(ff_norm(r))``. A mixer may define
``step_from_residual(r, norm, cache)`` computing the first of these for one token with its cache; a decode
step then calls it, so that the mixer can fuse the norm and the add into its own kernels. A mixer whose
update is not of that form (it reads ``r`` before the norm, or the model's input embeddings: Zamba2's ``Z``
layers) defines ``forward_from_residual(r, norm, *, inputs, seq_idx, initial_state, cache)`` returning the
new ``r``; the block then always calls it, passing the ``inputs`` it was given. With
``residual_in_fp32`` the residual stream ``r`` is kept in float32 (float64 for float64 models) while the
mixer runs in the weights' dtype, as mamba_ssm's ``Block`` does.
"""

from __future__ import annotations

import torch
from torch import nn

from ssmkit.layers.norm import RMSNorm
from ssmkit.layers.state import LayerState


class Block(nn.Module):
    """Pre-norm residual block around a mixer (and an optional feed-forward).

    Args:
        d_model: width of the residual stream.
        mixer: a sequence mixer taking ``(x, *, seq_idx, initial_state, cache)`` (Mamba, Mamba2, ...).
        ff: a feed-forward module ``x -> x`` (:class:`ssmkit.layers.MLP`, :class:`ssmkit.layers.MoE`) or None.
        norm_eps: eps of the RMSNorms. residual_in_fp32: keep the residual stream in float32.

    Shapes: residual (b, l, d_model) in any float dtype -> (b, l, d_model), float32 with
    ``residual_in_fp32`` (the mixer's output dtype otherwise).

    Example::

        block = Block(64, Mamba(64))
        r = block(torch.randn(2, 10, 64))
    """

    def __init__(self, d_model: int, mixer: nn.Module, *, ff: nn.Module | None = None, norm_eps: float = 1e-5,
                 residual_in_fp32: bool = True, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.norm = RMSNorm(d_model, eps=norm_eps, device=device, dtype=dtype)
        self.mixer = mixer
        self.ff_norm = None if ff is None else RMSNorm(d_model, eps=norm_eps, device=device, dtype=dtype)
        self.ff = ff

    def allocate_state(self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None,
                       max_length: int | None = None) -> LayerState:
        """The mixer's zero state (feed-forwards are stateless); ``max_length`` preallocates room for that
        many tokens in states that grow (full attention), and fixed-size states ignore it."""
        return self.mixer.allocate_state(batch_size, dtype=dtype, device=device, max_length=max_length)

    def forward(self, residual: torch.Tensor, *, seq_idx: torch.Tensor | None = None,
                initial_state: LayerState | None = None, cache: LayerState | None = None,
                inputs: torch.Tensor | None = None) -> torch.Tensor:
        """residual (b, l, d_model) -> the residual stream after this block. ``inputs`` (b, l, d_model), the
        model's input embeddings, reach the mixers that read them (``forward_from_residual``)."""
        dtype = self.norm.weight.dtype
        if self.residual_in_fp32:
            residual = residual.to(torch.promote_types(residual.dtype, torch.float32))
        if hasattr(self.mixer, "forward_from_residual"):
            residual = self.mixer.forward_from_residual(residual, self.norm, inputs=inputs, seq_idx=seq_idx,
                                                        initial_state=initial_state, cache=cache)
        elif cache is not None and residual.shape[1] == 1 and hasattr(self.mixer, "step_from_residual"):
            # A decode step: the mixer fuses this block's norm and the residual add into its matmuls.
            residual = self.mixer.step_from_residual(residual, self.norm, cache)
        else:
            h = self.mixer(self.norm(residual).to(dtype), seq_idx=seq_idx, initial_state=initial_state, cache=cache)
            residual = residual + h
        if self.ff is not None:
            residual = residual + self.ff(self.ff_norm(residual).to(dtype))
        return residual
