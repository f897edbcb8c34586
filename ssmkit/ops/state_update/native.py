"""The Mamba-2 decode step in one pass over the state, through the native kernel (:mod:`ssmkit.ops.native`).

The vectorised torch step (``reference.py``) decays the state, adds the input and reads it out in three
passes; at batch 1 on a CPU, with a 130M model's states (~19 MB) beyond the caches, those passes cost
as much as a third of the int8 weights' traffic. This is the same step for the Mamba-2 form with a
scalar decay per head, float32 state, no z (the layer applies D and the gate), one pass; beside it
Mamba-1's selective step, and each model's decode step bound as larger single calls (from in_proj's output,
or a whole pre-norm block with its norm, projections and residual add: :func:`native_mamba2_layer_step`,
:func:`native_mamba_layer_step`).

Dimensions: ``b`` batch, ``h`` heads, ``p`` head dim, ``n`` state size, ``g`` groups of B/C.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from ssmkit.ops import native

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Mamba2Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def native_ssd_step() -> Step | None:
    """``(state, x, delta, decay, B, C) -> y``, or None where the native kernels are not built.

    ``state ← state · decay[..., None, None] + (delta · x)[..., None] ⊗ B[group]``, in place, and
    ``y = state · C[group]``. state: (b, h, p, n) float32, contiguous (a layer's cache); x: (b, h, p);
    delta, decay: (b, h) (Δ after bias, softplus and limits; exp(Δ A)); B, C: (b, g, n), g dividing h;
    all float32 on the CPU. Returns y (b, h, p) float32. Nothing is checked per call: for a decode
    loop whose caller checked the shapes once (the lean step, :mod:`ssmkit.layers.lean_step`).
    """
    lib = native.library()
    if lib is None:
        return None
    fn = lib.ssmkit_ssd_step

    def step(state: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, decay: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor) -> torch.Tensor:
        b, h, p, n = state.shape
        x, delta, decay, B, C = (t.contiguous() for t in (x, delta, decay, B, C))
        y = torch.empty(b, h, p, dtype=torch.float32)
        fn(state.data_ptr(), x.data_ptr(), delta.data_ptr(), decay.data_ptr(), B.data_ptr(), C.data_ptr(),
           y.data_ptr(), b, h, p, n, B.shape[1], torch.get_num_threads())
        return y
    return step


SelectiveStep = Callable[..., torch.Tensor]


def native_selective_step() -> Callable[..., SelectiveStep] | None:
    """``bind(A, dt_bias, D, dt_weight=None)``, binding a Mamba(-1) layer's parameters to its one-pass
    selective-scan step, or None where the native kernels are not built.

    ``bind(A (I, n), dt_bias (I,) or None, D (I,) or None, dt_weight (I, R) or None)`` returns
    ``step(state, x, dt, B, C, z) -> y``: with ``dt_weight``, ``dt`` (b, R) is dt_proj's input and the step
    projects it (float32); without, ``dt`` (b, I) is dt_proj's output. Then ``Δ = softplus(dt + dt_bias)``,
    ``state ← state · exp(Δ A) + (Δ x)[..., None] B[:, None]`` in place, ``y = (state · C + D x) · silu(z)``
    (no gate when z is None). state: (b, I, n) float32, contiguous; x, dt, z: float32 with unit stride
    along the last dimension (slices of a projection's output are fine); B, C: (b, n) float32, unit
    stride along n. Returns y (b, I) float32. Nothing is checked per call (for a decode loop whose caller
    checked the shapes once).
    """
    lib = native.library()
    if lib is None:
        return None
    fn = lib.ssmkit_selective_step

    def bind(A: torch.Tensor, dt_bias: torch.Tensor | None, D: torch.Tensor | None,
             dt_weight: torch.Tensor | None = None) -> SelectiveStep:
        dt_w16 = None if dt_weight is None else blocked_dt_weight(dt_weight.detach().to(torch.float32))
        held = tuple(None if t is None else t.detach().to(torch.float32).contiguous() for t in (A, dt_bias, D, dt_w16))
        a, bias, d, w16 = (None if t is None else t.data_ptr() for t in held)
        rank = 0 if dt_weight is None else dt_weight.shape[1]

        def step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 z: torch.Tensor | None) -> torch.Tensor:
            b, I, n = state.shape
            y = torch.empty(b, I, dtype=torch.float32)
            if B.stride(0) != C.stride(0):
                B, C = B.contiguous(), C.contiguous()
            fn(state.data_ptr(), x.data_ptr(), x.stride(0), dt.data_ptr(), dt.stride(0), w16, rank, bias, a,
               B.data_ptr(), C.data_ptr(), B.stride(0), d, None if z is None else z.data_ptr(),
               0 if z is None else z.stride(0), y.data_ptr(), b, I, n, torch.get_num_threads())
            return y
        step.tensors = held  # keep the buffers the pointers refer to alive
        return step
    return bind


def blocked_dt_weight(dt_weight: torch.Tensor) -> torch.Tensor:
    """dt_proj's weight (I, R) as the native selective steps read it: (ceil(I / 16), R, 16), blocks of 16
    channels, zero-padded, each block's weights contiguous (one sequential pass per block)."""
    I, R = dt_weight.shape
    blocks = -(-I // 16)
    padded = torch.zeros(blocks * 16, R, dtype=dt_weight.dtype)
    padded[:I] = dt_weight
    return padded.view(blocks, 16, R).transpose(1, 2).contiguous()


def native_mamba2_step() -> Callable[..., Mamba2Step] | None:
    """``bind(...)``, binding a Mamba-2 layer's parameters to its decode step between the convolution and
    out_proj in one call, or None where the native kernels are not built.

    ``bind(A (h,), dt_bias (h,) or None, D (h,) or (h·p,) or None, dt_limit (lo, hi), norm_weight (h·p,) or
    None, group, eps, round_bf16, shape (h, p, n, g))`` returns ``step(state, xBC, dt, z) -> out``:
    ``Δ = clamp(softplus(dt + dt_bias), *dt_limit)``, the state update of :func:`native_ssd_step` with
    decay exp(Δ A), ``y = state · C + D x`` (rounded to bfloat16 with ``round_bf16``, as a bfloat16 layer
    rounds the scan's output), ``y · silu(z)`` and, with ``norm_weight``, the RMSNorm over groups of ``group``
    channels times it. state: (b, h, p, n) float32, contiguous; xBC: (b, h·p + 2·g·n) the convolution's
    output, dt: (b, h), z: (b, h·p), all float32 with unit stride along the last dimension. Returns
    (b, h·p) float32. Nothing is checked per call.
    """
    lib = native.library()
    if lib is None:
        return None
    fn = lib.ssmkit_mamba2_step

    def bind(A: torch.Tensor, dt_bias: torch.Tensor | None, D: torch.Tensor | None, dt_limit: tuple[float, float],
             norm_weight: torch.Tensor | None, group: int, eps: float, round_bf16: bool,
             shape: tuple[int, int, int, int]) -> Mamba2Step:
        held = tuple(None if t is None else t.detach().to(torch.float32).contiguous().view(-1)
                     for t in (A, dt_bias, D, norm_weight))
        a, bias, d, w = (None if t is None else t.data_ptr() for t in held)
        h, p, n, g = shape
        per_channel = int(held[2] is not None and held[2].numel() == h * p)
        lo, hi = (float(v) for v in dt_limit)

        def step(state: torch.Tensor, xBC: torch.Tensor, dt: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            b = state.shape[0]
            out = torch.empty(b, h * p, dtype=torch.float32)
            fn(state.data_ptr(), xBC.data_ptr(), xBC.stride(0), dt.data_ptr(), dt.stride(0), bias, a, lo, hi, d,
               per_channel, z.data_ptr(), z.stride(0), w, group, eps, int(round_bf16), out.data_ptr(), b, h, p, n, g,
               torch.get_num_threads())
            return out
        step.tensors = held  # keep the buffers the pointers refer to alive
        return step
    return bind


Mamba2ConvStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def native_mamba2_conv_step() -> Callable[..., Mamba2ConvStep] | None:
    """``bind(...)``, binding a Mamba-2 layer's parameters to its whole decode step between ``in_proj`` and
    ``out_proj`` in one call (the convolution's update and SiLU, then :func:`native_mamba2_step`'s step), or
    None where the native kernels are not built.

    ``bind(conv_weight (c, w), conv_bias (c,) or None, A, dt_bias, D, dt_limit, norm_weight, group, eps, bf16,
    shape (h, p, n, g))`` (the last arguments as :func:`native_mamba2_step`'s, c = h·p + 2·g·n) returns
    ``step(state, window, zxbcdt) -> out``: ``zxbcdt`` (b, h·p + c + h) is in_proj's output in float32 with
    unit stride along the last dimension; ``window`` (b, c, w) the convolution's state, contiguous, float32
    (``bf16`` False) or bfloat16 (``bf16`` True), shifted in place; ``state`` (b, h, p, n) float32,
    contiguous, updated in place. With ``bf16`` the step rounds to bfloat16 where a bfloat16 layer holds its
    tensors in bfloat16: in_proj's output, the convolution's output, the scan's output (before the gate, where a gated
    norm follows) and ``out``. Returns ``out`` (b, h·p) float32, out_proj's input. Nothing is checked per call.
    """
    lib = native.library()
    if lib is None:
        return None
    fn = lib.ssmkit_mamba2_conv_step

    def bind(conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, A: torch.Tensor,
             dt_bias: torch.Tensor | None, D: torch.Tensor | None, dt_limit: tuple[float, float],
             norm_weight: torch.Tensor | None, group: int, eps: float, bf16: bool,
             shape: tuple[int, int, int, int]) -> Mamba2ConvStep:
        held = tuple(None if t is None else t.detach().to(torch.float32).contiguous().view(-1)
                     for t in (conv_weight, conv_bias, A, dt_bias, D, norm_weight))
        cw, cb, a, bias, d, w = (None if t is None else t.data_ptr() for t in held)
        h, p, n, g = shape
        c, width = conv_weight.shape
        per_channel = int(held[4] is not None and held[4].numel() == h * p)
        lo, hi = (float(v) for v in dt_limit)
        scratch = 2 * c + h * p + h

        def step(state: torch.Tensor, window: torch.Tensor, zxbcdt: torch.Tensor) -> torch.Tensor:
            b = state.shape[0]
            # The kernel's scratch after the output, one allocation per call (a step may run in several threads).
            buffer = torch.empty(b * h * p + scratch, dtype=torch.float32)
            out = buffer[: b * h * p].view(b, h * p)
            fn(state.data_ptr(), window.data_ptr(), zxbcdt.data_ptr(), zxbcdt.stride(0), cw, cb, width, bias, a, lo,
               hi, d, per_channel, w, group, eps, int(bf16), buffer[b * h * p:].data_ptr(), out.data_ptr(), b, h, p,
               n, g, torch.get_num_threads())
            return out
        step.tensors = held  # keep the buffers the pointers refer to alive
        return step
    return bind


LayerStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


def native_mamba2_layer_step() -> Callable[..., LayerStep] | None:
    """``bind(...)``, binding a pre-norm Mamba-2 block's parameters to its whole decode step in one call, or
    None where the native kernels are not built.

    ``bind(norm_weight (H,), norm_eps, in_proj, out_proj, then the arguments of`` :func:`native_mamba2_conv_step`
    ``)`` with ``in_proj`` / ``out_proj`` each ``(weight, scales or None, bias or None)``: a float32, bfloat16 or
    int8 weight (n, k) (int8 with per-row float32 scales). Returns ``step(r, state, window) -> out``:
    ``out = r + out_proj(mixer(RMSNorm(r)))`` for the float32 residual stream ``r`` (b, H), contiguous, b at
    most :data:`ssmkit.ops.gemv.MAX_ROWS`, with ``window`` and ``state`` as in :func:`native_mamba2_conv_step`
    (updated in place), rounding to bfloat16 with ``bf16`` where a bfloat16 block does (the normed input and
    out_proj's output too). Returns ``out`` (b, H) float32. Nothing is checked per call.
    """
    lib = native.library()
    if lib is None:
        return None
    fn = lib.ssmkit_mamba2_layer_step

    def bind(norm_weight: torch.Tensor, norm_eps: float, in_proj: tuple, out_proj: tuple, conv_weight: torch.Tensor,
             conv_bias: torch.Tensor | None, A: torch.Tensor, dt_bias: torch.Tensor | None, D: torch.Tensor | None,
             dt_limit: tuple[float, float], norm_gate_weight: torch.Tensor | None, group: int, eps: float,
             bf16: bool, shape: tuple[int, int, int, int]) -> LayerStep:
        def f32(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(torch.float32).contiguous().view(-1)

        def matrix(weight: torch.Tensor, scales: torch.Tensor | None, bias: torch.Tensor | None) -> tuple:
            w = weight.detach().contiguous()
            return (_KINDS[w.dtype], w, f32(scales), f32(bias))

        def ptr(t: torch.Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        vectors = tuple(f32(t) for t in (norm_weight, conv_weight, conv_bias, A, dt_bias, D, norm_gate_weight))
        mats = (matrix(*in_proj), matrix(*out_proj))
        nw, cw, cb, a, bias, d, gw = (ptr(t) for t in vectors)
        (ik, iw, isc, ib), (ok, ow, osc, ob) = ((kind, *(ptr(t) for t in ts)) for kind, *ts in mats)
        h, p, n, g = shape
        H, nin = vectors[0].numel(), mats[0][1].shape[0]
        c, width = conv_weight.shape
        per_channel = int(vectors[5] is not None and vectors[5].numel() == h * p)
        lo, hi = (float(v) for v in dt_limit)
        rest = 2 * c + h * p + h

        def step(r: torch.Tensor, state: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
            b = r.shape[0]
            out = torch.empty(b, H, dtype=torch.float32)
            scratch = torch.empty(b * (H + nin + h * p) + rest, dtype=torch.float32)
            fn(r.data_ptr(), out.data_ptr(), H, nw, norm_eps, ik, iw, isc, ib, nin, ok, ow, osc, ob, state.data_ptr(),
               window.data_ptr(), cw, cb, width, bias, a, lo, hi, d, per_channel, gw, group, eps, int(bf16),
               scratch.data_ptr(), b, h, p, n, g, torch.get_num_threads())
            return out
        step.tensors = (vectors, mats)  # keep the buffers the pointers refer to alive
        return step
    return bind


class _Matrix(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("kind", ctypes.c_int)]


class _MambaLayer(ctypes.Structure):
    """``MambaLayer`` of ``mamba_step.c``, field by field (its size is checked against the library's)."""

    _fields_ = [*((name, ctypes.c_long) for name in ("H", "I", "n", "R", "width")),
                ("norm_w", ctypes.c_void_p), ("norm_eps", ctypes.c_float), ("bf16", ctypes.c_int),
                ("in_proj", _Matrix), ("x_proj", _Matrix), ("out_proj", _Matrix),
                ("dt_w16", ctypes.c_void_p), ("dt_bf16", ctypes.c_int),
                *((name, ctypes.c_void_p) for name in ("dt_bias", "conv_w", "conv_b", "A", "D"))]


MambaLayerStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def native_mamba_layer_step() -> Callable[..., MambaLayerStep] | None:
    """``bind(...)``, binding a pre-norm Mamba(-1) block's parameters to its whole decode step in one call, or
    None where the native kernels are not built.

    ``bind(norm_weight (H,), norm_eps, in_proj, x_proj, dt_weight (I, R), dt_bias (I,) or None, out_proj,
    conv_weight (I, w), conv_bias (I,) or None, A (I, n), D (I,) or None, bf16)`` with ``in_proj``, ``x_proj``,
    ``out_proj`` each ``(weight, scales or None, bias or None)``: a float32, bfloat16 or int8 weight (rows, cols)
    (int8 with per-row float32 scales); ``dt_weight`` float32 or bfloat16. Returns ``step(r, state, window) ->
    out``: ``out = r + out_proj(y)`` for the float32 residual stream ``r`` (b, H), contiguous, b at most
    :data:`ssmkit.ops.gemv.MAX_ROWS`, where ``(x, z) = in_proj(RMSNorm(r))``, ``x`` goes through the
    convolution's update and SiLU over ``window`` (b, I, w), ``dt, B, C = x_proj(x)``, and ``y`` is the
    selective step of :func:`native_selective_step` with ``dt_proj`` inside (``state`` (b, I, n) float32).
    ``window`` is float32 (``bf16`` False) or bfloat16 (``bf16`` True); window and state are contiguous and
    updated in place. With ``bf16`` the step rounds to bfloat16 where a bfloat16 block holds its tensors:
    the normed input and each projection's, the convolution's and the scan's outputs. Returns ``out`` (b, H)
    float32. Nothing is checked per call.
    """
    lib = native.library()
    if lib is None:
        return None
    fn = lib.ssmkit_mamba_layer_step
    if lib.ssmkit_mamba_layer_size() != ctypes.sizeof(_MambaLayer):
        raise RuntimeError("ssmkit: mamba_step.c's MambaLayer and its ctypes mirror differ")

    def bind(norm_weight: torch.Tensor, norm_eps: float, in_proj: tuple, x_proj: tuple, dt_weight: torch.Tensor,
             dt_bias: torch.Tensor | None, out_proj: tuple, conv_weight: torch.Tensor,
             conv_bias: torch.Tensor | None, A: torch.Tensor, D: torch.Tensor | None, bf16: bool) -> MambaLayerStep:
        def f32(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(torch.float32).contiguous()

        held: list[torch.Tensor | None] = []  # every buffer a pointer refers to

        def ptr(t: torch.Tensor | None) -> int | None:
            held.append(t)
            return None if t is None else t.data_ptr()

        def matrix(weight: torch.Tensor, scales: torch.Tensor | None, bias: torch.Tensor | None) -> _Matrix:
            w = weight.detach().contiguous()
            return _Matrix(ptr(w), ptr(f32(scales)), ptr(f32(bias)), _KINDS[w.dtype])

        dt_w = dt_weight.detach()
        dt_w16 = blocked_dt_weight(dt_w if dt_w.dtype == torch.bfloat16 else dt_w.to(torch.float32))
        H, (I, n), R = norm_weight.numel(), A.shape, dt_w.shape[1]
        layer = _MambaLayer(H, I, n, R, conv_weight.shape[-1], ptr(f32(norm_weight)), norm_eps,
                            int(bf16), matrix(*in_proj), matrix(*x_proj), matrix(*out_proj), ptr(dt_w16),
                            int(dt_w16.dtype == torch.bfloat16), ptr(f32(dt_bias)),
                            ptr(f32(conv_weight.reshape(I, -1))), ptr(f32(conv_bias)), ptr(f32(A)), ptr(f32(D)))
        address = ctypes.addressof(layer)
        per_row = H + 4 * I + R + 2 * n

        def step(r: torch.Tensor, state: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
            b = r.shape[0]
            out = torch.empty(b, H, dtype=torch.float32)
            scratch = torch.empty(b * per_row, dtype=torch.float32)  # per call: a step may run in several threads
            fn(address, r.data_ptr(), out.data_ptr(), state.data_ptr(), window.data_ptr(), scratch.data_ptr(), b,
               torch.get_num_threads())
            return out
        step.tensors = (layer, held)  # keep the structure and the buffers its pointers refer to alive
        return step
    return bind
