"""Triton causal convolution backward: a generic kernel for any width, and one for widths up to 4 that loads
every shifted tile once.

Both write dx, the gradient of the initial states (first L tile) and per-program partial sums for
dweight / dbias that one small ``sum`` reduces; the pre-activation is recomputed, not stored (SiLU only).

The generic backward (``triton.py``) recomputes each pre-activation inside the sum over the taps that
read a source, so a tile loads x about W * W + 2 W times (24 at width 4). Here a program loads the seven
shifted x tiles X(m) = x[s + m], m = -3 .. 3, and the four dout tiles once each, and forms the four
pre-activations and their gradients G_j (at outputs s + j) from those registers:

    pre(s + j)   = bias + sum_lag w[W - 1 - lag] * X(j - lag)      over the taps in s + j's document
    dsrc(s)      = sum_j  w[W - 1 - j] * G_j                        over the outputs in s's document
    dweight[k]  += sum_s  G_0 * X(k - (W - 1)),   dbias += sum_s G_0

Narrower widths (2, 3) use the same code with the missing taps switched off at compile time. Document
boundaries follow ``triton.py``: ``link(p)`` says p continues p - 1's document; a (output, lag) pair
counts iff every link in (output - lag, output] holds. Invalid taps are dropped with ``where``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ssmkit.ops.causal_conv1d.triton_common import (
    _acc_dtype,
    _blocks,
    _grad_src,
    _link,
    _load_src,
    _on_device,
    _placeholder,
    _strides,
)


@triton.jit
def _store_dinit(x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, dout_ptr, dinit_ptr, offs_d, mask_d, length,
                 stride_xd, stride_xl, stride_wd, stride_wk, stride_id, stride_il, stride_sl, stride_gd, stride_gl,
                 stride_did, stride_dil, W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
                 HAS_SEQ: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr, BLOCK_W: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """The gradient of the W - 1 initial-state positions -(W-1) .. -1 (one batch row's dinit_ptr)."""
    s0 = tl.arange(0, BLOCK_W) - (W - 1)
    dinit, _ = _grad_src(x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, dout_ptr, s0, offs_d, mask_d, length,
                         stride_xd, stride_xl, stride_wd, stride_wk, stride_id, stride_il, stride_sl,
                         stride_gd, stride_gl, W, HAS_BIAS, HAS_INIT, HAS_SEQ, SILU, ACC, BLOCK_W, BLOCK_D)
    di_ptrs = dinit_ptr + (s0 + W - 1)[:, None] * stride_dil + offs_d[None, :] * stride_did
    tl.store(di_ptrs, dinit.to(dinit_ptr.dtype.element_ty), mask=(s0 < 0)[:, None] & mask_d[None, :])


@triton.jit
def _links(seq_ptr, stride_sl, s, length, m: tl.constexpr, HAS_SEQ: tl.constexpr):
    """(BLOCK,) link(s + m), or all True without documents."""
    if HAS_SEQ:
        return _link(seq_ptr, stride_sl, s + m, length)
    return tl.zeros_like(s) == 0


@triton.jit
def _tap(w_ptr, offs_d, mask_d, stride_wd, stride_wk, lag: tl.constexpr, W: tl.constexpr, ACC: tl.constexpr):
    """(BLOCK_D,) weight of tap ``lag`` (output t reads source t - lag), 0 for lag >= W."""
    if lag < W:
        return tl.load(w_ptr + offs_d * stride_wd + (W - 1 - lag) * stride_wk, mask=mask_d, other=0.0).to(ACC)
    return tl.zeros_like(offs_d).to(ACC)


@triton.jit
def _src(x_ptr, init_ptr, s, m: tl.constexpr, offs_d, mask_d, stride_xd, stride_xl, stride_id, stride_il, length,
         W: tl.constexpr, HAS_INIT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """X(m): (BLOCK, BLOCK_D) sources at s + m, or zeros for shifts no tap of width W reaches."""
    if m > -W and m < W:
        return _load_src(x_ptr, init_ptr, s + m, offs_d, mask_d, stride_xd, stride_xl, stride_id, stride_il,
                         length, W, HAS_INIT, ACC)
    return tl.zeros([BLOCK, BLOCK_D], dtype=ACC)


@triton.jit
def _grad_at(dout_ptr, s, j: tl.constexpr, xa, xb, xc, xd, la, lb, lc, w0, w1, w2, w3, bias, offs_d, mask_d,
             length, stride_gd, stride_gl, HAS_SEQ: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr):
    """G_j: gradient of the pre-activation at outputs s + j, from xa..xd = X(j), X(j-1), X(j-2), X(j-3) and
    la..lc = link(s + j), link(s + j - 1), link(s + j - 2)."""
    u = s + j
    inside = (u >= 0) & (u < length)
    g = tl.load(dout_ptr + u[:, None] * stride_gl + offs_d[None, :] * stride_gd,
                mask=inside[:, None] & mask_d[None, :], other=0.0).to(ACC)
    if SILU:
        t1 = w1[None, :] * xb
        t2 = w2[None, :] * xc
        t3 = w3[None, :] * xd
        if HAS_SEQ:
            t1 = tl.where(la[:, None], t1, 0.0)
            t2 = tl.where((la & lb)[:, None], t2, 0.0)
            t3 = tl.where((la & lb & lc)[:, None], t3, 0.0)
        pre = bias[None, :] + w0[None, :] * xa + t1 + t2 + t3
        sig = 1.0 / (1.0 + tl.exp(-pre))
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return g


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, dout_ptr, dx_ptr, dinit_ptr, dwb_ptr,
                     length, dim, tiles_per_prog,
                     stride_xb, stride_xd, stride_xl, stride_wd, stride_wk, stride_ib, stride_id, stride_il,
                     stride_sb, stride_sl, stride_gb, stride_gd, stride_gl, stride_dxb, stride_dxd, stride_dxl,
                     stride_dib, stride_did, stride_dil, stride_pp, stride_pk,
                     W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                     SILU: tl.constexpr, NEED_DINIT: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, SHIFTED: tl.constexpr):
    """One backward, two forms: SHIFTED (widths <= 4) loads each shifted tile once (the module docstring);
    else any width, the pre-activations recomputed inside the sum over the taps (``_grad_src``)."""
    pid_l, pid_d = tl.program_id(0), tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)  # batch offsets can pass 2**31
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    x_ptr += pid_b * stride_xb
    init_ptr += pid_b * stride_ib
    seq_ptr += pid_b * stride_sb
    dout_ptr += pid_b * stride_gb
    if SHIFTED:
        w0 = _tap(w_ptr, offs_d, mask_d, stride_wd, stride_wk, 0, W, ACC)
        w1 = _tap(w_ptr, offs_d, mask_d, stride_wd, stride_wk, 1, W, ACC)
        w2 = _tap(w_ptr, offs_d, mask_d, stride_wd, stride_wk, 2, W, ACC)
        w3 = _tap(w_ptr, offs_d, mask_d, stride_wd, stride_wk, 3, W, ACC)
        bias = tl.zeros([BLOCK_D], dtype=ACC)
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
        dw0 = tl.zeros([BLOCK_D], dtype=ACC)  # per-lag weight gradients, then the bias's
        dw1 = tl.zeros([BLOCK_D], dtype=ACC)
        dw2 = tl.zeros([BLOCK_D], dtype=ACC)
        dw3 = tl.zeros([BLOCK_D], dtype=ACC)
        db = tl.zeros([BLOCK_D], dtype=ACC)
        for tile in range(tiles_per_prog):
            s = (pid_l * tiles_per_prog + tile) * BLOCK_L + tl.arange(0, BLOCK_L)
            lm2 = _links(seq_ptr, stride_sl, s, length, -2, HAS_SEQ)
            lm1 = _links(seq_ptr, stride_sl, s, length, -1, HAS_SEQ)
            l0 = _links(seq_ptr, stride_sl, s, length, 0, HAS_SEQ)
            lp1 = _links(seq_ptr, stride_sl, s, length, 1, HAS_SEQ)
            lp2 = _links(seq_ptr, stride_sl, s, length, 2, HAS_SEQ)
            lp3 = _links(seq_ptr, stride_sl, s, length, 3, HAS_SEQ)
            # Outputs s+3 down to s: each step brings in one more shifted x tile and drops one.
            xp3 = _src(x_ptr, init_ptr, s, 3, offs_d, mask_d, stride_xd, stride_xl, stride_id, stride_il, length,
                       W, HAS_INIT, ACC, BLOCK_L, BLOCK_D)
            xp2 = _src(x_ptr, init_ptr, s, 2, offs_d, mask_d, stride_xd, stride_xl, stride_id, stride_il, length,
                       W, HAS_INIT, ACC, BLOCK_L, BLOCK_D)
            xp1 = _src(x_ptr, init_ptr, s, 1, offs_d, mask_d, stride_xd, stride_xl, stride_id, stride_il, length,
                       W, HAS_INIT, ACC, BLOCK_L, BLOCK_D)
            x0 = _src(x_ptr, init_ptr, s, 0, offs_d, mask_d, stride_xd, stride_xl, stride_id, stride_il, length,
                      W, HAS_INIT, ACC, BLOCK_L, BLOCK_D)
            dsrc = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC)
            if W > 3:
                g3 = _grad_at(dout_ptr, s, 3, xp3, xp2, xp1, x0, lp3, lp2, lp1, w0, w1, w2, w3, bias, offs_d, mask_d,
                              length, stride_gd, stride_gl, HAS_SEQ, SILU, ACC)
                term = w3[None, :] * g3
                if HAS_SEQ:
                    term = tl.where((lp1 & lp2 & lp3)[:, None], term, 0.0)
                dsrc += term
            xm1 = _src(x_ptr, init_ptr, s, -1, offs_d, mask_d, stride_xd, stride_xl, stride_id, stride_il, length,
                       W, HAS_INIT, ACC, BLOCK_L, BLOCK_D)
            if W > 2:
                g2 = _grad_at(dout_ptr, s, 2, xp2, xp1, x0, xm1, lp2, lp1, l0, w0, w1, w2, w3, bias, offs_d, mask_d,
                              length, stride_gd, stride_gl, HAS_SEQ, SILU, ACC)
                term = w2[None, :] * g2
                if HAS_SEQ:
                    term = tl.where((lp1 & lp2)[:, None], term, 0.0)
                dsrc += term
            xm2 = _src(x_ptr, init_ptr, s, -2, offs_d, mask_d, stride_xd, stride_xl, stride_id, stride_il, length,
                       W, HAS_INIT, ACC, BLOCK_L, BLOCK_D)
            if W > 1:
                g1 = _grad_at(dout_ptr, s, 1, xp1, x0, xm1, xm2, lp1, l0, lm1, w0, w1, w2, w3, bias, offs_d, mask_d,
                              length, stride_gd, stride_gl, HAS_SEQ, SILU, ACC)
                term = w1[None, :] * g1
                if HAS_SEQ:
                    term = tl.where(lp1[:, None], term, 0.0)
                dsrc += term
            xm3 = _src(x_ptr, init_ptr, s, -3, offs_d, mask_d, stride_xd, stride_xl, stride_id, stride_il, length,
                       W, HAS_INIT, ACC, BLOCK_L, BLOCK_D)
            g0 = _grad_at(dout_ptr, s, 0, x0, xm1, xm2, xm3, l0, lm1, lm2, w0, w1, w2, w3, bias, offs_d, mask_d,
                          length, stride_gd, stride_gl, HAS_SEQ, SILU, ACC)
            dsrc += w0[None, :] * g0
            dx_ptrs = dx_ptr + pid_b * stride_dxb + s[:, None] * stride_dxl + offs_d[None, :] * stride_dxd
            tl.store(dx_ptrs, dsrc.to(dx_ptr.dtype.element_ty), mask=(s < length)[:, None] & mask_d[None, :])
            # Tap lag of output s reads X(-lag); it counts iff links s, s-1, .., s-lag+1 hold.
            db += tl.sum(g0, axis=0)
            dw0 += tl.sum(g0 * x0, axis=0)
            p1 = g0 * xm1
            p2 = g0 * xm2
            p3 = g0 * xm3
            if HAS_SEQ:
                p1 = tl.where(l0[:, None], p1, 0.0)
                p2 = tl.where((l0 & lm1)[:, None], p2, 0.0)
                p3 = tl.where((l0 & lm1 & lm2)[:, None], p3, 0.0)
            dw1 += tl.sum(p1, axis=0)
            dw2 += tl.sum(p2, axis=0)
            dw3 += tl.sum(p3, axis=0)
        # Partial rows in the generic kernel's order: row k = weight tap k (lag W - 1 - k), row W = bias.
        part_ptr = dwb_ptr + (pid_b * tl.num_programs(0) + pid_l) * stride_pp + offs_d
        tl.store(part_ptr + (W - 1) * stride_pk, dw0, mask=mask_d)
        if W > 1:
            tl.store(part_ptr + (W - 2) * stride_pk, dw1, mask=mask_d)
        if W > 2:
            tl.store(part_ptr + (W - 3) * stride_pk, dw2, mask=mask_d)
        if W > 3:
            tl.store(part_ptr + (W - 4) * stride_pk, dw3, mask=mask_d)
        tl.store(part_ptr + W * stride_pk, db, mask=mask_d)
    else:
        rows = tl.arange(0, BLOCK_W)  # rows 0..W-1: dweight taps, row W: dbias
        dwb = tl.zeros([BLOCK_W, BLOCK_D], dtype=ACC)
        for tile in range(tiles_per_prog):
            s = (pid_l * tiles_per_prog + tile) * BLOCK_L + tl.arange(0, BLOCK_L)
            dsrc, g = _grad_src(x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, dout_ptr, s, offs_d, mask_d, length,
                             stride_xd, stride_xl, stride_wd, stride_wk, stride_id, stride_il, stride_sl,
                             stride_gd, stride_gl, W, HAS_BIAS, HAS_INIT, HAS_SEQ, SILU, ACC, BLOCK_L, BLOCK_D)
            dx_ptrs = dx_ptr + pid_b * stride_dxb + s[:, None] * stride_dxl + offs_d[None, :] * stride_dxd
            tl.store(dx_ptrs, dsrc.to(dx_ptr.dtype.element_ty), mask=(s < length)[:, None] & mask_d[None, :])
            # dweight[:, k] += sum_t g[t] * src[t - lag] over the taps in t's document; dbias += sum_t g[t].
            dwb += tl.where(rows[:, None] == W, tl.sum(g, axis=0)[None, :], 0.0)
            same = tl.full([BLOCK_L], 1, tl.int1)
            for lag in tl.static_range(W):
                if HAS_SEQ and lag > 0:
                    same = same & _link(seq_ptr, stride_sl, s - lag + 1, length)
                src = _load_src(x_ptr, init_ptr, s - lag, offs_d, mask_d, stride_xd, stride_xl, stride_id, stride_il,
                                length, W, HAS_INIT, ACC)
                prod = g * src
                if HAS_SEQ:
                    prod = tl.where(same[:, None], prod, 0.0)
                dwb += tl.where(rows[:, None] == W - 1 - lag, tl.sum(prod, axis=0)[None, :], 0.0)
        part = pid_b * tl.num_programs(0) + pid_l
        tl.store(dwb_ptr + part * stride_pp + rows[:, None] * stride_pk + offs_d[None, :], dwb,
                 mask=(rows < W + 1)[:, None] & mask_d[None, :])
    if NEED_DINIT:  # nested, not `and`: NEED_DINIT is compile-time, pid_l is not
        if pid_l == 0:
            _store_dinit(x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, dout_ptr, dinit_ptr + pid_b * stride_dib, offs_d,
                         mask_d, length, stride_xd, stride_xl, stride_wd, stride_wk, stride_id, stride_il, stride_sl,
                         stride_gd, stride_gl, stride_did, stride_dil, W, HAS_BIAS, HAS_INIT, HAS_SEQ, SILU, ACC,
                         BLOCK_W, BLOCK_D)



@dataclass(frozen=True)
class BackwardLaunch:
    """How the backward is launched. ``kernel``: "shifted" (widths <= 4; wider ones fall back) or "generic";
    ``block_l`` / ``block_d``: the tile (None: the layout's default, ``default_tile``); ``programs``: about how
    many programs share the length (more only grows the partial dweight sums)."""

    kernel: str = "shifted"
    block_l: int | None = None
    block_d: int | None = None
    num_warps: int = 4
    programs: int = 4096

    def __post_init__(self) -> None:
        if self.kernel not in ("generic", "shifted"):
            raise ValueError(f"kernel must be 'generic' or 'shifted', got {self.kernel!r}")
        for name in ("block_l", "block_d"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1
                                      or value & (value - 1)):
                raise ValueError(f"{name} must be a power of two >= 1 or None, got {value!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps!r}")
        if isinstance(self.programs, bool) or not isinstance(self.programs, int) or self.programs < 1:
            raise ValueError(f"programs must be an int >= 1, got {self.programs!r}")


LAUNCH = BackwardLaunch()  # replaced as a whole by benchmarks/gpu_conv_norm.py's sweep


def default_tile(x: torch.Tensor, shifted: bool) -> tuple[int, int]:
    """(BLOCK_L, BLOCK_D) for the backward when the launch names none.

    The shifted kernel's tiles won the sweep on an H100 ((8, 4096, 8192), width 4, SiLU, bf16, fwd+bwd,
    benchmarks/RESULTS.md): channel-first 64 x 16 (1.956 ms, 2.4x the HBM floor; the generic kernel's 128 x 16
    3.942) and channel-last 32 x 32 (3.187 ms, 4.0x; generic 16 x 128 5.115). The generic kernel (widths > 4)
    keeps ``_blocks``'s tiles.
    """
    if not shifted:
        return _blocks(x, backward=True)
    return (32, 32) if x.stride(1) == 1 and x.shape[-1] > 1 else (64, 16)


def backward(x, weight, bias, init, seq_idx, silu: bool, dout: torch.Tensor, need_dinit: bool,
             launch: BackwardLaunch | None = None):
    """dx (x's layout), dinit (b, d, w - 1) or None, dweight (d, w), dbias (d,) or None."""
    launch = launch or LAUNCH
    batch, dim, length = x.shape
    width = weight.shape[1]
    shifted = launch.kernel == "shifted" and width <= 4
    default_l, default_d = default_tile(x, shifted)
    block_l, block_d = launch.block_l or default_l, launch.block_d or default_d
    n_tiles, n_blocks_d = triton.cdiv(length, block_l), triton.cdiv(dim, block_d)
    tiles_per_prog = max(1, triton.cdiv(n_tiles * batch * n_blocks_d, launch.programs))
    n_prog_l = triton.cdiv(n_tiles, tiles_per_prog)
    acc = _acc_dtype(x, weight, bias, init)
    acc_torch = torch.float64 if acc == tl.float64 else torch.float32
    dx = torch.empty_like(x)
    dinit = torch.empty(batch, dim, width - 1, device=x.device, dtype=init.dtype) if need_dinit else None
    partial = torch.empty(batch * n_prog_l, width + 1, dim, device=x.device, dtype=acc_torch)
    with _on_device(x):
        _conv_bwd_kernel[(n_prog_l, n_blocks_d, batch)](
            x, weight, _placeholder(bias, weight), _placeholder(init, x), _placeholder(seq_idx, x), dout, dx,
            _placeholder(dinit, dx), partial, length, dim, tiles_per_prog,
            *x.stride(), *weight.stride(), *_strides(init, 3), *_strides(seq_idx, 2), *dout.stride(), *dx.stride(),
            *_strides(dinit, 3), partial.stride(0), partial.stride(1),
            W=width, HAS_BIAS=bias is not None, HAS_INIT=init is not None, HAS_SEQ=seq_idx is not None, SILU=silu,
            NEED_DINIT=need_dinit, ACC=acc, BLOCK_L=block_l, BLOCK_D=block_d,
            BLOCK_W=triton.next_power_of_2(width + 1), SHIFTED=shifted,
            num_warps=launch.num_warps,
        )
    sums = partial.sum(dim=0)
    dweight = sums[:width].t().to(weight.dtype)
    dbias = sums[width].to(bias.dtype) if bias is not None else None
    return dx, dinit, dweight, dbias
