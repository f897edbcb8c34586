"""The definition of the weight-only int8 product: dequantise, multiply, add, in float64."""

from __future__ import annotations

import torch


def int8_gemv_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (qweight * scales[:, None]).T + bias`` in float64, returned in float32: (m, k) -> (m, n)."""
    weight = qweight.to(torch.float64) * scales.to(torch.float64)[:, None]
    y = x.to(torch.float64) @ weight.T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(torch.float32)
