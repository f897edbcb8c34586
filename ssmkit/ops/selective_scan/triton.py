"""Triton selective scan: the hardware-aware Mamba-1 scan on the GPU (and on CPU under TRITON_INTERPRET=1).

Dimensions as in ``reference.py``; ``T`` is the chunk length, ``BD`` the channels of one program.

Laid out as mamba_ssm's CUDA kernel: each program owns ``BD`` channels of one group of one batch row and
walks the sequence in chunks of ``T`` steps. Per chunk it loads the (BD, T) tiles of u, delta (and z),
then loops over the state index n: with the (T,) rows B_n, C_n it forms the decays ``a = exp(Δ A_n)``
and inputs ``x = Δ u B_n`` as (BD, T) tiles, solves ``h_t = a_t h_{t-1} + x_t`` over the chunk with one
associative scan along time (``(a1, x1) ∘ (a2, x2) = (a1 a2, a2 x1 + x2)``; each thread holds a run of
consecutive steps, so most of the scan is sequential in registers), adds the carried state times the
cumulative decay and accumulates ``y += C_n h``. The (b, d, l, n) state never reaches memory: a state
crosses chunks through the checkpoint tensor (b, d, l / T + 1, n), which keeps the state before every
chunk (and the last state) for the backward pass; at T = 128 it is 1/8 the size of a float32 u.

The backward pass walks the chunks in reverse. Per chunk and n it recomputes the states from the
checkpoint and solves the adjoint ``g_t = c_t + a_{t+1} g_{t+1}`` (``c_t = C_t dy_t``) with one reverse
associative scan. Its elements are triples ``(S, Q, F)``: for a segment [s..e],
``S = Σ_j c_j Π_{k=s+1..j} a_k``, ``Q = Π_{k=s+1..e} a_k`` and ``F = a_s``, which needs no shift of
``a`` by one step. Every gradient is read off ``h`` and ``g`` as in ``chunked.py``; ``a_t h_{t-1}`` is
taken as ``h_t - x_t`` (as mamba_ssm's CUDA kernel does). dB and dC are sums over the channels of a
group: each program adds its block's share with atomics into float32 buffers. The gate's gradient needs
the ungated y, which the forward pass saves (in u's dtype, as mamba_ssm) when z is given.

Padding steps past ``l`` get Δ = 0, so a = 1 and x = 0: the state passes through unchanged, and the last
column of a chunk is always the state to carry.

Threads of a program exchange carried values through global memory (checkpoint, adjoint carry, dA);
a barrier ends every chunk, and values read and written within one chunk live in separate slots.

Fused-state variant (``ScanConfig.fused_states``; same math, same checkpoint tensor): a program holds
every state index at once in (T, BD, N) tiles, time first, so that Triton's default layout gives each
thread all T steps of one (channel, state) pair and spreads channels and states over the lanes. One scan
per chunk is then sequential in registers; the states, the adjoint carry and dA stay in registers
across chunks (no global round trips, no barriers); y, du and dΔ are sums over the lanes of the state
axis, dB and dC over the channel axis (then one atomic per (n, t) and program). Each chunk's inputs
are loaded one chunk ahead. The backward's registers limit T to about 16 (a checkpoint every 16 steps,
twice the size of a bf16 u); the forward may walk longer tiles (``fwd_chunk``) and still write a
checkpoint every ``chunk`` steps.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ssmkit.ops.selective_scan.reference import compute_dtype

_LOG2E = tl.constexpr(1.4426950408889634)


@dataclasses.dataclass(frozen=True)
class ScanConfig:
    """Launch shape: ``chunk`` steps per tile (also the checkpoint interval), channels and warps per program.

    ``fused_states`` picks the kernels that hold every state index at once in (channels, N, chunk) tiles
    (one scan per chunk, states and adjoints carried in registers) over those that loop over the state
    index with (channels, chunk) tiles (carries through global memory). With fused states the forward
    may walk longer tiles of ``fwd_chunk`` steps (a multiple of ``chunk``; default ``chunk``): it
    still writes a checkpoint every ``chunk`` steps, the backward's tile."""

    def __post_init__(self) -> None:
        fwd = self.fwd_chunk or self.chunk
        if fwd % self.chunk or (fwd != self.chunk and not self.fused_states):
            raise ValueError(f"fwd_chunk={fwd} must be a multiple of chunk={self.chunk} (and needs fused_states)")

    chunk: int = 128
    fwd_block_d: int = 8
    fwd_warps: int = 4
    bwd_block_d: int = 16
    bwd_warps: int = 8
    fused_states: bool = False
    fwd_chunk: int | None = None


# Chosen from the launch-config sweep on an H200 (bf16, b 8, d 2048, N 16, L 8192; benchmarks/RESULTS.md):
# for training the fused-state kernels with 2-channel programs (forward+backward 20.8 ms against 44.6 for
# the chunk-128 kernels); for a forward alone the chunk-128 kernels (4.8 ms against 6.6).
TRAINING_CONFIG = ScanConfig(16, 2, 1, 2, 1, fused_states=True, fwd_chunk=32)
DEFAULT_CONFIG = ScanConfig()


@triton.jit
def _softplus(x):
    # log1p(e^x) without log1p: log(w) e / (w - 1) with w = 1 + e is exact to rounding (Goldberg);
    # above 20 softplus(x) = x, as torch and mamba_ssm.
    e = tl.exp(x)
    w = 1.0 + e
    wm1 = w - 1.0
    lp = tl.where(wm1 == 0.0, e, tl.log(w) * e / tl.where(wm1 == 0.0, 1.0, wm1))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _scan_combine(a1, x1, a2, x2):
    # (earlier, later) pairs of the affine maps h -> a h + x. A zero decay drops x1 outright, so that
    # inf/NaN of an earlier document cannot leak past a seq_idx change (0 * NaN would).
    return a1 * a2, tl.where(a2 == 0.0, x2, a2 * x1 + x2)


@triton.jit
def _adjoint_combine(s_late, q_late, f_late, s_early, q_early, f_early):
    # Reverse scan: the accumulated later segment comes first. See the module docstring for (S, Q, F).
    w = q_early * f_late
    return tl.where(w == 0.0, s_early, s_early + w * s_late), w * q_late, f_early


@triton.jit
def _steps(
    u_b, delta_b, seq_b, bias, offs_d, mask_d, t, mask_t, s_ud, s_ul, s_dd, s_dl, s_sl,
    HAS_SEQ: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
):
    """One chunk's (BD, T) tiles u, delta + bias, Δ (0 past the end), and the (T,) document starts."""
    m2 = mask_d[:, None] & mask_t[None, :]
    u = tl.load(u_b + offs_d[:, None] * s_ud + t[None, :] * s_ul, mask=m2, other=0.0).to(ACC)
    raw = tl.load(delta_b + offs_d[:, None] * s_dd + t[None, :] * s_dl, mask=m2, other=0.0).to(ACC)
    raw = raw + bias[:, None]
    if SOFTPLUS:
        dt = _softplus(raw)
    else:
        dt = raw
    dt = tl.where(mask_t[None, :], dt, 0.0)
    if HAS_SEQ:
        first = mask_t & (t > 0)
        cur = tl.load(seq_b + t * s_sl, mask=mask_t, other=0)
        prev = tl.load(seq_b + (t - 1) * s_sl, mask=first, other=0)
        starts = first & (cur != prev)
    else:
        starts = t < 0
    return u, raw, dt, starts


@triton.jit
def _states(dt, du, A2_n, B_n, h_prev, starts, HAS_SEQ: tl.constexpr):
    """States h_t (BD, T) of one state index over a chunk from the state before it; also a, x.
    B_n is its row of B broadcast to a (BD, T) tile."""
    a = tl.exp2(dt * A2_n[:, None])
    if HAS_SEQ:
        # A new document drops the carried state: a = 0, so h_t = x_t.
        a = tl.where(starts[None, :], 0.0, a)
    x = du * B_n
    acum, hs = tl.associative_scan((a, x), axis=1, combine_fn=_scan_combine)
    return tl.where(acum == 0.0, hs, hs + acum * h_prev[:, None]), a, x


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, seq_ptr,
    out_ptr, ypre_ptr, ckpt_ptr,
    d_model, dg, L, N,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_sb, s_sl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_SEQ: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, T: tl.constexpr,
):
    """Grid (cdiv(dg, BLOCK_D), g, b). Writes out (b, d, l), the ungated y (same layout as out) when
    HAS_Z, and ckpt (b, d, cdiv(l, T) + 1, N): the state before each chunk, then the last state."""
    pid_d = tl.program_id(0)
    grp = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_c < dg
    offs_d = grp * dg + offs_c
    offs_t = tl.arange(0, T)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    u_b, delta_b, z_b = u_ptr + pid_b * s_ub, delta_ptr + pid_b * s_db, z_ptr + pid_b * s_zb
    out_b, ypre_b = out_ptr + pid_b * s_ob, ypre_ptr + pid_b * s_ob
    B_b = B_ptr + pid_b * s_Bb + grp * s_Bg
    C_b = C_ptr + pid_b * s_Cb + grp * s_Cg
    seq_b = seq_ptr + pid_b * s_sb
    n_chunks = tl.cdiv(L, T)
    # Row of each channel in ckpt; the state crosses chunks through it (a barrier ends each chunk).
    ckpt_d = ckpt_ptr + (pid_b * d_model + offs_d) * ((n_chunks + 1) * N)
    for n in range(N):
        if HAS_H0:
            h0 = tl.load(h0_ptr + (pid_b * d_model + offs_d) * N + n, mask=mask_d, other=0.0).to(ACC)
        else:
            h0 = tl.zeros((BLOCK_D,), dtype=ACC)
        tl.store(ckpt_d + n, h0, mask=mask_d)
    tl.debug_barrier()
    for c in range(n_chunks):
        t = c * T + offs_t
        mask_t = t < L
        m2 = mask_d[:, None] & mask_t[None, :]
        # B and C rows are read as (BD, T) tiles (each row repeated): loaded straight into the tiles'
        # layout, where a (T,) row would cost a layout change through shared memory for every n.
        mt = (offs_c >= 0)[:, None] & mask_t[None, :]
        t_B, t_C = offs_c[:, None] * 0 + t[None, :] * s_Bl, offs_c[:, None] * 0 + t[None, :] * s_Cl
        u, _raw, dt, starts = _steps(
            u_b, delta_b, seq_b, bias, offs_d, mask_d, t, mask_t, s_ud, s_ul, s_dd, s_dl, s_sl,
            HAS_SEQ, SOFTPLUS, ACC,
        )
        du = dt * u
        y = tl.zeros((BLOCK_D, T), dtype=ACC)
        for n in range(N):
            A2_n = tl.load(A_ptr + offs_d * N + n, mask=mask_d, other=0.0).to(ACC) * _LOG2E
            B_n = tl.load(B_b + n * s_Bn + t_B, mask=mt, other=0.0).to(ACC)
            C_n = tl.load(C_b + n * s_Cn + t_C, mask=mt, other=0.0).to(ACC)
            h_prev = tl.load(ckpt_d + c * N + n, mask=mask_d, other=0.0)
            hs, _a, _x = _states(dt, du, A2_n, B_n, h_prev, starts, HAS_SEQ)
            y += hs * C_n
            # Past the end a = 1 and x = 0, so the last column is the state after the chunk. (A sum picks
            # it: a masked store of the tile would first move the whole tile to another layout.)
            h_last = tl.sum(tl.where(offs_t[None, :] == T - 1, hs, 0.0), axis=1)
            tl.store(ckpt_d + (c + 1) * N + n, h_last, mask=mask_d)
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            tl.store(ypre_b + offs_d[:, None] * s_od + t[None, :] * s_ol, y.to(ypre_ptr.dtype.element_ty), mask=m2)
            zt = tl.load(z_b + offs_d[:, None] * s_zd + t[None, :] * s_zl, mask=m2, other=0.0).to(ACC)
            y = y * zt * tl.sigmoid(zt)
        tl.store(out_b + offs_d[:, None] * s_od + t[None, :] * s_ol, y.to(out_ptr.dtype.element_ty), mask=m2)
        tl.debug_barrier()


@triton.jit
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, ckpt_ptr, ypre_ptr, dout_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh_ptr,
    d_model, dg, L, N, slot,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_yb, s_yd, s_yl, s_gb, s_gd, s_gl,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_sb, s_sl,
    s_dub, s_dud, s_dul, s_ddb, s_ddd, s_ddl, s_dzb, s_dzd, s_dzl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SEQ: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, T: tl.constexpr,
):
    """Grid as the forward. ``dh`` and ``dA`` are (2, b, d, N) pairs of slots (``slot`` elements apart):
    chunk i reads slot i % 2 and writes the other, so no thread can read a value another has already
    replaced. ``dh`` carries a_{t+1} g_{t+1} between chunks: d(last state) in slot 0 on entry,
    d(initial state) in slot n_chunks % 2 on exit; ``dA`` sums the chunks' dA the same way (slot 0 zero on
    entry). Writes du, ddelta, dz (b, d, l), dD and d(delta_bias) per row (b, d); adds dB, dC
    (b, g, N, l) (zeroed by the caller) with atomics."""
    pid_d = tl.program_id(0)
    grp = tl.program_id(1)
    n_groups = tl.num_programs(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_c < dg
    offs_d = grp * dg + offs_c
    offs_t = tl.arange(0, T)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    dD_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    u_b, delta_b, z_b = u_ptr + pid_b * s_ub, delta_ptr + pid_b * s_db, z_ptr + pid_b * s_zb
    ypre_b, dout_b = ypre_ptr + pid_b * s_yb, dout_ptr + pid_b * s_gb
    du_b, ddelta_b, dz_b = du_ptr + pid_b * s_dub, ddelta_ptr + pid_b * s_ddb, dz_ptr + pid_b * s_dzb
    B_b = B_ptr + pid_b * s_Bb + grp * s_Bg
    C_b = C_ptr + pid_b * s_Cb + grp * s_Cg
    seq_b = seq_ptr + pid_b * s_sb
    # dB, dC buffers are contiguous (b, g, N, l).
    dBC_b = (pid_b * n_groups + grp) * N * L
    n_chunks = tl.cdiv(L, T)
    ckpt_d = ckpt_ptr + (pid_b * d_model + offs_d) * ((n_chunks + 1) * N)
    state_d = (pid_b * d_model + offs_d) * N
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        read, write = (i % 2) * slot, ((i + 1) % 2) * slot
        t = c * T + offs_t
        mask_t = t < L
        m2 = mask_d[:, None] & mask_t[None, :]
        mt = (offs_c >= 0)[:, None] & mask_t[None, :]
        t_B, t_C = offs_c[:, None] * 0 + t[None, :] * s_Bl, offs_c[:, None] * 0 + t[None, :] * s_Cl
        u, raw, dt, starts = _steps(
            u_b, delta_b, seq_b, bias, offs_d, mask_d, t, mask_t, s_ud, s_ul, s_dd, s_dl, s_sl,
            HAS_SEQ, SOFTPLUS, ACC,
        )
        du = dt * u
        dy = tl.load(dout_b + offs_d[:, None] * s_gd + t[None, :] * s_gl, mask=m2, other=0.0).to(ACC)
        if HAS_Z:
            zt = tl.load(z_b + offs_d[:, None] * s_zd + t[None, :] * s_zl, mask=m2, other=0.0).to(ACC)
            y = tl.load(ypre_b + offs_d[:, None] * s_yd + t[None, :] * s_yl, mask=m2, other=0.0).to(ACC)
            sig = tl.sigmoid(zt)
            # silu'(z) = σ(z) (1 + z (1 - σ(z)))
            dz = dy * y * sig * (1.0 + zt * (1.0 - sig))
            tl.store(dz_b + offs_d[:, None] * s_dzd + t[None, :] * s_dzl, dz.to(dz_ptr.dtype.element_ty), mask=m2)
            dy = dy * zt * sig
        if HAS_D:
            dD_acc += tl.sum(dy * u, axis=1)
        # Σ_n B_n g_n and Σ_n A_n q_n, the sums over the state of du and dΔ.
        v = tl.zeros((BLOCK_D, T), dtype=ACC)
        aq = tl.zeros((BLOCK_D, T), dtype=ACC)
        for n in range(N):
            A_n = tl.load(A_ptr + offs_d * N + n, mask=mask_d, other=0.0).to(ACC)
            B_n = tl.load(B_b + n * s_Bn + t_B, mask=mt, other=0.0).to(ACC)
            C_n = tl.load(C_b + n * s_Cn + t_C, mask=mt, other=0.0).to(ACC)
            h_prev = tl.load(ckpt_d + c * N + n, mask=mask_d, other=0.0)
            hs, a, x = _states(dt, du, A_n * _LOG2E, B_n, h_prev, starts, HAS_SEQ)
            carry = tl.load(dh_ptr + read + state_d + n, mask=mask_d, other=0.0)
            s_acc, q_acc, _f = tl.associative_scan(
                (dy * C_n, tl.full((BLOCK_D, T), 1.0, ACC), a), axis=1,
                combine_fn=_adjoint_combine, reverse=True,
            )
            gs = tl.where(q_acc == 0.0, s_acc, s_acc + q_acc * carry[:, None])
            carry = tl.sum(tl.where(offs_t[None, :] == 0, a * gs, 0.0), axis=1)
            tl.store(dh_ptr + write + state_d + n, carry, mask=mask_d)
            tl.atomic_add(dC_ptr + dBC_b + n * L + t, tl.sum(dy * hs, axis=0), mask=mask_t, sem="relaxed")
            tl.atomic_add(dB_ptr + dBC_b + n * L + t, tl.sum(du * gs, axis=0), mask=mask_t, sem="relaxed")
            v += B_n * gs
            # q_t = g_t a_t h_{t-1}, zero where a document starts (there h_t = x_t exactly).
            q = gs * (hs - x)
            aq += A_n[:, None] * q
            dA_n = tl.load(dA_ptr + read + state_d + n, mask=mask_d, other=0.0)
            tl.store(dA_ptr + write + state_d + n, dA_n + tl.sum(dt * q, axis=1), mask=mask_d)
        ddu = dt * v
        if HAS_D:
            ddu += Dv[:, None] * dy
        tl.store(du_b + offs_d[:, None] * s_dud + t[None, :] * s_dul, ddu.to(du_ptr.dtype.element_ty), mask=m2)
        ddt = u * v + aq
        if SOFTPLUS:
            ddt = ddt * tl.where(raw > 20.0, 1.0, tl.sigmoid(raw))
        ddt = tl.where(m2, ddt, 0.0)
        tl.store(ddelta_b + offs_d[:, None] * s_ddd + t[None, :] * s_ddl, ddt.to(ddelta_ptr.dtype.element_ty), mask=m2)
        if HAS_BIAS:
            dbias_acc += tl.sum(ddt, axis=1)
        tl.debug_barrier()
    row = pid_b * d_model + offs_d
    if HAS_D:
        tl.store(dD_ptr + row, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + row, dbias_acc, mask=mask_d)


@triton.jit
def _load_steps_tm(
    u_b, delta_b, seq_b, offs_d, mask_d, t, mask_t, s_ud, s_ul, s_dd, s_dl, s_sl, HAS_SEQ: tl.constexpr,
):
    """One tile's (T, BD) u and delta as stored, and the (T,) document starts. Steps past ``L`` (a whole
    tile past the end, too) are masked: the fused kernels load the next tile ahead of its turn."""
    m2 = mask_t[:, None] & mask_d[None, :]
    u = tl.load(u_b + t[:, None] * s_ul + offs_d[None, :] * s_ud, mask=m2, other=0.0)
    delta = tl.load(delta_b + t[:, None] * s_dl + offs_d[None, :] * s_dd, mask=m2, other=0.0)
    if HAS_SEQ:
        first = mask_t & (t > 0)
        cur = tl.load(seq_b + t * s_sl, mask=mask_t, other=0)
        prev = tl.load(seq_b + (t - 1) * s_sl, mask=first, other=0)
        starts = first & (cur != prev)
    else:
        starts = t < 0
    return u, delta, starts


@triton.jit
def _load_rows_tm(B_b, C_b, offs_n, mask_n, t, mask_t, s_Bn, s_Bl, s_Cn, s_Cl):
    """One tile's (T, BN) B and C as stored (zero past ``L`` and past N)."""
    mtn = mask_t[:, None] & mask_n[None, :]
    Bt = tl.load(B_b + t[:, None] * s_Bl + offs_n[None, :] * s_Bn, mask=mtn, other=0.0)
    Ct = tl.load(C_b + t[:, None] * s_Cl + offs_n[None, :] * s_Cn, mask=mtn, other=0.0)
    return Bt, Ct


@triton.jit
def _load_tile_tm(x_b, offs_d, mask_d, t, mask_t, s_xd, s_xl, ENABLED: tl.constexpr):
    """One tile's (T, BD) slice of a (b, d, l) tensor as stored; zeros when not ENABLED (nothing read)."""
    m2 = mask_t[:, None] & mask_d[None, :]
    if ENABLED:
        x = tl.load(x_b + t[:, None] * s_xl + offs_d[None, :] * s_xd, mask=m2, other=0.0)
    else:
        x = tl.where(m2, 0.0, 0.0)
    return x


@triton.jit
def _dt_tm(delta, bias, mask_t, SOFTPLUS: tl.constexpr, ACC: tl.constexpr):
    """(T, BD) delta + bias and Δ (0 past ``L``)."""
    raw = delta.to(ACC) + bias[None, :]
    if SOFTPLUS:
        dt = _softplus(raw)
    else:
        dt = raw
    return raw, tl.where(mask_t[:, None], dt, 0.0)


@triton.jit
def _fused_states(dt, du, A2, Bt, h_prev, starts, HAS_SEQ: tl.constexpr):
    """States (T, BD, BN) of every state index over a chunk from the (BD, BN) state before it; also a, x.
    Time is the first axis, so Triton's default layout keeps a thread's steps in its registers and
    spreads the state indices and channels over the lanes: the scan is mostly sequential in-thread."""
    a = tl.exp2(dt[:, :, None] * A2[None, :, :])
    if HAS_SEQ:
        a = tl.where(starts[:, None, None], 0.0, a)
    x = du[:, :, None] * Bt[:, None, :]
    acum, hs = tl.associative_scan((a, x), axis=0, combine_fn=_scan_combine)
    return tl.where(acum == 0.0, hs, hs + acum * h_prev[None, :, :]), a, x


@triton.jit
def _fused_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, seq_ptr,
    out_ptr, ypre_ptr, ckpt_ptr,
    d_model, dg, L, N,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_sb, s_sl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_SEQ: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr, CK: tl.constexpr,
):
    """Fused-state forward: every state index at once in (T, BD, BLOCK_N) tiles, one scan per tile, the
    (BD, BLOCK_N) state carried in registers. Grid, inputs and outputs as ``_selective_scan_fwd_kernel``,
    with a checkpoint every CK steps (T a multiple of CK)."""
    pid_d = tl.program_id(0)
    grp = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_c < dg
    offs_d = grp * dg + offs_c
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_t = tl.arange(0, T)
    mdn = mask_d[:, None] & mask_n[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    # Padded state indices get A = 0 and B = C = 0: a = 1, x = 0, no share of y.
    A2 = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mdn, other=0.0).to(ACC) * _LOG2E
    u_b, delta_b, z_b = u_ptr + pid_b * s_ub, delta_ptr + pid_b * s_db, z_ptr + pid_b * s_zb
    out_b, ypre_b = out_ptr + pid_b * s_ob, ypre_ptr + pid_b * s_ob
    B_b = B_ptr + pid_b * s_Bb + grp * s_Bg
    C_b = C_ptr + pid_b * s_Cb + grp * s_Cg
    seq_b = seq_ptr + pid_b * s_sb
    n_ckpt = tl.cdiv(L, CK)
    ckpt_dn = ckpt_ptr + (pid_b * d_model + offs_d)[:, None] * ((n_ckpt + 1) * N) + offs_n[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + (pid_b * d_model + offs_d)[:, None] * N + offs_n[None, :], mask=mdn, other=0.0).to(ACC)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
    tl.store(ckpt_dn, h, mask=mdn)
    # Each tile's inputs are loaded one turn ahead (into "next_*"), so that their latency hides behind
    # the previous tile's work.
    t = offs_t
    mask_t = t < L
    next_u, next_delta, next_starts = _load_steps_tm(
        u_b, delta_b, seq_b, offs_d, mask_d, t, mask_t, s_ud, s_ul, s_dd, s_dl, s_sl, HAS_SEQ
    )
    next_B, next_C = _load_rows_tm(B_b, C_b, offs_n, mask_n, t, mask_t, s_Bn, s_Bl, s_Cn, s_Cl)
    for c in range(tl.cdiv(L, T)):
        t = c * T + offs_t
        mask_t = t < L
        m2 = mask_t[:, None] & mask_d[None, :]
        u, delta, starts, Bt, Ct = next_u.to(ACC), next_delta, next_starts, next_B.to(ACC), next_C.to(ACC)
        t_next = t + T
        mask_next = t_next < L
        next_u, next_delta, next_starts = _load_steps_tm(
            u_b, delta_b, seq_b, offs_d, mask_d, t_next, mask_next, s_ud, s_ul, s_dd, s_dl, s_sl, HAS_SEQ
        )
        next_B, next_C = _load_rows_tm(B_b, C_b, offs_n, mask_n, t_next, mask_next, s_Bn, s_Bl, s_Cn, s_Cl)
        _raw, dt = _dt_tm(delta, bias, mask_t, SOFTPLUS, ACC)
        hs, _a, _x = _fused_states(dt, dt * u, A2, Bt, h, starts, HAS_SEQ)
        y = tl.sum(hs * Ct[:, None, :], axis=2)
        # Past the end a = 1 and x = 0, so the last step of each CK is the state after it (and the tile's
        # last, the state to carry); checkpoints past the last one are not stored.
        for k in tl.static_range(T // CK):
            h = tl.sum(tl.where(offs_t[:, None, None] == (k + 1) * CK - 1, hs, 0.0), axis=0)
            idx = c * (T // CK) + k + 1
            tl.store(ckpt_dn + idx * N, h, mask=mdn & (offs_n[None, :] * 0 + idx <= n_ckpt))
        if HAS_D:
            y += Dv[None, :] * u
        if HAS_Z:
            tl.store(ypre_b + t[:, None] * s_ol + offs_d[None, :] * s_od, y.to(ypre_ptr.dtype.element_ty), mask=m2)
            zt = tl.load(z_b + t[:, None] * s_zl + offs_d[None, :] * s_zd, mask=m2, other=0.0).to(ACC)
            y = y * zt * tl.sigmoid(zt)
        tl.store(out_b + t[:, None] * s_ol + offs_d[None, :] * s_od, y.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _fused_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, ckpt_ptr, ypre_ptr, dout_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh_ptr,
    d_model, dg, L, N,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_yb, s_yd, s_yl, s_gb, s_gd, s_gl,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_sb, s_sl,
    s_dub, s_dud, s_dul, s_ddb, s_ddd, s_ddl, s_dzb, s_dzd, s_dzl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SEQ: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
):
    """Fused-state backward, (T, BD, BLOCK_N) tiles as its forward. The adjoint carry a_{t+1} g_{t+1} and
    dA stay in registers: ``dh`` (b, d, N) holds d(last state) on entry and d(initial state) on exit,
    ``dA`` (b, d, N) gets each row's dA. Other outputs as ``_selective_scan_bwd_kernel``."""
    pid_d = tl.program_id(0)
    grp = tl.program_id(1)
    n_groups = tl.num_programs(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_c < dg
    offs_d = grp * dg + offs_c
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_t = tl.arange(0, T)
    mdn = mask_d[:, None] & mask_n[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mdn, other=0.0).to(ACC)
    dD_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    u_b, delta_b, z_b = u_ptr + pid_b * s_ub, delta_ptr + pid_b * s_db, z_ptr + pid_b * s_zb
    ypre_b, dout_b = ypre_ptr + pid_b * s_yb, dout_ptr + pid_b * s_gb
    du_b, ddelta_b, dz_b = du_ptr + pid_b * s_dub, ddelta_ptr + pid_b * s_ddb, dz_ptr + pid_b * s_dzb
    B_b = B_ptr + pid_b * s_Bb + grp * s_Bg
    C_b = C_ptr + pid_b * s_Cb + grp * s_Cg
    seq_b = seq_ptr + pid_b * s_sb
    # dB, dC buffers are contiguous (b, g, N, l).
    dBC_b = (pid_b * n_groups + grp) * N * L
    n_chunks = tl.cdiv(L, T)
    ckpt_dn = ckpt_ptr + (pid_b * d_model + offs_d)[:, None] * ((n_chunks + 1) * N) + offs_n[None, :]
    state_dn = (pid_b * d_model + offs_d)[:, None] * N + offs_n[None, :]
    # The adjoint carry in the layout of a reduction over time of the tiles, which it is in the loop.
    first = offs_t[:, None, None] == 0
    carry = tl.sum(tl.where(first, tl.load(dh_ptr + state_dn, mask=mdn, other=0.0)[None, :, :], 0.0), axis=0)
    ones = tl.full((T, BLOCK_D, BLOCK_N), 1.0, ACC)
    dA_acc = tl.zeros((T, BLOCK_D, BLOCK_N), dtype=ACC)
    # Each chunk's inputs are loaded one turn ahead (into "next_*"), as in the forward.
    t = (n_chunks - 1) * T + offs_t
    mask_t = t < L
    next_u, next_delta, next_starts = _load_steps_tm(
        u_b, delta_b, seq_b, offs_d, mask_d, t, mask_t, s_ud, s_ul, s_dd, s_dl, s_sl, HAS_SEQ
    )
    next_B, next_C = _load_rows_tm(B_b, C_b, offs_n, mask_n, t, mask_t, s_Bn, s_Bl, s_Cn, s_Cl)
    next_dy = _load_tile_tm(dout_b, offs_d, mask_d, t, mask_t, s_gd, s_gl, True)
    next_z = _load_tile_tm(z_b, offs_d, mask_d, t, mask_t, s_zd, s_zl, HAS_Z)
    next_y = _load_tile_tm(ypre_b, offs_d, mask_d, t, mask_t, s_yd, s_yl, HAS_Z)
    next_h = tl.load(ckpt_dn + (n_chunks - 1) * N, mask=mdn, other=0.0)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        t = c * T + offs_t
        mask_t = t < L
        m2 = mask_t[:, None] & mask_d[None, :]
        mtn = mask_t[:, None] & mask_n[None, :]
        u, delta, starts, Bt, Ct = next_u.to(ACC), next_delta, next_starts, next_B.to(ACC), next_C.to(ACC)
        dy, zt, y, h_prev = next_dy.to(ACC), next_z.to(ACC), next_y.to(ACC), next_h
        # The chunk before (none after the first: every step masked, nothing read).
        t_next = t - T
        mask_next = (t_next >= 0) & (t_next < L)
        next_u, next_delta, next_starts = _load_steps_tm(
            u_b, delta_b, seq_b, offs_d, mask_d, t_next, mask_next, s_ud, s_ul, s_dd, s_dl, s_sl, HAS_SEQ
        )
        next_B, next_C = _load_rows_tm(B_b, C_b, offs_n, mask_n, t_next, mask_next, s_Bn, s_Bl, s_Cn, s_Cl)
        next_dy = _load_tile_tm(dout_b, offs_d, mask_d, t_next, mask_next, s_gd, s_gl, True)
        next_z = _load_tile_tm(z_b, offs_d, mask_d, t_next, mask_next, s_zd, s_zl, HAS_Z)
        next_y = _load_tile_tm(ypre_b, offs_d, mask_d, t_next, mask_next, s_yd, s_yl, HAS_Z)
        next_h = tl.load(ckpt_dn + tl.maximum(c - 1, 0) * N, mask=mdn & (offs_n[None, :] * 0 + c > 0), other=0.0)
        raw, dt = _dt_tm(delta, bias, mask_t, SOFTPLUS, ACC)
        du = dt * u
        if HAS_Z:
            sig = tl.sigmoid(zt)
            # silu'(z) = σ(z) (1 + z (1 - σ(z)))
            dz = dy * y * sig * (1.0 + zt * (1.0 - sig))
            tl.store(dz_b + t[:, None] * s_dzl + offs_d[None, :] * s_dzd, dz.to(dz_ptr.dtype.element_ty), mask=m2)
            dy = dy * zt * sig
        if HAS_D:
            dD_acc += tl.sum(dy * u, axis=0)
        hs, a, x = _fused_states(dt, du, A * _LOG2E, Bt, h_prev, starts, HAS_SEQ)
        # dC first and a_t h_{t-1} = h_t - x_t (zero where a document starts, there h_t = x_t exactly):
        # the states are not needed past this point, which shortens their lives (registers).
        dBC = dBC_b + t[:, None] + offs_n[None, :] * L
        # One atomic per (t, n) and program: the block's channels are summed on chip first.
        tl.atomic_add(dC_ptr + dBC, tl.sum(dy[:, :, None] * hs, axis=1), mask=mtn, sem="relaxed")
        ah = hs - x
        s_acc, q_acc, _f = tl.associative_scan(
            (dy[:, :, None] * Ct[:, None, :], ones, a), axis=0, combine_fn=_adjoint_combine, reverse=True,
        )
        gs = tl.where(q_acc == 0.0, s_acc, s_acc + q_acc * carry[None, :, :])
        carry = tl.sum(tl.where(first, a * gs, 0.0), axis=0)
        tl.atomic_add(dB_ptr + dBC, tl.sum(du[:, :, None] * gs, axis=1), mask=mtn, sem="relaxed")
        # q_t = g_t a_t h_{t-1}
        q = gs * ah
        dA_acc += dt[:, :, None] * q
        v = tl.sum(Bt[:, None, :] * gs, axis=2)
        ddu = dt * v
        if HAS_D:
            ddu += Dv[None, :] * dy
        tl.store(du_b + t[:, None] * s_dul + offs_d[None, :] * s_dud, ddu.to(du_ptr.dtype.element_ty), mask=m2)
        ddt = u * v + tl.sum(A[None, :, :] * q, axis=2)
        if SOFTPLUS:
            ddt = ddt * tl.where(raw > 20.0, 1.0, tl.sigmoid(raw))
        ddt = tl.where(m2, ddt, 0.0)
        tl.store(ddelta_b + t[:, None] * s_ddl + offs_d[None, :] * s_ddd, ddt.to(ddelta_ptr.dtype.element_ty), mask=m2)
        if HAS_BIAS:
            dbias_acc += tl.sum(ddt, axis=0)
    # (Taken through one more reduction: a store of ``carry`` itself would change its layout in the loop.)
    tl.store(dh_ptr + state_dn, tl.sum(tl.where(first, carry[None, :, :], 0.0), axis=0), mask=mdn)
    tl.store(dA_ptr + state_dn, tl.sum(dA_acc, axis=0), mask=mdn)
    row = pid_b * d_model + offs_d
    if HAS_D:
        tl.store(dD_ptr + row, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + row, dbias_acc, mask=mask_d)


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _strides(x: torch.Tensor | None, dims: int) -> tuple[int, ...]:
    return (0,) * dims if x is None else tuple(x.stride())


def _block_d(dg: int, block_d: int) -> int:
    """Channels per program: the configured block, shrunk (power of 2) for groups with few channels."""
    return max(1, min(block_d, 1 << max(0, dg - 1).bit_length()))


def _fused_warps(warps: int, block_d: int, n: int) -> int:
    """Warps for a fused-state program: no more than its (channel, state) pairs fill, so that a shrunk
    channel block does not spread the time axis over warps (the scan would cross them)."""
    return max(1, min(warps, block_d * triton.next_power_of_2(n) // 32))


def _forward(u, delta, A, B, C, D, z, bias, h0, seq_idx, softplus, acc, cfg):
    b, d, l = u.shape
    g, n = B.shape[1], B.shape[2]
    dg = d // g
    n_chunks = triton.cdiv(l, cfg.chunk)
    # empty_like keeps u's layout: time-major in, time-major out, as the chunked backend.
    out = torch.empty_like(u)
    ypre = torch.empty_like(u) if z is not None else None
    ckpt = u.new_empty(b, d, n_chunks + 1, n, dtype=acc)
    block_d = _block_d(dg, cfg.fwd_block_d)
    grid = (triton.cdiv(dg, block_d), g, b)
    dummy = u
    if cfg.fused_states:
        kernel, shape = _fused_fwd_kernel, {"BLOCK_N": triton.next_power_of_2(n), "CK": cfg.chunk}
        warps = _fused_warps(cfg.fwd_warps, block_d, n)
    else:
        kernel, shape, warps = _selective_scan_fwd_kernel, {}, cfg.fwd_warps
    kernel[grid](
        u, delta, A, B, C, dummy if D is None else D, dummy if z is None else z,
        dummy if bias is None else bias, dummy if h0 is None else h0, dummy if seq_idx is None else seq_idx,
        out, dummy if ypre is None else ypre, ckpt,
        d, dg, l, n,
        *u.stride(), *delta.stride(), *_strides(z, 3), *out.stride(),
        *B.stride(), *C.stride(), *_strides(seq_idx, 2),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, HAS_H0=h0 is not None,
        HAS_SEQ=seq_idx is not None, SOFTPLUS=softplus, ACC=_tl_dtype(acc),
        BLOCK_D=block_d, T=cfg.fwd_chunk or cfg.chunk, num_warps=warps, **shape,
    )
    return out, ypre, ckpt


def _backward(u, delta, A, B, C, D, z, bias, seq_idx, ckpt, ypre, dout, dlast, softplus, acc, cfg):
    b, d, l = u.shape
    g, n = B.shape[1], B.shape[2]
    dg = d // g
    n_chunks = ckpt.shape[2] - 1
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = None if z is None else torch.empty_like(z)
    dB = torch.zeros(b, g, n, l, dtype=acc, device=u.device)
    dC = torch.zeros(b, g, n, l, dtype=acc, device=u.device)
    dD = None if D is None else u.new_empty(b, d, dtype=acc)
    dbias = None if bias is None else u.new_empty(b, d, dtype=acc)
    block_d = _block_d(dg, cfg.bwd_block_d)
    grid = (triton.cdiv(dg, block_d), g, b)
    dummy = u
    if cfg.fused_states:
        # One (b, d, n) tensor each: the kernel keeps the running values in registers.
        dh = u.new_empty(b, d, n, dtype=acc)
        dh.copy_(dlast)
        dA = u.new_empty(b, d, n, dtype=acc)
        kernel, last, shape, slot = _fused_bwd_kernel, (), {"BLOCK_N": triton.next_power_of_2(n)}, ()
        warps = _fused_warps(cfg.bwd_warps, block_d, n)
    else:
        dh = u.new_empty(2, b, d, n, dtype=acc)
        dh[0] = dlast
        dA = u.new_zeros(2, b, d, n, dtype=acc)
        kernel, last, shape, slot = _selective_scan_bwd_kernel, (n_chunks % 2,), {}, (b * d * n,)
        warps = cfg.bwd_warps
    kernel[grid](
        u, delta, A, B, C, dummy if D is None else D, dummy if z is None else z,
        dummy if bias is None else bias, dummy if seq_idx is None else seq_idx, ckpt,
        dummy if ypre is None else ypre, dout,
        du, ddelta, dummy if dz is None else dz, dB, dC, dA,
        dummy if dD is None else dD, dummy if dbias is None else dbias, dh,
        d, dg, l, n, *slot,
        *u.stride(), *delta.stride(), *_strides(z, 3), *_strides(ypre, 3), *dout.stride(),
        *B.stride(), *C.stride(), *_strides(seq_idx, 2),
        *du.stride(), *ddelta.stride(), *_strides(dz, 3),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None,
        HAS_SEQ=seq_idx is not None, SOFTPLUS=softplus, ACC=_tl_dtype(acc),
        BLOCK_D=block_d, T=cfg.chunk, num_warps=warps, **shape,
    )
    # The unfused kernel leaves its results in one of two slots; last == () picks the whole tensor.
    dA, dh = dA[last], dh[last]
    return (
        du, ddelta, dA.sum(0), dB, dC, None if dD is None else dD.sum(0), dz,
        None if dbias is None else dbias.sum(0), dh,
    )


class _SelectiveScanTriton(torch.autograd.Function):
    """The whole op; inputs in their own dtypes (converted in the kernels), B and C as (b, g, n, l)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias, h0, seq_idx, softplus, acc, cfg):
        out, ypre, ckpt = _forward(u, delta, A, B, C, D, z, bias, h0, seq_idx, softplus, acc, cfg)
        ctx.save_for_backward(u, delta, A, B, C, D, z, bias, h0, seq_idx, ckpt, ypre)
        ctx.softplus, ctx.acc, ctx.cfg = softplus, acc, cfg
        # The state after the last chunk, as its own (b, d, n) tensor.
        return out, ckpt[:, :, -1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, bias, h0, seq_idx, ckpt, ypre = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _backward(
            u, delta, A, B, C, D, z, bias, seq_idx, ckpt, ypre, dout, dlast, ctx.softplus, ctx.acc, ctx.cfg
        )

        def cast(grad, like):
            return None if like is None else grad.to(like.dtype)

        return (
            du, ddelta, cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), dz, cast(dbias, bias),
            cast(dh0, h0), None, None, None, None,
        )


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    config: ScanConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``selective_scan_reference`` (validated arguments, B and C as (b, g, n, l)).

    u, delta, z (b, d, l) and B, C (b, g, n, l) may have any strides (time-major views included; ``out``
    keeps u's layout). The state and all sums are float32 (float64 when an input is float64). Extra
    memory: the (b, d, cdiv(l, chunk), n) checkpoint tensor saved for backward, and float32 (b, g, n, l)
    dB, dC buffers during backward. ``config`` sets the launch shape (default: ``TRAINING_CONFIG`` when a
    gradient will be needed, else ``DEFAULT_CONFIG``).
    """
    acc = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    cfg = config or (TRAINING_CONFIG if needs_grad else DEFAULT_CONFIG)
    # Small per-channel tensors are read with unit strides; (b, d, n) states as contiguous rows.
    A, D, delta_bias = (None if t is None else t.contiguous() for t in (A, D, delta_bias))
    h0 = None if initial_state is None else initial_state.contiguous()
    out, last = _SelectiveScanTriton.apply(
        u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, delta_softplus, acc, cfg
    )
    return out, last
