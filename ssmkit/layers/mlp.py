"""SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, as transformers' ``JambaMLP``; with
Falcon-H1's µP multipliers ``down_multiplier · down_proj(silu(gate_multiplier · gate_proj(x)) * up_proj(x))``.

Dimensions: d model width, f intermediate width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """SwiGLU MLP with parameters ``gate_proj`` [f, d], ``up_proj`` [f, d], ``down_proj`` [d, f]
    (transformers' Jamba/Llama names; no bias unless ``bias``); ``gate_multiplier`` scales gate_proj's output
    before the SiLU and ``down_multiplier`` the output (Falcon-H1's ``mlp_multipliers``, biases included).

    Example::

        ff = MLP(512, 1536)
        y = ff(torch.randn(2, 10, 512))   # (2, 10, 512)
    """

    decode_graph_blocker = None
    """Its one-token step with a cache makes no host synchronisation and allocates nothing (CUDA graphs)."""

    def __init__(
        self,
        d_model: int,
        d_intermediate: int,
        *,
        bias: bool = False,
        gate_multiplier: float = 1.0,
        down_multiplier: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_intermediate", d_intermediate)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.d_model, self.d_intermediate = d_model, d_intermediate
        self.gate_multiplier, self.down_multiplier = float(gate_multiplier), float(down_multiplier)
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(d_model, d_intermediate, **kw)
        self.up_proj = nn.Linear(d_model, d_intermediate, **kw)
        self.down_proj = nn.Linear(d_intermediate, d_model, **kw)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d) -> (..., d), position-wise; NaN in a position stays in that position's output only."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"x must be a floating-point tensor (..., d_model={self.d_model}), got {got}")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (..., d_model={self.d_model}), got {tuple(x.shape)}")
        gate = self.gate_proj(x)
        if self.gate_multiplier != 1.0:
            gate = gate * self.gate_multiplier
        y = self.down_proj(F.silu(gate) * self.up_proj(x))
        return y if self.down_multiplier == 1.0 else y * self.down_multiplier
