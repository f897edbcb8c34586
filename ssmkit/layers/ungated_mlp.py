"""Ungated feed-forward: ``down_proj(act(up_proj(x)))``, as transformers' ``NemotronHMLP`` (squared ReLU,
Nemotron-H's "-" layers) and the classic two-matrix transformer MLP.

Dimensions: d model width, f intermediate width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmkit.layers.configs import layer_settings

Activation = Literal["relu2", "relu", "silu", "gelu", "gelu_pytorch_tanh"]
"""The activations, by their names in transformers' ``ACT2FN``."""
ACTIVATIONS: tuple[str, ...] = get_args(Activation)


def _relu2(x: Tensor) -> Tensor:
    return torch.square(F.relu(x))


_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu2": _relu2,
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,  # the exact (erf) GELU, as ACT2FN["gelu"]
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass(kw_only=True)
class UngatedMLPConfig:
    """Ungated MLP settings (:class:`UngatedMLP`, suffix ``u``)."""

    d_intermediate: int = 1024
    """Hidden size of the MLP."""
    activation: Activation = "relu2"
    """relu2 (squared ReLU, Nemotron-H), relu, silu, gelu (erf) or gelu_pytorch_tanh."""
    bias: bool = False
    """Biases in both projections."""

    def validate(self, d_model: int) -> None:
        if not self.d_intermediate > 0:
            raise ValueError(f"ungated_mlp.d_intermediate must be > 0, got {self.d_intermediate!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ungated_mlp.activation must be one of {', '.join(ACTIVATIONS)}, "
                             f"got {self.activation!r}")


class UngatedMLP(nn.Module):
    """Two-matrix MLP with parameters ``up_proj`` [f, d], ``down_proj`` [d, f] (transformers' Nemotron-H
    names; biases only with ``bias``).

    Example::

        ff = UngatedMLP(512, UngatedMLPConfig(d_intermediate=2048))   # squared ReLU
        y = ff(torch.randn(2, 10, 512))                                # (2, 10, 512)
    """

    decode_graph_blocker = None
    """Its one-token step makes no host synchronisation and allocates nothing (CUDA graphs)."""

    def __init__(self, d_model: int, config: UngatedMLPConfig | None = None, *, layer_idx: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 **settings: Any) -> None:
        super().__init__()
        self.config = config = layer_settings(UngatedMLPConfig, config, settings, "UngatedMLP")
        config.validate(d_model)
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        self.d_model, self.d_intermediate = d_model, config.d_intermediate
        self.act = _FUNCTIONS[config.activation]
        kw = {"bias": config.bias, "device": device, "dtype": dtype}
        self.up_proj = nn.Linear(d_model, config.d_intermediate, **kw)
        self.down_proj = nn.Linear(config.d_intermediate, d_model, **kw)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d) -> (..., d), position-wise."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"x must be a floating-point tensor (..., d_model={self.d_model}), got {got}")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (..., d_model={self.d_model}), got {tuple(x.shape)}")
        return self.down_proj(self.act(self.up_proj(x)))


def size(config: UngatedMLPConfig, d_model: int) -> tuple[int, int]:
    """(parameters, buffer elements) of the layer ``(config, d_model)`` builds: up and down projections."""
    f = config.d_intermediate
    return 2 * d_model * f + ((f + d_model) if config.bias else 0), 0


__all__ = ["ACTIVATIONS", "UngatedMLP", "UngatedMLPConfig"]
