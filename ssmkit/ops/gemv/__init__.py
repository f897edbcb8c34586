"""Matrix-vector products that stream int8 or bfloat16 weights, for CPU decode: ``int8_gemv``, ``bf16_gemv``
(and float32 ones, through :func:`native_linear`).

``y = (x @ W.T) * scales + bias`` for a few rows of float32 activations ``x``, with ``W`` int8 and one
float32 scale per output row (:class:`ssmkit.layers.quantized.Int8Linear`'s storage) or ``W`` bfloat16.
The native kernels (built at first use where a C compiler exists, :mod:`ssmkit.ops.native`)
convert the weights to float32 exactly, accumulate in float32 and stream the weights at close to the
memory bandwidth: on this project's AVX-512 CPU about 1.7x torch's ``aten._weight_int8pack_mm``
(which also rounds the activations to bfloat16) and 1.2x torch's bfloat16 ``mv``. Where they are not
available the ops run their float64 reference, and callers keep their torch path
(:func:`native_available`).

Dimensions: ``m`` rows (at most :data:`MAX_ROWS`), ``k`` input features, ``n`` output features.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ssmkit.ops import native
from ssmkit.ops._checks import Dims, check_nonempty, check_tensor
from ssmkit.ops.gemv.reference import gemv_reference

__all__ = ["MAX_ROWS", "bf16_gemv", "int8_gemv", "native_available", "native_linear"]

# Past a few rows a GEMM beats row-by-row products (each row re-reads the weights from L1, not memory,
# but a blocked matmul does far fewer loads per multiply-add).
MAX_ROWS = 8
BACKENDS = ("auto", "native", "reference")


def native_available() -> bool:
    """Whether the native kernels are built and loaded (builds them on the first call)."""
    return native.library() is not None


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
              *, backend: str = "auto") -> torch.Tensor:
    """``(x @ qweight.T) * scales + bias`` -> (m, n) float32.

    Args:
        x: (m, k) float32 on the CPU, m <= MAX_ROWS. qweight: (n, k) int8. scales: (n,) float32.
        bias: (n,) float32 or None.
        backend: "auto" (native, else the reference), "native" (an error where it is not available)
            or "reference" (float64, rounded to float32 at the end).
    """
    dims = _check(x, qweight, bias, backend, torch.int8, "qweight")
    check_tensor("scales", scales, ("n",), dims)
    _check_float32(scales=scales)
    return _dispatch(x, qweight, scales, bias, backend)


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
              backend: str = "auto") -> torch.Tensor:
    """``x @ weight.T + bias`` -> (m, n) float32, for a bfloat16 ``weight`` (n, k) and float32 ``x``
    (m, k), m <= MAX_ROWS, and ``bias`` (n,) float32 or None; ``backend`` as :func:`int8_gemv`."""
    _check(x, weight, bias, backend, torch.bfloat16, "weight")
    return _dispatch(x, weight, None, bias, backend)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str, dtype: torch.dtype,
           name: str) -> Dims:
    dims = Dims()
    check_tensor("x", x, ("m", "k"), dims)
    check_tensor(name, weight, ("n", "k"), dims, floating=dtype.is_floating_point, integer=not dtype.is_floating_point)
    if bias is not None:
        check_tensor("bias", bias, ("n",), dims)
    check_nonempty("x", dims["m"], "row")
    if dims["m"] > MAX_ROWS:
        raise ValueError(f"the GEMV ops take at most {MAX_ROWS} rows of x, got {dims['m']}")
    if weight.dtype != dtype or weight.device.type != "cpu":
        raise TypeError(f"{name} must be a {dtype} CPU tensor, got {weight.dtype} on {weight.device}")
    _check_float32(x=x, bias=bias)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return dims


def _check_float32(**tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise TypeError(f"{name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")


def _dispatch(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None, bias: torch.Tensor | None,
              backend: str) -> torch.Tensor:
    if backend == "reference" or (backend == "auto" and not native_available()):
        return gemv_reference(x, weight, scales, bias)
    if not native_available():
        raise ValueError("backend='native': the native GEMV kernels are not available (no C compiler, a failed "
                         "build, or SSMKIT_NATIVE=0)")
    return native_linear(weight, scales, bias)(x)


_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # ssmkit_gemv_any's weight kinds


def native_linear(weight: torch.Tensor, scales: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x (m, k) float32 -> (m, n) float32`` through the native kernel for ``weight`` (int8 with
    ``scales``, or bfloat16 or float32 without), for a decode loop: the weights are checked once here (CPU,
    contiguous copies where needed), x is not checked per call (the caller passes at most MAX_ROWS rows of
    k float32 values). Requires :func:`native_available`. float32: the same product as ``F.linear`` up to
    float32 rounding, streamed about 15% faster than MKL's GEMV at batch 1 on this project's CPU (a
    50280 x 768 head: 15.0 against 12.3-13.1 GB/s, 1 thread)."""
    lib = native.library()
    if lib is None:
        raise ValueError("the native GEMV kernels are not available")
    w = weight.detach().contiguous()
    n, k = w.shape
    if w.device.type != "cpu" or w.dtype not in _KINDS or (w.dtype == torch.int8) != (scales is not None):
        raise ValueError(f"native_linear takes int8 CPU weights with scales, or bfloat16 ones without (float32 too), "
                         f"got {w.dtype} on {w.device}, scales {'given' if scales is not None else 'None'}")
    s = None if scales is None else scales.detach().to(torch.float32).contiguous()
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    if (s is not None and s.shape != (n,)) or (b is not None and b.shape != (n,)):
        raise ValueError(f"scales and bias must have shape ({n},)")
    fn, kind = lib.ssmkit_gemv_any, _KINDS[w.dtype]
    pointers = (w.data_ptr(), None if s is None else s.data_ptr(), None if b is None else b.data_ptr())

    def linear(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty(x.shape[0], n, dtype=torch.float32)
        fn(kind, pointers[0], x.data_ptr(), pointers[1], pointers[2], y.data_ptr(), x.shape[0], n, k,
           torch.get_num_threads())
        return y
    linear.tensors = (w, s, b)  # keep the buffers the pointers refer to alive
    return linear
