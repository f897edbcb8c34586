"""Triton kernels of Mamba-3's per-(position, head) scalars, forward and backward, one launch each way.

In PyTorch each of these is a chain of small elementwise passes over (b, l, h) tensors: about ten kernels
forward and as many autograd nodes backward for Δ and A, another ten for the SSD route's step and input weight.
At the shapes people train (b8, L 2K, 24 heads) each pass moves a few hundred KB and costs far more to launch
than to run, so these two pairs of kernels exist to cut launches, not bytes (``benchmarks/gpu_mamba3.py
--host-profile``).

* ``dt_decay``: Δ = softplus(dd_dt + dt_bias), A = -max(f(dd_A), A_floor), f heavy-tail or softplus
  (``step_sizes.decay_rate``). dd_dt and dd_A may be strided views (slices of the in-projection's output).
* ``step_weights``: from Δ, A and the trapezoid logits, the SSD route's decay step -ΔA, its input weight
  w_t = λ_t Δ_t + δ_{t+1} and the next share δ_{t+1} = (1 - λ_{t+1}) Δ_{t+1} (0 where t + 1 starts a document
  or does not exist), λ = sigmoid(trap). With ``RAW`` the kernels make Δ and A themselves from dd_dt, dd_A and
  dt_bias as ``dt_decay`` does (the layer's folded route, ``projected.py``: one launch and one autograd node
  fewer each way than ``dt_decay`` then ``step_weights``), and the forward also stores Δ for the angle kernel.

Float32 throughout (float64 inputs take the PyTorch forms); the same operations in the same order as
``step_sizes.py``, so the two agree to float32 rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ssmkit.ops._host import cdiv
from ssmkit.ops.selective_scan.triton_kernels import _softplus
from ssmkit.ops.ssd.reference import doc_starts

_BLOCK = 1024  # (position, head) elements per program


@triton.jit
def _softplus_grad(x):
    return tl.where(x > 20.0, 1.0, tl.sigmoid(x))


@triton.jit
def _decay_and_slope(x, HEAVY_TAIL: tl.constexpr):
    """The decay activation f(x) and f'(x): heavy-tail (1 + x for x >= 0, 1 / (1 - x) below) or softplus."""
    if HEAVY_TAIL:
        r = 1.0 / (1.0 - tl.minimum(x, 0.0))
        return tl.where(x >= 0, 1.0 + x, r), tl.where(x >= 0, 1.0, r * r)
    return _softplus(x), _softplus_grad(x)


@triton.jit
def _load_blh(ptr, offs, mask, H, L, s_b, s_l, s_h):
    """Elements ``offs`` (flat over a contiguous (b, l, h)) of a tensor stored with strides (s_b, s_l, s_h)."""
    hh = offs % H
    bl = offs // H
    return tl.load(ptr + (bl // L) * s_b + (bl % L) * s_l + hh * s_h, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _dt_decay_fwd(
    ddt_ptr, dda_ptr, bias_ptr, dt_ptr, a_ptr, n, H, L, s_tb, s_tl, s_th, s_ab, s_al, s_ah, A_floor,
    HEAVY_TAIL: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    raw = _load_blh(ddt_ptr, offs, mask, H, L, s_tb, s_tl, s_th) + tl.load(bias_ptr + offs % H, mask=mask, other=0.0)
    f, _ = _decay_and_slope(_load_blh(dda_ptr, offs, mask, H, L, s_ab, s_al, s_ah), HEAVY_TAIL)
    tl.store(dt_ptr + offs, _softplus(raw), mask=mask)
    tl.store(a_ptr + offs, tl.minimum(-f, -A_floor), mask=mask)


@triton.jit
def _dt_decay_bwd(
    ddt_ptr, dda_ptr, bias_ptr, gdt_ptr, ga_ptr, draw_ptr, dddt_ptr, ddda_ptr, n, H, L, s_tb, s_tl, s_th,
    s_ab, s_al, s_ah, A_floor, HEAVY_TAIL: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    raw = _load_blh(ddt_ptr, offs, mask, H, L, s_tb, s_tl, s_th) + tl.load(bias_ptr + offs % H, mask=mask, other=0.0)
    f, df = _decay_and_slope(_load_blh(dda_ptr, offs, mask, H, L, s_ab, s_al, s_ah), HEAVY_TAIL)
    g_dt = tl.load(gdt_ptr + offs, mask=mask, other=0.0)
    g_a = tl.load(ga_ptr + offs, mask=mask, other=0.0)
    # clamp(max=-A_floor) passes its gradient where -f <= -A_floor (torch's clamp: bounds included).
    d_raw = g_dt * _softplus_grad(raw)
    # float32 for dt_bias's sum, and each input's gradient in its own dtype (no casting launches after).
    tl.store(draw_ptr + offs, d_raw, mask=mask)
    tl.store(dddt_ptr + offs, d_raw.to(dddt_ptr.dtype.element_ty), mask=mask)
    tl.store(ddda_ptr + offs, tl.where(-f <= -A_floor, -g_a * df, 0.0).to(ddda_ptr.dtype.element_ty), mask=mask)


class _DtDecay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dd_dt, dd_A, dt_bias, A_floor, heavy_tail):
        b, l, h = dd_dt.shape
        dt = torch.empty(b, l, h, device=dd_dt.device, dtype=torch.float32)
        A = torch.empty_like(dt)
        bias = dt_bias.float().contiguous()
        n = dt.numel()
        _dt_decay_fwd[(cdiv(n, _BLOCK),)](
            dd_dt, dd_A, bias, dt, A, n, h, l, *dd_dt.stride(), *dd_A.stride(), float(A_floor),
            HEAVY_TAIL=heavy_tail, BLOCK=_BLOCK, num_warps=4,
        )
        ctx.save_for_backward(dd_dt, dd_A, bias)
        ctx.A_floor, ctx.heavy_tail, ctx.bias_dtype = float(A_floor), heavy_tail, dt_bias.dtype
        return dt, A

    @staticmethod
    @once_differentiable
    def backward(ctx, g_dt, g_A):
        dd_dt, dd_A, bias = ctx.saved_tensors
        b, l, h = dd_dt.shape
        n = b * l * h
        d_raw = torch.empty(b, l, h, device=dd_dt.device, dtype=torch.float32)
        d_ddt = torch.empty(b, l, h, device=dd_dt.device, dtype=dd_dt.dtype)
        d_dda = torch.empty(b, l, h, device=dd_dt.device, dtype=dd_A.dtype)
        _dt_decay_bwd[(cdiv(n, _BLOCK),)](
            dd_dt, dd_A, bias, g_dt.contiguous(), g_A.contiguous(), d_raw, d_ddt, d_dda, n, h, l,
            *dd_dt.stride(), *dd_A.stride(), ctx.A_floor, HEAVY_TAIL=ctx.heavy_tail, BLOCK=_BLOCK, num_warps=4,
        )
        return d_ddt, d_dda, d_raw.sum((0, 1), dtype=ctx.bias_dtype), None, None


def dt_decay_triton(
    dd_dt: torch.Tensor, dd_A: torch.Tensor, dt_bias: torch.Tensor, A_floor: float, heavy_tail: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ, A (b, l, h) float32 from dd_dt, dd_A (b, l, h, any strides and float dtype) and dt_bias (h,)."""
    return _DtDecay.apply(dd_dt, dd_A, dt_bias, A_floor, heavy_tail)


@triton.jit
def _delta_decay(ddt_ptr, dda_ptr, bias_ptr, offs, mask, H, L, s_tb, s_tl, s_th, s_ab, s_al, s_ah, A_floor,
                 RAW: tl.constexpr, HEAVY_TAIL: tl.constexpr):
    """Δ, A, and (RAW) softplus's argument and the decay activation f and f' at elements ``offs``: loaded
    (contiguous), or (RAW) computed from the projection's dd_dt, dd_A (strided) and dt_bias as ``_dt_decay_fwd``
    does."""
    if RAW:
        raw = _load_blh(ddt_ptr, offs, mask, H, L, s_tb, s_tl, s_th) + tl.load(bias_ptr + offs % H, mask=mask,
                                                                                other=0.0)
        f, df = _decay_and_slope(_load_blh(dda_ptr, offs, mask, H, L, s_ab, s_al, s_ah), HEAVY_TAIL)
        return _softplus(raw), tl.minimum(-f, -A_floor), raw, f, df
    # Δ and A contiguous float32 (the casts only type this path alike when RAW compiles it away).
    dt = tl.load(ddt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return dt, tl.load(dda_ptr + offs, mask=mask, other=0.0).to(tl.float32), dt, dt, dt


@triton.jit
def _step_weights_fwd(
    dt_ptr, a_ptr, bias_ptr, trap_ptr, starts_ptr, sdt_ptr, w_ptr, nxt_ptr, dt_out_ptr, n, H, L,
    s_tb, s_tl, s_th, s_ab, s_al, s_ah, s_b, s_l, s_h, A_floor,
    RAW: tl.constexpr, HEAVY_TAIL: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t = (offs // H) % L
    dt, a, _, _, _ = _delta_decay(dt_ptr, a_ptr, bias_ptr, offs, mask, H, L, s_tb, s_tl, s_th, s_ab, s_al, s_ah,
                                  A_floor, RAW, HEAVY_TAIL)
    lam = tl.sigmoid(_load_blh(trap_ptr, offs, mask, H, L, s_b, s_l, s_h))
    # The next position's share δ_{t+1} = (1 - λ_{t+1}) Δ_{t+1}, unless t + 1 starts a document or is past the end.
    keep = mask & (t + 1 < L)
    if HAS_DOC:
        keep = keep & (tl.load(starts_ptr + offs // H + 1, mask=keep, other=0) == 0)
    lam_n = tl.sigmoid(_load_blh(trap_ptr, offs + H, keep, H, L, s_b, s_l, s_h))
    if RAW:
        dt_n = _softplus(_load_blh(dt_ptr, offs + H, keep, H, L, s_tb, s_tl, s_th)
                         + tl.load(bias_ptr + offs % H, mask=keep, other=0.0))
    else:
        dt_n = tl.load(dt_ptr + offs + H, mask=keep, other=0.0).to(tl.float32)
    nxt = tl.where(keep, (1.0 - lam_n) * dt_n, 0.0)
    tl.store(sdt_ptr + offs, -(dt * a), mask=mask)
    tl.store(w_ptr + offs, lam * dt + nxt, mask=mask)
    tl.store(nxt_ptr + offs, nxt, mask=mask)
    if RAW:  # Δ for the angle kernel (float32, contiguous)
        tl.store(dt_out_ptr + offs, dt, mask=mask)


@triton.jit
def _step_weights_bwd(
    dt_ptr, a_ptr, bias_ptr, trap_ptr, starts_ptr, g_sdt_ptr, g_w_ptr, g_nxt_ptr, ddt_in_ptr, ddt_ptr, da_ptr,
    dtrap_ptr, draw_ptr, n, H, L, s_tb, s_tl, s_th, s_ab, s_al, s_ah, s_b, s_l, s_h, A_floor,
    RAW: tl.constexpr, HEAVY_TAIL: tl.constexpr, HAS_DOC: tl.constexpr, NCB: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t = (offs // H) % L
    dt, a, raw, f, df = _delta_decay(dt_ptr, a_ptr, bias_ptr, offs, mask, H, L, s_tb, s_tl, s_th, s_ab, s_al, s_ah,
                                     A_floor, RAW, HEAVY_TAIL)
    lam = tl.sigmoid(_load_blh(trap_ptr, offs, mask, H, L, s_b, s_l, s_h))
    g_sdt = tl.load(g_sdt_ptr + offs, mask=mask, other=0.0)
    g_gamma = tl.load(g_w_ptr + offs, mask=mask, other=0.0)
    # δ_t was position t - 1's next share (in its w and its nxt), unless t starts a document or t = 0.
    prev = mask & (t > 0)
    if HAS_DOC:
        prev = prev & (tl.load(starts_ptr + offs // H, mask=prev, other=0) == 0)
    g_delta = tl.where(prev, tl.load(g_w_ptr + offs - H, mask=prev, other=0.0)
                       + tl.load(g_nxt_ptr + offs - H, mask=prev, other=0.0), 0.0)
    ddt = -a * g_sdt + lam * g_gamma + (1.0 - lam) * g_delta
    # Δ's other use (the rotary angles, triton_route_scalars.py): its NCB partial gradients per element, added here.
    for c in tl.static_range(NCB):
        ddt += tl.load(ddt_in_ptr + offs * NCB + c, mask=mask, other=0.0)
    da = -dt * g_sdt
    if RAW:
        # Back through Δ = softplus(dd_dt + dt_bias) and A = clamp(-f(dd_A), max=-A_floor) (torch's clamp passes
        # the gradient at the bound): float32 for dt_bias's sum, each input's gradient in its own dtype.
        d_raw = ddt * _softplus_grad(raw)
        tl.store(draw_ptr + offs, d_raw, mask=mask)
        ddt = d_raw
        da = tl.where(-f <= -A_floor, -da * df, 0.0)
    tl.store(ddt_ptr + offs, ddt.to(ddt_ptr.dtype.element_ty), mask=mask)
    tl.store(da_ptr + offs, da.to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(dtrap_ptr + offs, dt * (g_gamma - g_delta) * lam * (1.0 - lam), mask=mask)


class RawScalars(NamedTuple):
    """Δ and A as the projection gives them (``dt_decay_triton``'s arguments), for the kernels to make:
    dd_dt, dd_A (b, l, h) any strides and float dtype; dt_bias (h,) float32 contiguous."""

    dd_dt: torch.Tensor
    dd_A: torch.Tensor
    dt_bias: torch.Tensor
    A_floor: float
    heavy_tail: bool


def _scalar_args(dt, A, raw: RawScalars | None) -> tuple:
    """The kernels' Δ and A sources: (Δ, A, bias pointer, their strides, A_floor, RAW, HEAVY_TAIL)."""
    if raw is None:  # the strides unused: Δ and A are contiguous
        return dt, A, dt, *dt.stride(), *A.stride(), 0.0, False, False
    return (raw.dd_dt, raw.dd_A, raw.dt_bias, *raw.dd_dt.stride(), *raw.dd_A.stride(), float(raw.A_floor), True,
            raw.heavy_tail)


def step_weights_fwd(dt: torch.Tensor | None, A: torch.Tensor | None, trap: torch.Tensor,
                     starts: torch.Tensor | None, raw: RawScalars | None = None):
    """Launch the forward: (sdt, w, nxt) (b, l, h) float32 from contiguous float32 dt, A and trap (any strides);
    with ``raw`` (dt and A None) Δ and A are made from it, and Δ (b, l, h) float32 is returned fourth."""
    b, l, h = trap.shape
    sdt = torch.empty(b, l, h, device=trap.device, dtype=torch.float32)
    w, nxt = torch.empty_like(sdt), torch.empty_like(sdt)
    dt_out = torch.empty_like(sdt) if raw is not None else None
    n = sdt.numel()
    dt_src, a_src, bias, *strides, A_floor, is_raw, heavy_tail = _scalar_args(dt, A, raw)
    _step_weights_fwd[(cdiv(n, _BLOCK),)](
        dt_src, a_src, bias, trap, sdt if starts is None else starts, sdt, w, nxt, sdt if dt_out is None else dt_out,
        n, h, l, *strides, *trap.stride(), A_floor, RAW=is_raw, HEAVY_TAIL=heavy_tail, HAS_DOC=starts is not None,
        BLOCK=_BLOCK, num_warps=4,
    )
    return (sdt, w, nxt) if raw is None else (sdt, w, nxt, dt_out)


def step_weights_bwd(dt, A, trap, starts, g_sdt, g_w, g_nxt, ddt_in: torch.Tensor | None = None,
                     raw: RawScalars | None = None):
    """Launch the backward: (ddt, dA, dtrap); ``ddt_in`` (b, l, h, k) float32 partials of Δ's gradient from its
    other uses, summed into ddt in the kernel. With ``raw``: (d dd_dt, d dd_A, dtrap, d dt_bias)."""
    b, l, h = trap.shape
    n = b * l * h
    f32 = {"device": trap.device, "dtype": torch.float32}
    if raw is None:
        ddt, dA, d_raw = torch.empty(b, l, h, **f32), torch.empty(b, l, h, **f32), None
    else:
        ddt = torch.empty(b, l, h, device=trap.device, dtype=raw.dd_dt.dtype)
        dA = torch.empty(b, l, h, device=trap.device, dtype=raw.dd_A.dtype)
        d_raw = torch.empty(b, l, h, **f32)
    dtrap = torch.empty(b, l, h, device=trap.device, dtype=trap.dtype)
    dt_src, a_src, bias, *strides, A_floor, is_raw, heavy_tail = _scalar_args(dt, A, raw)
    _step_weights_bwd[(cdiv(n, _BLOCK),)](
        dt_src, a_src, bias, trap, dtrap if starts is None else starts, g_sdt.contiguous(), g_w.contiguous(),
        g_nxt.contiguous(), dtrap if ddt_in is None else ddt_in, ddt, dA, dtrap, ddt if d_raw is None else d_raw,
        n, h, l, *strides, *trap.stride(), A_floor, RAW=is_raw, HEAVY_TAIL=heavy_tail, HAS_DOC=starts is not None,
        NCB=0 if ddt_in is None else ddt_in.shape[-1], BLOCK=_BLOCK, num_warps=4,
    )
    if raw is None:
        return ddt, dA, dtrap
    return ddt, dA, dtrap, d_raw.sum((0, 1))  # float32 (the caller casts to dt_bias's dtype)


class _StepWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dt, A, trap, starts):
        ctx.save_for_backward(dt, A, trap, starts)
        return step_weights_fwd(dt, A, trap, starts)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_sdt, g_w, g_nxt):
        return *step_weights_bwd(*ctx.saved_tensors, g_sdt, g_w, g_nxt), None


def step_weights_triton(
    dt: torch.Tensor, A: torch.Tensor, trap: torch.Tensor, seq_idx: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(-ΔA, w, δ_next), each (b, l, h) float32, from Δ, A (b, l, h) and trap (b, l, h, any strides)."""
    starts = None if seq_idx is None else doc_starts(seq_idx).to(torch.int32).contiguous()
    return _StepWeights.apply(dt.float().contiguous(), A.float().contiguous(), trap, starts)
