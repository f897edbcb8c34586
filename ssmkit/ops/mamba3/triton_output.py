"""Triton kernels of the SSD route's output: the diagonal correction, the skip and the gate in one pass each way.

After the SSD op, single-input Mamba-3 (no MIMO projections) needs, per position t and head::

    out_t = (y_t - k_t x_t + D x_t) · silu(z_t)        k_t = δ_{t+1} C̃_t·B̃_t  (the trapezoid's diagonal)

In PyTorch that is about ten passes over (b, l, h, p) tensors, with float32 copies of the bf16 ones; here it
is one read of y, x, z and one write of out (and one pass back). k's two factors come apart (δ_{t+1} and
C̃_t·B̃_t) and are multiplied here, and z is read where it lies (a slice of the in-projection's output), so
that neither costs a launch of its own either way. Layouts: y, x, out (b·l, h, p) contiguous; z (b·l, h, p)
with any row stride; nxt, cb (b·l, h) float32; D (h,) float32. Arithmetic is float32; out is stored in x's
dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ssmkit.ops._host import cdiv, next_power_of_2

_ROWS = 16  # positions per program


@triton.jit
def _silu_parts(z):
    sig = 1.0 / (1.0 + tl.exp(-z))
    return z * sig, sig * (1.0 + z * (1.0 - sig))  # silu(z) and its derivative


@triton.jit(do_not_specialize=["R"])
def _output_fwd(
    y_ptr, x_ptr, z_ptr, nxt_ptr, cb_ptr, D_ptr, out_ptr, R, H, s_z,
    P: tl.constexpr, BP: tl.constexpr, ROWS: tl.constexpr, HAS_Z: tl.constexpr, HAS_D: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1).to(tl.int64)
    rows = blk * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BP)
    mask = (rows < R)[:, None] & (cols < P)[None, :]
    offs = (rows[:, None] * H + hh) * P + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rmask = rows < R
    w = -(tl.load(nxt_ptr + rows * H + hh, mask=rmask, other=0.0) * tl.load(cb_ptr + rows * H + hh, mask=rmask,
                                                                            other=0.0))[:, None]
    if HAS_D:
        w += tl.load(D_ptr + hh)
    v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32) + w * x
    if HAS_Z:
        z_offs = rows[:, None] * s_z + hh * P + cols[None, :]
        silu, _ = _silu_parts(tl.load(z_ptr + z_offs, mask=mask, other=0.0).to(tl.float32))
        v = v * silu
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["R"])
def _output_bwd(
    y_ptr, x_ptr, z_ptr, nxt_ptr, cb_ptr, D_ptr, dout_ptr, dy_ptr, dx_ptr, dz_ptr, dnxt_ptr, dcb_ptr, dD_ptr, R, H,
    s_z, P: tl.constexpr, BP: tl.constexpr, ROWS: tl.constexpr, HAS_Z: tl.constexpr, HAS_D: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1).to(tl.int64)
    rows = blk * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BP)
    mask = (rows < R)[:, None] & (cols < P)[None, :]
    offs = (rows[:, None] * H + hh) * P + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rmask = rows < R
    nxt = tl.load(nxt_ptr + rows * H + hh, mask=rmask, other=0.0)
    cb = tl.load(cb_ptr + rows * H + hh, mask=rmask, other=0.0)
    w = -(nxt * cb)[:, None]
    if HAS_D:
        w += tl.load(D_ptr + hh)
    g = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + rows[:, None] * s_z + hh * P + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        silu, dsilu = _silu_parts(z)
        v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32) + w * x
        tl.store(dz_ptr + offs, (g * v * dsilu).to(dz_ptr.dtype.element_ty), mask=mask)
        g = g * silu
    tl.store(dy_ptr + offs, g.to(dy_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + offs, (g * w).to(dx_ptr.dtype.element_ty), mask=mask)
    gx = g * x
    dk = -tl.sum(gx, 1)
    tl.store(dnxt_ptr + rows * H + hh, dk * cb, mask=rmask)
    tl.store(dcb_ptr + rows * H + hh, dk * nxt, mask=rmask)
    if HAS_D:
        tl.store(dD_ptr + blk * H + hh, tl.sum(tl.sum(gx, 1), 0))


class _Output(torch.autograd.Function):
    """y, x (b, l, h, p) contiguous; z (b, l, h, p) with each position's h·p entries contiguous, any row stride,
    or None; nxt, cb (b, l, h) float32 contiguous; D (h,) float32 or None. Rows (b·l) are flattened in here, not
    around the node (a reshape outside would be an autograd node more each backward)."""

    @staticmethod
    def forward(ctx, y, x, z, nxt, cb, D):
        b, l, h, p = x.shape
        R = b * l
        z2 = None if z is None else z.reshape(R, h, p)
        out = torch.empty_like(x)
        dummy = nxt
        grid = (cdiv(R, _ROWS), h)
        _output_fwd[grid](y, x, dummy if z2 is None else z2, nxt, cb, dummy if D is None else D, out, R, h,
                          0 if z2 is None else z2.stride(0), P=p, BP=next_power_of_2(p), ROWS=_ROWS,
                          HAS_Z=z is not None, HAS_D=D is not None, num_warps=4)
        ctx.save_for_backward(y, x, z, nxt, cb, D)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        y, x, z, nxt, cb, D = ctx.saved_tensors
        b, l, h, p = x.shape
        R = b * l
        z2 = None if z is None else z.reshape(R, h, p)
        nblk = cdiv(R, _ROWS)
        dy, dx = torch.empty_like(y), torch.empty_like(x)
        dz = None if z is None else torch.empty(b, l, h, p, device=z.device, dtype=z.dtype)
        dnxt, dcb = torch.empty_like(nxt), torch.empty_like(cb)
        dD = None if D is None else torch.empty(nblk, h, device=x.device, dtype=torch.float32)
        dummy = nxt
        _output_bwd[(nblk, h)](
            y, x, dummy if z2 is None else z2, nxt, cb, dummy if D is None else D, dout.contiguous(), dy, dx,
            dummy if dz is None else dz, dnxt, dcb, dummy if dD is None else dD, R, h,
            0 if z2 is None else z2.stride(0), P=p, BP=next_power_of_2(p), ROWS=_ROWS,
            HAS_Z=z is not None, HAS_D=D is not None, num_warps=4,
        )
        return dy, dx, dz, dnxt, dcb, None if dD is None else dD.sum(0).to(D.dtype)


def output_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor | None,
    nxt: torch.Tensor,
    cb: torch.Tensor,
    D: torch.Tensor | None,
) -> torch.Tensor:
    """(y - k x + D x) · silu(z) in x's dtype, k = nxt · cb, with gradients of y, x, z, nxt, cb and D.

    y, x, z: (b, l, h, p) (z may be None, and may be strided as long as each head's p entries are contiguous
    and follow each other); nxt, cb: (b, l, h) float32; D: (h,) or None.
    """
    l, p = x.shape[1], x.shape[3]
    if z is not None and not (z.stride(3) == 1 and z.stride(2) == p and z.stride(0) == l * z.stride(1)):
        z = z.contiguous()  # the kernels take rows of h·p contiguous entries at one stride
    return _Output.apply(
        y.contiguous(), x.contiguous(), z, nxt.float().contiguous(), cb.float().contiguous(),
        None if D is None else D.float().contiguous(),
    )
