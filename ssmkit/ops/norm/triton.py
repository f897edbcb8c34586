"""Triton RMS norms: one fused kernel for the plain (residual-add, pre-norm) and the gated group norm.

Layering: kernels -> launchers -> ``_RMSNormTriton`` (autograd) -> ``rms_norm_triton`` /
``gated_rms_norm_triton`` with the chunked backend's signatures. Rows are (..., n) flattened to (M, n)
with a unit stride along n; each forward program normalises one group of one row in registers (one
read of each input, one write of out, and of the residual stream h when asked), with float32 (or
float64) statistics. It saves the per-group 1/rms; the backward recomputes the normalised values from
the inputs, and each program walks a range of rows, accumulating its partial dweight / dbias in
registers, which one ``sum`` over programs reduces.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ssmkit.ops._host import cdiv, next_power_of_2
from ssmkit.ops._precision import compute_dtype
from ssmkit.ops.norm.inputs import GatedNormInputs, NormInputs
from ssmkit.ops.norm.reference import residual_dtype

# One group is held in registers; beyond this the kernel would spill (mamba_ssm's limit too).
MAX_GROUP_BYTES = 65536


@triton.jit
def _norm_fwd_kernel(x_ptr, res_ptr, z_ptr, w_ptr, b_ptr, out_ptr, h_ptr, rstd_ptr,
                     n_groups, group_size, eps,
                     stride_x, stride_res, stride_z, stride_out, stride_h,
                     HAS_RES: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                     HAS_BIAS: tl.constexpr, STORE_H: tl.constexpr, CENTER: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    row, group = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = group * group_size + tl.arange(0, BLOCK_N)
    mask = tl.arange(0, BLOCK_N) < group_size
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(ACC)
    if HAS_RES:
        h += tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(ACC)
    if STORE_H:
        tl.store(h_ptr + row * stride_h + cols, h.to(h_ptr.dtype.element_ty), mask=mask)
    if HAS_Z:
        z = tl.load(z_ptr + row * stride_z + cols, mask=mask, other=0.0).to(ACC)
        silu_z = z / (1.0 + tl.exp(-z))
        if not NORM_BEFORE_GATE:
            h = h * silu_z
    if CENTER:
        # LayerNorm: the group's mean subtracted (masked lanes stay 0 so they add nothing below).
        h = tl.where(mask, h - tl.sum(h, axis=0) / group_size, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / group_size + eps)
    tl.store(rstd_ptr + row * n_groups + group, rstd)
    y = h * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(ACC)
    if HAS_Z and NORM_BEFORE_GATE:
        y = y * silu_z
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(x_ptr, res_ptr, z_ptr, w_ptr, b_ptr, rstd_ptr, dy_ptr, dh_ptr, dx_ptr, dres_ptr, dz_ptr,
                     dw_ptr, db_ptr, n_rows, n_cols, n_groups, group_size, rows_per_prog,
                     stride_x, stride_res, stride_z, stride_dy, stride_dh, stride_dx, stride_dres, stride_dz,
                     HAS_RES: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_DH: tl.constexpr, STORE_DRES: tl.constexpr,
                     CENTER: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    pid, group = tl.program_id(0), tl.program_id(1)
    cols = group * group_size + tl.arange(0, BLOCK_N)
    mask = tl.arange(0, BLOCK_N) < group_size
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    db = tl.zeros([BLOCK_N], dtype=ACC)
    row_start = pid.to(tl.int64) * rows_per_prog  # int64 rows: row * stride can pass 2**31
    for row in range(row_start, tl.minimum(row_start + rows_per_prog, n_rows)):
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(ACC)
        if HAS_RES:
            x += tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(ACC)
        h = x
        if HAS_Z:
            z = tl.load(z_ptr + row * stride_z + cols, mask=mask, other=0.0).to(ACC)
            sig = 1.0 / (1.0 + tl.exp(-z))
            silu_z = z * sig
            silu_grad = sig * (1.0 + z * (1.0 - sig))
            if not NORM_BEFORE_GATE:
                h = x * silu_z
        if CENTER:
            h = tl.where(mask, h - tl.sum(h, axis=0) / group_size, 0.0)
        rstd = tl.load(rstd_ptr + row * n_groups + group)
        xhat = h * rstd
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(ACC)
        if HAS_Z and NORM_BEFORE_GATE:
            y = xhat * w
            if HAS_BIAS:
                y += b
            tl.store(dz_ptr + row * stride_dz + cols, (dy * y * silu_grad).to(dz_ptr.dtype.element_ty), mask=mask)
            dy = dy * silu_z
        dw += dy * xhat
        db += dy
        wdy = dy * w
        # d/dh of h * rstd: remove the component along xhat, then scale.
        c = tl.sum(xhat * wdy, axis=0) / group_size
        if CENTER:
            # LayerNorm: the mean's gradient removes the constant component of wdy too.
            wdy = tl.where(mask, wdy - tl.sum(wdy, axis=0) / group_size, 0.0)
        dh = (wdy - xhat * c) * rstd
        if HAS_Z and not NORM_BEFORE_GATE:
            tl.store(dz_ptr + row * stride_dz + cols, (dh * x * silu_grad).to(dz_ptr.dtype.element_ty), mask=mask)
            dh = dh * silu_z
        if HAS_DH:
            dh += tl.load(dh_ptr + row * stride_dh + cols, mask=mask, other=0.0).to(ACC)
        tl.store(dx_ptr + row * stride_dx + cols, dh.to(dx_ptr.dtype.element_ty), mask=mask)
        if STORE_DRES:
            tl.store(dres_ptr + row * stride_dres + cols, dh.to(dres_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid * n_cols + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(db_ptr + pid * n_cols + cols, db, mask=mask)


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """(..., n) -> (M, n) with unit stride along n (a view when possible)."""
    if t is None:
        return None
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_params(group_size: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for one group held in registers."""
    block_n = next_power_of_2(group_size)
    if block_n * dtype.itemsize > MAX_GROUP_BYTES:
        raise ValueError(
            f"backend='triton' normalises groups of at most {MAX_GROUP_BYTES // dtype.itemsize} entries "
            f"in {dtype}, got {group_size}; use backend='chunked'"
        )
    return block_n, min(max(block_n // 256, 1), 16)


def _on_device(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device), or nothing for the CPU interpreter."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


class _RMSNormTriton(torch.autograd.Function):
    """out = norm(x [+ res] [* silu(z)]) * weight + bias [* silu(z)], group-wise; optionally h = x + res too."""

    @staticmethod
    def forward(ctx, x, res, z, weight, bias, eps, group_size, norm_before_gate, h_dtype, center=False):
        shape = x.shape
        n = shape[-1]
        x2, res2, z2 = _rows(x), _rows(res), _rows(z)
        m, n_groups = x2.shape[0], n // group_size
        cdtype = compute_dtype(x, res, z, weight, bias)
        block_n, num_warps = _launch_params(group_size, cdtype)
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        h = torch.empty(m, n, dtype=h_dtype, device=x.device) if h_dtype is not None else None
        rstd = torch.empty(m, n_groups, dtype=cdtype, device=x.device)
        with _on_device(x2):
            _norm_fwd_kernel[(m, n_groups)](
                x2, res2 if res2 is not None else x2, z2 if z2 is not None else x2, weight,
                bias if bias is not None else weight, out, h if h is not None else out, rstd,
                n_groups, group_size, eps, x2.stride(0), res2.stride(0) if res2 is not None else 0,
                z2.stride(0) if z2 is not None else 0, out.stride(0), h.stride(0) if h is not None else 0,
                HAS_RES=res is not None, HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate,
                HAS_BIAS=bias is not None, STORE_H=h is not None, CENTER=center, ACC=_acc(cdtype),
                BLOCK_N=block_n, num_warps=num_warps,
            )
        ctx.save_for_backward(x2, res2, z2, weight, bias, rstd)
        ctx.set_materialize_grads(False)  # an unused output (out or h) costs no zero-filled gradient
        ctx.shape, ctx.group_size, ctx.norm_before_gate, ctx.center = shape, group_size, norm_before_gate, center
        ctx.x_dtype, ctx.res_dtype = x.dtype, res.dtype if res is not None else None
        out = out.reshape(shape)
        if h is None:
            return out
        return out, h.reshape(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dh_out=None):
        x2, res2, z2, weight, bias, rstd = ctx.saved_tensors
        m, n = x2.shape
        group_size = ctx.group_size
        n_groups = n // group_size
        cdtype = rstd.dtype
        block_n, num_warps = _launch_params(group_size, cdtype)
        dy = _rows(dout) if dout is not None else torch.zeros(m, n, dtype=ctx.x_dtype, device=x2.device)
        dh = _rows(dh_out)
        # Enough programs for about two full GPUs' worth of warps; each keeps one partial dweight row.
        sms = torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 1
        n_prog = min(m, cdiv(2 * 64 * sms // num_warps, n_groups))
        rows_per_prog = cdiv(m, n_prog)
        n_prog = cdiv(m, rows_per_prog)
        dx = torch.empty(m, n, dtype=ctx.x_dtype, device=x2.device)
        store_dres = res2 is not None and ctx.needs_input_grad[1]
        dres = torch.empty(m, n, dtype=ctx.res_dtype, device=x2.device) if store_dres else None
        dz = torch.empty_like(z2) if z2 is not None else None
        dw = torch.empty(n_prog, n, dtype=cdtype, device=x2.device)
        db = torch.empty(n_prog, n, dtype=cdtype, device=x2.device) if bias is not None else None
        with _on_device(x2):
            _norm_bwd_kernel[(n_prog, n_groups)](
                x2, res2 if res2 is not None else x2, z2 if z2 is not None else x2, weight,
                bias if bias is not None else weight, rstd, dy, dh if dh is not None else dy, dx,
                dres if dres is not None else dx, dz if dz is not None else dx, dw, db if db is not None else dw,
                m, n, n_groups, group_size, rows_per_prog,
                x2.stride(0), res2.stride(0) if res2 is not None else 0, z2.stride(0) if z2 is not None else 0,
                dy.stride(0), dh.stride(0) if dh is not None else 0, dx.stride(0),
                dres.stride(0) if dres is not None else 0, dz.stride(0) if dz is not None else 0,
                HAS_RES=res2 is not None, HAS_Z=z2 is not None, NORM_BEFORE_GATE=ctx.norm_before_gate,
                HAS_BIAS=bias is not None, HAS_DH=dh is not None, STORE_DRES=store_dres, CENTER=ctx.center,
                ACC=_acc(cdtype), BLOCK_N=block_n, num_warps=num_warps,
            )
        shape = ctx.shape
        dweight = dw.sum(dim=0).to(weight.dtype)
        dbias = db.sum(dim=0).to(bias.dtype) if db is not None else None
        return (
            dx.reshape(shape),
            dres.reshape(shape) if dres is not None else None,
            dz.reshape(shape) if dz is not None else None,
            dweight,
            dbias,
            None,
            None,
            None,
            None,
            None,
        )


def rms_norm_triton(inputs: NormInputs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton path of :func:`ssmkit.ops.norm.rms_norm_fn` (same arguments and results)."""
    x, weight, bias, residual, prenorm, residual_in_fp32, eps = inputs.unpack()
    h_dtype = residual_dtype(x, residual, residual_in_fp32) if prenorm else None
    return _RMSNormTriton.apply(x, residual, None, weight, bias, eps, x.shape[-1], True, h_dtype)


def gated_rms_norm_triton(inputs: GatedNormInputs) -> torch.Tensor:
    """Triton path of :func:`ssmkit.ops.norm.gated_rms_norm_fn` (same arguments and results)."""
    x, z, weight, eps, group_size, norm_before_gate, bias, center = inputs.unpack()
    return _RMSNormTriton.apply(x, None, z, weight, bias, eps, group_size or x.shape[-1], norm_before_gate, None,
                                center)
