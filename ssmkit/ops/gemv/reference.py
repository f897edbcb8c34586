"""The definition of the GEMV ops: dequantise (int8 times its row scales) or widen (bfloat16), multiply,
add the bias, in float64."""

from __future__ import annotations

import torch


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (weight * scales[:, None]).T + bias`` in float64 (no scales: ``x @ weight.T + bias``),
    returned in float32: x (m, k), weight (n, k) -> (m, n)."""
    w = weight.to(torch.float64)
    if scales is not None:
        w = w * scales.to(torch.float64)[:, None]
    y = x.to(torch.float64) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(torch.float32)
