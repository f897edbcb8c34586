"""Triton kernels of the SSD route's output: the diagonal correction, the skip and the gate in one pass each way.

After the SSD op, single-input Mamba-3 (no MIMO projections) needs, per position t and head::

    out_t = (y_t - k_t x_t + D x_t) · silu(z_t)        k_t = δ_{t+1} C̃_t·B̃_t  (the trapezoid's diagonal)

In PyTorch that is about ten passes over (b, l, h, p) tensors, with float32 copies of the bf16 ones; here it
is one read of y, x, z and one write of out (and one pass back). Layouts (contiguous): y, x, z, out
(b·l, h, p); k (b·l, h) float32; D (h,) float32. Arithmetic is float32; out is stored in x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ROWS = 16  # positions per program


@triton.jit
def _silu_parts(z):
    sig = 1.0 / (1.0 + tl.exp(-z))
    return z * sig, sig * (1.0 + z * (1.0 - sig))  # silu(z) and its derivative


@triton.jit(do_not_specialize=["R"])
def _output_fwd(
    y_ptr, x_ptr, z_ptr, k_ptr, D_ptr, out_ptr, R, H,
    P: tl.constexpr, BP: tl.constexpr, ROWS: tl.constexpr, HAS_Z: tl.constexpr, HAS_D: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1).to(tl.int64)
    rows = blk * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BP)
    mask = (rows < R)[:, None] & (cols < P)[None, :]
    offs = (rows[:, None] * H + hh) * P + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = -tl.load(k_ptr + rows * H + hh, mask=rows < R, other=0.0)[:, None]
    if HAS_D:
        w += tl.load(D_ptr + hh)
    v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32) + w * x
    if HAS_Z:
        silu, _ = _silu_parts(tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        v = v * silu
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["R"])
def _output_bwd(
    y_ptr, x_ptr, z_ptr, k_ptr, D_ptr, dout_ptr, dy_ptr, dx_ptr, dz_ptr, dk_ptr, dD_ptr, R, H,
    P: tl.constexpr, BP: tl.constexpr, ROWS: tl.constexpr, HAS_Z: tl.constexpr, HAS_D: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1).to(tl.int64)
    rows = blk * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BP)
    mask = (rows < R)[:, None] & (cols < P)[None, :]
    offs = (rows[:, None] * H + hh) * P + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = -tl.load(k_ptr + rows * H + hh, mask=rows < R, other=0.0)[:, None]
    if HAS_D:
        w += tl.load(D_ptr + hh)
    g = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        silu, dsilu = _silu_parts(z)
        v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32) + w * x
        tl.store(dz_ptr + offs, (g * v * dsilu).to(dz_ptr.dtype.element_ty), mask=mask)
        g = g * silu
    tl.store(dy_ptr + offs, g.to(dy_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + offs, (g * w).to(dx_ptr.dtype.element_ty), mask=mask)
    gx = g * x
    tl.store(dk_ptr + rows * H + hh, -tl.sum(gx, 1), mask=rows < R)
    if HAS_D:
        tl.store(dD_ptr + blk * H + hh, tl.sum(tl.sum(gx, 1), 0))


class _Output(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x, z, k, D):
        R, h, p = x.shape
        out = torch.empty_like(x)
        dummy = k
        grid = (triton.cdiv(R, _ROWS), h)
        _output_fwd[grid](y, x, dummy if z is None else z, k, dummy if D is None else D, out, R, h, P=p,
                          BP=triton.next_power_of_2(p), ROWS=_ROWS, HAS_Z=z is not None, HAS_D=D is not None,
                          num_warps=4)
        ctx.save_for_backward(y, x, z, k, D)
        return out

    @staticmethod
    def backward(ctx, dout):
        y, x, z, k, D = ctx.saved_tensors
        R, h, p = x.shape
        nblk = triton.cdiv(R, _ROWS)
        dy, dx = torch.empty_like(y), torch.empty_like(x)
        dz = None if z is None else torch.empty_like(z)
        dk = torch.empty_like(k)
        dD = None if D is None else torch.empty(nblk, h, device=x.device, dtype=torch.float32)
        dummy = k
        _output_bwd[(nblk, h)](
            y, x, dummy if z is None else z, k, dummy if D is None else D, dout.contiguous(), dy, dx,
            dummy if dz is None else dz, dk, dummy if dD is None else dD, R, h, P=p, BP=triton.next_power_of_2(p),
            ROWS=_ROWS, HAS_Z=z is not None, HAS_D=D is not None, num_warps=4,
        )
        return dy, dx, dz, dk, None if dD is None else dD.sum(0).to(D.dtype)


def output_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor | None,
    k: torch.Tensor,
    D: torch.Tensor | None,
) -> torch.Tensor:
    """(y - k x + D x) · silu(z) in x's dtype, with gradients of y, x, z, k and D.

    y, x, z: (b, l, h, p) (z may be None); k: (b, l, h) float32; D: (h,) or None.
    """
    b, l, h, p = x.shape
    out = _Output.apply(
        y.reshape(b * l, h, p).contiguous(), x.reshape(b * l, h, p).contiguous(),
        None if z is None else z.reshape(b * l, h, p).contiguous(), k.float().reshape(b * l, h).contiguous(),
        None if D is None else D.float().contiguous(),
    )
    return out.view(b, l, h, p)
