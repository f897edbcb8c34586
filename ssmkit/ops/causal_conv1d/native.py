"""The depthwise causal convolution's one-token update with SiLU, through the native kernel (:mod:`ssmkit.ops.native`).

At batch 1 on a CPU the torch version (shift the window, multiply, sum, add the bias, SiLU, casts) is six
small ops per layer and token; this is one call. Same function as
``causal_conv1d_update(x, conv_state, weight, bias, activation="silu")`` for a window in float32 or
bfloat16, up to the float32 summation order.

Dimensions: ``b`` batch, ``c`` channels, ``w`` kernel width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ssmkit.ops import native

ConvStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def native_conv_step(weight: torch.Tensor, bias: torch.Tensor | None) -> ConvStep | None:
    """``(x, window) -> out`` for a layer's ``weight`` (c, w) and ``bias`` (c,) or None, or None where the native
    kernels are not built.

    ``x`` (b, c) float32 with unit stride along c (a slice of a projection's output is fine; for a bfloat16
    window its values must be bfloat16 numbers, as a bfloat16 layer's are), ``window`` (b, c, w) float32 or
    bfloat16, contiguous, shifted in place with ``x`` entering last. Returns silu(window · weight + bias),
    (b, c) float32. Nothing is checked per call (for a decode loop whose caller checked the shapes once).
    """
    lib = native.library()
    if lib is None:
        return None
    fn = lib.ssmkit_conv_step
    w = weight.detach().to(torch.float32).contiguous()
    b_ = None if bias is None else bias.detach().to(torch.float32).contiguous()
    bias_ptr = None if b_ is None else b_.data_ptr()
    c, width = w.shape

    def step(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], c, dtype=torch.float32)
        fn(window.data_ptr(), int(window.dtype == torch.bfloat16), x.data_ptr(), x.stride(0), w.data_ptr(), bias_ptr,
           out.data_ptr(), x.shape[0], c, width)
        return out
    step.tensors = (w, b_)  # keep the buffers the pointers refer to alive
    return step
