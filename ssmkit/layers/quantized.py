"""Weight-only int8 linear layers: per-output-channel symmetric scales, for CPU decode and prefill.

``w ≈ q · s`` with ``q = round(w / s)`` in [-127, 127] and ``s = max|w_row| / 127`` per output row (one
float32 scale per row). Activations stay floating point; the matmul reads the int8 weights:

- a few rows (decode) on CPU: ssmkit's native kernel (:mod:`ssmkit.ops.gemv`, built at first use
  where a C compiler exists), float32 activations and the int8 weights converted exactly, streamed at
  close to the memory bandwidth; without it ``torch.ops.aten._weight_int8pack_mm`` with bfloat16
  activations (with float32 activations torch takes a slow generic path, so they are rounded for it);
- many rows (prefill) or devices without either kernel: the int8 weights converted to bfloat16 (float32
  for float64 inputs) and a dense matmul, the scales applied to the output columns.

The output is cast back to the input's dtype. Error: the weight rounding (at most s/2 per entry) and, on
torch's int8 kernel and the dense path, bfloat16 rounding of the activations.

:func:`quantize_int8_` swaps a model's mixer projections (``in_proj``, ``x_proj``, ``out_proj``) and, optionally,
the output head for :class:`Int8Linear`; the embedding, ``dt_proj`` (read as a raw weight by the Mamba
step) and every 1-D parameter stay floating point.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit.ops.gemv import int8_gemv, native_available

QUANTIZABLE = ("in_proj", "x_proj", "out_proj")
# Rows up to which the int8 kernel beats dequantise + bfloat16 GEMM (measured on a 2-core AVX-512 CPU:
# the kernel wins at 1-8 rows and loses 4-10x from 32 on).
MAX_KERNEL_ROWS = 8


def _has_int8_kernel(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def _native_rows(device: torch.device) -> bool:
    """Whether a few rows on ``device`` take ssmkit's native kernel (CPU, built where a compiler exists)."""
    return device.type == "cpu" and native_available()


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights ``qweight`` (n, k) and float32 per-row ``scales`` (n,).

    ``forward(x)``: x (..., k) -> (..., n) in x's dtype. ``weight`` is the dequantised (n, k) weight in
    the compute dtype (made on each access: for code that reads a layer's weight directly, not the fast
    path).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, dtype
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach()
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=w.dtype, device=w.device)
        q, s = quantize_rows(w)
        out.qweight.copy_(q)
        out.scales.copy_(s)
        if linear.bias is not None:
            out.bias.data.copy_(linear.bias.detach())
        return out

    @property
    def weight(self) -> torch.Tensor:
        return (self.qweight.to(torch.float32) * self.scales[:, None]).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= MAX_KERNEL_ROWS and x.dtype != torch.float64 and _native_rows(x.device):
            y = int8_gemv(rows.to(torch.float32), self.qweight, self.scales, backend="native")
        elif rows.shape[0] <= MAX_KERNEL_ROWS and x.dtype != torch.float64 and _has_int8_kernel(x.device):
            y = torch.ops.aten._weight_int8pack_mm(rows.to(torch.bfloat16), self.qweight,
                                                   self._scales_as(torch.bfloat16))
        else:
            dtype = torch.float64 if x.dtype == torch.float64 else (
                torch.bfloat16 if x.device.type == "cpu" else x.dtype)
            y = F.linear(rows.to(dtype), self.qweight.to(dtype)) * self.scales.to(dtype)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _scales_as(self, dtype: torch.dtype) -> torch.Tensor:
        key = (self.scales.data_ptr(), self.scales._version, dtype)
        if getattr(self, "_scales_key", None) != key:
            self._scales_cast, self._scales_key = self.scales.to(dtype), key
        return self._scales_cast

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k) float -> (int8 (n, k), float32 scales (n,)), symmetric per row; all-zero rows get scale 1."""
    w = w.to(torch.float32)
    scales = w.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.clamp(torch.round(w / scales[:, None]), -127, 127).to(torch.int8)
    return q, scales


def _unfused_step(mixer: nn.Module, residual: torch.Tensor, norm: nn.Module, state: Any, *,
                  scale: float = 1.0) -> torch.Tensor:
    """A block's decode step without the fused norm+matmul (which reads ``in_proj.weight`` as a tensor):
    ``residual + scale * mixer(norm(residual), cache=state)``, what ``Block.forward`` computes otherwise."""
    out = mixer(norm(residual).to(norm.weight.dtype), cache=state)
    return residual + (out if scale == 1 else out * scale)


def quantize_int8_(model: nn.Module, names: tuple[str, ...] = QUANTIZABLE, *, head: bool = False) -> list[str]:
    """Swap every mixer ``nn.Linear`` named in ``names`` for an :class:`Int8Linear`, in place; returns the
    swapped modules' qualified names. Mixers so changed decode through :func:`_unfused_step`.

    ``head``: also make ``model.lm_head`` (a language model's output layer; from the embedding when tied)
    an :class:`Int8Linear`, which ``LanguageModel.head_logits`` then calls.
    """
    swapped = []
    if head and not isinstance(getattr(model, "lm_head", None), Int8Linear):
        weight = model.head_weight.detach()
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        model.lm_head = Int8Linear.from_linear(linear)
        swapped.append("lm_head")
    for block_name, block in model.named_modules():
        mixer = getattr(block, "mixer", None)
        if mixer is None:
            continue
        touched = False
        for name in names:
            child = getattr(mixer, name, None)
            if isinstance(child, nn.Linear):
                setattr(mixer, name, Int8Linear.from_linear(child))
                swapped.append(f"{block_name}.mixer.{name}")
                touched = True
        if touched and hasattr(mixer, "step_from_residual"):
            mixer.step_from_residual = functools.partial(_unfused_step, mixer)
    return swapped


def quantization_record(model: nn.Module) -> dict[str, Any] | None:
    """What a checkpoint's config.json records of ``model``'s quantisation, or None when it has none."""
    modules = [name for name, m in model.named_modules() if isinstance(m, Int8Linear)]
    return {"method": "int8", "scales": "per_output_channel_symmetric", "modules": modules} if modules else None


def apply_quantization_record(model: nn.Module, record: Any, source: str) -> None:
    """Give ``model`` (freshly built, float) the int8 layers ``record`` names, so its quantised
    state_dict loads; a malformed record raises ValueError naming ``source``."""
    if not isinstance(record, dict) or record.get("method") != "int8" or not isinstance(record.get("modules"), list):
        raise ValueError(f"{source}: \"quantization\" must be {{\"method\": \"int8\", \"modules\": [...]}}, "
                         f"got {str(record)[:200]}")
    wanted = set(record["modules"])
    names = tuple(sorted({m.rsplit(".", 1)[-1] for m in wanted - {"lm_head"} if isinstance(m, str)}))
    if not set(names) <= set(QUANTIZABLE):
        raise ValueError(f"{source}: quantised modules must be mixer {', '.join(QUANTIZABLE)}, got {sorted(wanted)[:8]}")
    got = set(quantize_int8_(model, names, head="lm_head" in wanted))
    if got != wanted:
        raise ValueError(f"{source}: quantisation record names {len(wanted)} modules, the model has {len(got)} such")
