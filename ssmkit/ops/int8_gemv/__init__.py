"""Weight-only int8 matrix-vector products for CPU decode: ``int8_gemv``.

``y = (x @ qweight.T) * scales + bias`` for a few rows of float32 activations x and int8 weights with
one float32 scale per output row (:class:`ssmkit.layers.quantized.Int8Linear`'s storage). The native
kernel (``native.c``, built at first use where a C compiler exists, :mod:`.native`) converts the
weights to float32 exactly and streams them at close to the memory bandwidth: on this project's
AVX-512 CPU about 1.7x torch's ``aten._weight_int8pack_mm``, which also rounds the activations to
bfloat16. Where the native kernel is not available the op runs its float64 reference (tests) or
the caller keeps its torch path (:func:`native_available`).

Dimensions: ``m`` rows (at most :data:`MAX_ROWS`), ``k`` input features, ``n`` output features.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ssmkit.ops._checks import Dims, check_nonempty, check_tensor
from ssmkit.ops.int8_gemv import native
from ssmkit.ops.int8_gemv.reference import int8_gemv_reference

__all__ = ["MAX_ROWS", "int8_gemv", "native_available", "native_int8_linear"]

# Past a few rows a GEMM (the dequantised bfloat16 matmul of Int8Linear) beats row-by-row products.
MAX_ROWS = 8


def native_available() -> bool:
    """Whether the native kernel is built and loaded (builds it on the first call)."""
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
    dims = Dims()
    check_tensor("x", x, ("m", "k"), dims)
    check_tensor("qweight", qweight, ("n", "k"), dims, floating=False, integer=True)
    check_tensor("scales", scales, ("n",), dims)
    if bias is not None:
        check_tensor("bias", bias, ("n",), dims)
    check_nonempty("x", dims["m"], "row")
    if dims["m"] > MAX_ROWS:
        raise ValueError(f"int8_gemv takes at most {MAX_ROWS} rows of x, got {dims['m']}")
    if qweight.dtype != torch.int8:
        raise TypeError(f"qweight must be int8, got {qweight.dtype}")
    for name, t in (("x", x), ("scales", scales), ("bias", bias)):
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise TypeError(f"{name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")
    if qweight.device.type != "cpu":
        raise TypeError(f"qweight must be on the CPU, got {qweight.device}")
    if backend not in ("auto", "native", "reference"):
        raise ValueError(f"backend must be 'auto', 'native' or 'reference', got {backend!r}")
    if backend == "reference" or (backend == "auto" and not native_available()):
        return int8_gemv_reference(x, qweight, scales, bias)
    if not native_available():
        raise ValueError("backend='native': the native int8 kernel is not available (no C compiler, a failed "
                         "build, or SSMKIT_NATIVE=0)")
    return native_int8_linear(qweight, scales, bias)(x)


def native_int8_linear(qweight: torch.Tensor, scales: torch.Tensor,
                       bias: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x (m, k) float32 -> (m, n) float32`` through the native kernel, for a decode loop: the weights
    are checked here once (CPU, int8 / float32, contiguous), x's shape is not checked per call (the
    caller passes at most MAX_ROWS rows of k). Requires :func:`native_available`."""
    lib = native.library()
    if lib is None:
        raise ValueError("the native int8 kernel is not available")
    q = qweight.detach().contiguous()
    s = scales.detach().to(torch.float32).contiguous()
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    n, k = q.shape
    if q.dtype != torch.int8 or q.device.type != "cpu" or s.shape != (n,) or (b is not None and b.shape != (n,)):
        raise ValueError(f"native_int8_linear takes (n, k) int8 CPU weights with (n,) scales and bias, got "
                         f"{tuple(q.shape)} {q.dtype}, scales {tuple(s.shape)}")
    fn, q_ptr, s_ptr, b_ptr = lib.ssmkit_int8_gemv, q.data_ptr(), s.data_ptr(), None if b is None else b.data_ptr()

    def linear(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty(x.shape[0], n, dtype=torch.float32)
        fn(q_ptr, x.data_ptr(), s_ptr, b_ptr, y.data_ptr(), x.shape[0], n, k, torch.get_num_threads())
        return y
    linear.tensors = (q, s, b)  # keep the buffers the pointers refer to alive
    return linear
