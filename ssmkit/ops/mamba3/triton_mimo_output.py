"""Triton kernels of the MIMO route's output: the r×r correction, skip, gate and down-projection in one pass each way.

After the SSD op has run the r sub-steps of each position (``via_ssd.py``), MIMO needs per position t, head and
rank j (x̃_{t,j} = x_t ⊙ mimo_x_j rounded to the operand dtype, as the SSD op got it)::

    v_{t,j} = y_{t,j} + Σ_{j'} ([j' > j] w_t - δ_{t+1}) S_{t,j,j'} x̃_{t,j'} + D x̃_{t,j}
    out_t = Σ_j mimo_o_j ⊙ v_{t,j} · silu(z_t ⊙ mimo_z_j)            (per rank, without mimo_o)

with S_{t,j,j'} = C̃_{t,j}·B̃_{t,j'} of the rounded operands (``triton_mimo_rotary.py``), so the correction cancels
the SSD kernels' own terms exactly. In PyTorch that is two float32 einsums over (b, l, h, r, r) and (b, l, r, h, p),
the rank-expanded x̃ and z, casts and the reduction over the ranks, each a pass with its own backward; here it is
one read of y, x, z and one write of out, and one pass back. x̃ is remade from x and mimo_x in registers (the same
float32 product and rounding as the SSD op's operand), so x, not the r-fold x̃, is read, and x's and mimo_x's
gradients come out directly.

Layouts: y (b·l, r, h, p) contiguous (the SSD op's output of the l·r sub-steps); x and z (b·l, h, p) with any row
stride; S (b·l, h, r, r), w, nxt (b·l, h) float32; D (h,), mimo_* (h, r, p) float32.
out (b·l, h, p), or (b·l, r, h, p) without mimo_o, in x's dtype.

Forward: a program takes POS positions of one head. Backward: a program walks a run of positions of one head in
blocks of POS, so the gradients of D and the MIMO projections are summed in registers over the run: one partial
per program, a few hundred per head, summed by the caller.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ssmkit.ops._host import cdiv, next_power_of_2
from ssmkit.ops.mamba3.triton_output import _silu_parts
from ssmkit.ops.mamba3.triton_rotary import _TL

# Positions per tile (a tile is positions x padded ranks x p) and warps. Registers on sm_90 as the JIT specializes a
# rank-4 layer's call (b8 L2K, 24 heads x 64, benchmarks/layer_registers.py --layers mamba3-mimo, Triton 3.9): the
# backward 121 at 1 position, 168 at 2, 233-255 at 4 (the (positions, r, r, p) products of the correction), so it
# walks one position a step, with more programs to keep loads in flight; the forward 56 at 2 positions.
_FWD_POS = 2
_WARPS = 4
_BWD_POS = 1
_BWD_WARPS = 4
_BWD_PROGRAMS = 32 * 132  # backward: runs of positions per head until about this many programs run


@triton.jit
def _tile_inputs(x_ptr, s_x, mx_ptr, start, R, hh, RANK: tl.constexpr, RP: tl.constexpr, P: tl.constexpr,
                 BP: tl.constexpr, POS: tl.constexpr, HAS_MX: tl.constexpr, OPS: tl.constexpr):
    """For positions start … start + POS - 1 of head hh: x (positions, p), mimo_x (ranks, p) (ones without it) and x̃
    (positions, ranks, p) rounded to the operands' dtype, float32; x's rows at stride s_x. ``start`` is an int64
    scalar: the offsets inside the block stay int32."""
    lp, rk, cols = tl.arange(0, POS), tl.arange(0, RP), tl.arange(0, BP)
    pm, km, cm = start + lp < R, rk < RANK, cols < P
    x = tl.load(x_ptr + start * s_x + hh * P + lp[:, None] * s_x + cols[None, :], mask=pm[:, None] & cm[None, :],
                other=0.0).to(tl.float32)
    if HAS_MX:
        mx = tl.load(mx_ptr + (hh * RANK + rk[:, None]) * P + cols[None, :], mask=km[:, None] & cm[None, :], other=0.0)
    else:
        mx = tl.where(km[:, None] & cm[None, :], 1.0, 0.0)
    return x, mx, (x[:, None, :] * mx[None, :, :]).to(OPS).to(tl.float32)


@triton.jit
def _rank_offsets(start, hh, H, RANK: tl.constexpr, RP: tl.constexpr, P: tl.constexpr, BP: tl.constexpr,
                  POS: tl.constexpr):
    """Offset of the block's first entry in a (b·l, r, h, p) tensor, and the (positions, ranks, p) offsets from it."""
    lp, rk, cols = tl.arange(0, POS), tl.arange(0, RP), tl.arange(0, BP)
    local = (lp[:, None, None] * RANK + rk[None, :, None]) * (H * P) + cols[None, None, :]
    return (start * RANK * H + hh) * P, local


@triton.jit
def _pre_gate(y_ptr, x_ptr, s_x, mx_ptr, S_ptr, w_ptr, nxt_ptr, D_ptr, start, R, hh, H, RANK: tl.constexpr,
              RP: tl.constexpr, P: tl.constexpr, BP: tl.constexpr, POS: tl.constexpr, HAS_MX: tl.constexpr,
              HAS_D: tl.constexpr, OPS: tl.constexpr):
    """v (positions, ranks, p) before the gate, with x (positions, p), mimo_x (ranks, p), x̃, S and the coefficients
    ([j' > j] w - δ_next) of the r×r correction (positions, ranks, ranks)."""
    lp, rk, cols = tl.arange(0, POS), tl.arange(0, RP), tl.arange(0, BP)
    pm, km, cm = start + lp < R, rk < RANK, cols < P
    m2 = pm[:, None] & km[None, :]
    x, mx, xt = _tile_inputs(x_ptr, s_x, mx_ptr, start, R, hh, RANK, RP, P, BP, POS, HAS_MX, OPS)
    w = tl.load(w_ptr + start * H + hh + lp * H, mask=pm, other=0.0)
    nxt = tl.load(nxt_ptr + start * H + hh + lp * H, mask=pm, other=0.0)
    s_off = (lp[:, None, None] * (H * RANK) + rk[None, :, None]) * RANK + rk[None, None, :]
    S = tl.load(S_ptr + (start * H + hh) * RANK * RANK + s_off, mask=m2[:, :, None] & km[None, None, :], other=0.0)
    coef = tl.where(rk[None, None, :] > rk[None, :, None], w[:, None, None], 0.0) - nxt[:, None, None]
    base, local = _rank_offsets(start, hh, H, RANK, RP, P, BP, POS)
    v = tl.load(y_ptr + base + local, mask=m2[:, :, None] & cm[None, None, :], other=0.0).to(tl.float32)
    v += tl.sum((coef * S)[:, :, :, None] * xt[:, None, :, :], 2)
    if HAS_D:
        v += tl.load(D_ptr + hh) * xt
    return v, x, mx, xt, S, coef


@triton.jit
def _gate_input(z_ptr, mz_ptr, start, R, hh, s_z, RANK: tl.constexpr, RP: tl.constexpr, P: tl.constexpr,
                BP: tl.constexpr, POS: tl.constexpr, HAS_MZ: tl.constexpr):
    """z (positions, p), mimo_z (ranks, p) and z ⊙ mimo_z (positions, ranks, p), float32."""
    lp, rk, cols = tl.arange(0, POS), tl.arange(0, RP), tl.arange(0, BP)
    pm, km, cm = start + lp < R, rk < RANK, cols < P
    z = tl.load(z_ptr + start * s_z + hh * P + lp[:, None] * s_z + cols[None, :], mask=pm[:, None] & cm[None, :],
                other=0.0).to(tl.float32)
    if HAS_MZ:
        mz = tl.load(mz_ptr + (hh * RANK + rk[:, None]) * P + cols[None, :], mask=km[:, None] & cm[None, :], other=0.0)
    else:
        mz = tl.where(km[:, None] & cm[None, :], 1.0, 0.0)
    return z, mz, z[:, None, :] * mz[None, :, :]


@triton.jit(do_not_specialize=["R"])
def _mimo_output_fwd(
    y_ptr, x_ptr, mx_ptr, S_ptr, w_ptr, nxt_ptr, D_ptr, z_ptr, mz_ptr, mo_ptr, out_ptr, R, H, s_x, s_z,
    RANK: tl.constexpr, RP: tl.constexpr, P: tl.constexpr, BP: tl.constexpr, POS: tl.constexpr,
    HAS_MX: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_MZ: tl.constexpr, HAS_MO: tl.constexpr,
    OPS: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * POS
    hh = tl.program_id(1)
    lp, rk, cols = tl.arange(0, POS), tl.arange(0, RP), tl.arange(0, BP)
    pm, km, cm = start + lp < R, rk < RANK, cols < P
    v, _, _, _, _, _ = _pre_gate(y_ptr, x_ptr, s_x, mx_ptr, S_ptr, w_ptr, nxt_ptr, D_ptr, start, R, hh, H, RANK, RP, P, BP,
                                 POS, HAS_MX, HAS_D, OPS)
    if HAS_Z:
        _, _, zr = _gate_input(z_ptr, mz_ptr, start, R, hh, s_z, RANK, RP, P, BP, POS, HAS_MZ)
        silu, _ = _silu_parts(zr)
        v = v * silu
    if HAS_MO:
        mo = tl.load(mo_ptr + (hh * RANK + rk[:, None]) * P + cols[None, :], mask=km[:, None] & cm[None, :], other=0.0)
        tl.store(out_ptr + (start * H + hh) * P + lp[:, None] * (H * P) + cols[None, :],
                 tl.sum(v * mo[None, :, :], 1).to(out_ptr.dtype.element_ty), mask=pm[:, None] & cm[None, :])
    else:
        base, local = _rank_offsets(start, hh, H, RANK, RP, P, BP, POS)
        tl.store(out_ptr + base + local, v.to(out_ptr.dtype.element_ty),
                 mask=(pm[:, None] & km[None, :])[:, :, None] & cm[None, None, :])


@triton.jit(do_not_specialize=["R"])
def _mimo_output_bwd(
    y_ptr, x_ptr, mx_ptr, S_ptr, w_ptr, nxt_ptr, D_ptr, z_ptr, mz_ptr, mo_ptr, dout_ptr,
    dy_ptr, dx_ptr, dS_ptr, dw_ptr, dnxt_ptr, dz_ptr, dproj_ptr, dD_ptr, R, H, s_x, s_z, RUN,
    RANK: tl.constexpr, RP: tl.constexpr, P: tl.constexpr, BP: tl.constexpr, POS: tl.constexpr,
    HAS_MX: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_MZ: tl.constexpr, HAS_MO: tl.constexpr,
    OPS: tl.constexpr,
):
    run = tl.program_id(0)
    hh = tl.program_id(1)
    lp, rk, cols = tl.arange(0, POS), tl.arange(0, RP), tl.arange(0, BP)
    km, cm = rk < RANK, cols < P
    pmask2 = km[:, None] & cm[None, :]
    if HAS_MO:
        mo = tl.load(mo_ptr + (hh * RANK + rk[:, None]) * P + cols[None, :], mask=pmask2, other=0.0)
    # This program's partials of the projections' gradients (ranks, p) and of D's.
    dmx = tl.zeros((RP, BP), dtype=tl.float32)
    dmz = tl.zeros((RP, BP), dtype=tl.float32)
    dmo = tl.zeros((RP, BP), dtype=tl.float32)
    dD = tl.zeros((RP, BP), dtype=tl.float32)
    first = run.to(tl.int64) * RUN
    for start in range(first, tl.minimum(first + RUN, R), POS):
        pm = start + lp < R
        m2 = pm[:, None] & km[None, :]
        m3 = m2[:, :, None] & cm[None, None, :]
        prow = (start * H + hh) * P + lp[:, None] * (H * P) + cols[None, :]
        pmask = pm[:, None] & cm[None, :]
        base, local = _rank_offsets(start, hh, H, RANK, RP, P, BP, POS)
        v, x, mx, xt, S, coef = _pre_gate(y_ptr, x_ptr, s_x, mx_ptr, S_ptr, w_ptr, nxt_ptr, D_ptr, start, R, hh, H, RANK,
                                          RP, P, BP, POS, HAS_MX, HAS_D, OPS)
        if HAS_MO:
            dO = tl.load(dout_ptr + prow, mask=pmask, other=0.0).to(tl.float32)
            g = dO[:, None, :] * mo[None, :, :]
        else:
            g = tl.load(dout_ptr + base + local, mask=m3, other=0.0).to(tl.float32)
        if HAS_Z:
            z, mz, zr = _gate_input(z_ptr, mz_ptr, start, R, hh, s_z, RANK, RP, P, BP, POS, HAS_MZ)
            silu, dsilu = _silu_parts(zr)
            if HAS_MO:
                dmo += tl.sum(dO[:, None, :] * v * silu, 0)
            dzr = g * v * dsilu
            tl.store(dz_ptr + prow, tl.sum(dzr * mz[None, :, :], 1).to(dz_ptr.dtype.element_ty), mask=pmask)
            dmz += tl.sum(dzr * z[:, None, :], 0)
            g = g * silu
        elif HAS_MO:
            dmo += tl.sum(dO[:, None, :] * v, 0)
        tl.store(dy_ptr + base + local, g.to(dy_ptr.dtype.element_ty), mask=m3)
        # The correction: q = g_j · x̃_{j'} gives S's and the coefficients' gradients; x̃'s (straight through its
        # rounding) is Σ_j coef S g_j, plus D g from the skip.
        q = tl.sum(g[:, :, None, :] * xt[:, None, :, :], 3)  # (positions, ranks j, ranks j')
        s_off = (lp[:, None, None] * (H * RANK) + rk[None, :, None]) * RANK + rk[None, None, :]
        tl.store(dS_ptr + (start * H + hh) * RANK * RANK + s_off, coef * q, mask=m2[:, :, None] & km[None, None, :])
        dcoef = S * q  # S is 0 at padded ranks
        later = rk[None, None, :] > rk[None, :, None]
        tl.store(dw_ptr + start * H + hh + lp * H, tl.sum(tl.sum(tl.where(later, dcoef, 0.0), 2), 1), mask=pm)
        tl.store(dnxt_ptr + start * H + hh + lp * H, -tl.sum(tl.sum(dcoef, 2), 1), mask=pm)
        dxt = tl.sum((coef * S)[:, :, :, None] * g[:, :, None, :], 1)
        if HAS_D:
            dD += tl.sum(g * xt, 0)
            dxt += tl.load(D_ptr + hh) * g
        # x̃ = x ⊙ mimo_x: x's gradient sums the ranks, mimo_x's the positions.
        tl.store(dx_ptr + prow, tl.sum(dxt * mx[None, :, :], 1).to(dx_ptr.dtype.element_ty), mask=pmask)
        dmx += tl.sum(dxt * x[:, None, :], 0)
    part = ((run * H + hh) * RANK + rk[:, None]) * P + cols[None, :]
    stride = tl.num_programs(0) * H * RANK * P
    tl.store(dproj_ptr + part, dmx, mask=pmask2)
    tl.store(dproj_ptr + stride + part, dmz, mask=pmask2)
    tl.store(dproj_ptr + 2 * stride + part, dmo, mask=pmask2)
    tl.store(dD_ptr + run * H + hh, tl.sum(tl.sum(dD, 1), 0))


class _MimoOutput(torch.autograd.Function):
    """y (b, l·r, h, p) contiguous (the SSD op's output of the sub-steps); x (b, l, h, p) as z; mimo_x, mimo_z,
    mimo_o (h, r, p) float32 or None; S (b, l, h, r, r), w, nxt (b, l, h) float32; D (h,) float32 or None; z
    (b, l, h, p) (each position's h·p entries contiguous, any row stride) or None; ops: the operand dtype x̃ was
    rounded to."""

    @staticmethod
    def forward(ctx, y, x, mimo_x, S, w, nxt, D, z, mimo_z, mimo_o, ops):
        b, l, h, p = x.shape
        r = S.shape[-1]
        R = b * l
        out = torch.empty((b, l, h, p) if mimo_o is not None else (b, l, r, h, p), device=x.device, dtype=x.dtype)
        dummy = w
        s_z = 0 if z is None else z.stride(1)
        s_x = x.stride(1)
        _mimo_output_fwd[(cdiv(R, _FWD_POS), h)](
            y, x, dummy if mimo_x is None else mimo_x, S, w, nxt, dummy if D is None else D,
            dummy if z is None else z, dummy if mimo_z is None else mimo_z, dummy if mimo_o is None else mimo_o, out,
            R, h, s_x, s_z, RANK=r, RP=next_power_of_2(r), P=p, BP=next_power_of_2(p), POS=_FWD_POS,
            HAS_MX=mimo_x is not None, HAS_D=D is not None, HAS_Z=z is not None, HAS_MZ=mimo_z is not None,
            HAS_MO=mimo_o is not None, OPS=_TL[ops], num_warps=_WARPS,
        )
        ctx.save_for_backward(y, x, mimo_x, S, w, nxt, D, z, mimo_z, mimo_o)
        ctx.ops = ops
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        y, x, mimo_x, S, w, nxt, D, z, mimo_z, mimo_o = ctx.saved_tensors
        b, l, h, p = x.shape
        r = S.shape[-1]
        R = b * l
        runs = max(1, min(cdiv(R, _BWD_POS), cdiv(_BWD_PROGRAMS, h)))
        run = cdiv(cdiv(R, runs), _BWD_POS) * _BWD_POS
        runs = cdiv(R, run)
        dy = torch.empty_like(y)
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)  # contiguous, whatever x's row stride
        dS = torch.empty_like(S)
        dw, dnxt = torch.empty_like(w), torch.empty_like(nxt)
        dz = None if z is None else torch.empty(b, l, h, p, device=z.device, dtype=z.dtype)
        dproj = torch.empty(3, runs, h, r, p, device=x.device, dtype=torch.float32)
        dD = torch.empty(runs, h, device=x.device, dtype=torch.float32)
        dummy = w
        _mimo_output_bwd[(runs, h)](
            y, x, dummy if mimo_x is None else mimo_x, S, w, nxt, dummy if D is None else D,
            dummy if z is None else z, dummy if mimo_z is None else mimo_z, dummy if mimo_o is None else mimo_o,
            dout.contiguous(), dy, dx, dS, dw, dnxt, dummy if dz is None else dz, dproj, dD, R, h, x.stride(1),
            0 if z is None else z.stride(1), run, RANK=r, RP=next_power_of_2(r), P=p, BP=next_power_of_2(p),
            POS=_BWD_POS, HAS_MX=mimo_x is not None, HAS_D=D is not None, HAS_Z=z is not None,
            HAS_MZ=mimo_z is not None, HAS_MO=mimo_o is not None, OPS=_TL[ctx.ops], num_warps=_BWD_WARPS,
        )
        sums = dproj.sum(1)  # (3, h, r, p)
        grads = [None if t is None else sums[i] for i, t in enumerate((mimo_x, mimo_z, mimo_o))]
        return (dy, dx, grads[0], dS, dw, dnxt, None if D is None else dD.sum(0), dz, grads[1], grads[2], None)


def position_rows(t: torch.Tensor) -> torch.Tensor:
    """t (b, l, h, p) as the kernels read it: each position's h·p entries contiguous, positions at one stride (x and z
    may be slices of the layer's in-projection output: no copy)."""
    l, p = t.shape[1], t.shape[3]
    return t if t.stride(3) == 1 and t.stride(2) == p and t.stride(0) == l * t.stride(1) else t.contiguous()


def mimo_output_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    mimo_x: torch.Tensor | None,
    S: torch.Tensor,
    w: torch.Tensor,
    nxt: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    mimo_z: torch.Tensor | None,
    mimo_o: torch.Tensor | None,
    ops: torch.dtype,
) -> torch.Tensor:
    """The MIMO route's output (module docstring) in x's dtype: (b, l, h, p) with mimo_o, else (b, l, r, h, p); with
    gradients of y, x, mimo_x, S, w, nxt, D, z, mimo_z and mimo_o (the projections' and D's in float32).

    y: (b, l·r, h, p), the SSD op's output of the r sub-steps of each position; x: (b, l, h, p); mimo_*: (h, r, p);
    S: (b, l, h, r, r); w, nxt: (b, l, h); D: (h,); z: (b, l, h, p); ``ops``: the dtype x̃ = x ⊙ mimo_x was rounded
    to for the SSD op.
    """

    def f32(t):
        return None if t is None else t.float().contiguous()

    if z is None:
        mimo_z = None  # no gate: mimo_z takes no part (and gets no gradient)
    return _MimoOutput.apply(y.contiguous(), position_rows(x), f32(mimo_x), S.contiguous(), f32(w), f32(nxt), f32(D),
                             None if z is None else position_rows(z), f32(mimo_z), f32(mimo_o), ops)
