"""Chunk-tile kernels of the Triton selective scan (launched by ``triton.py``).

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
"""

import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _program_channels(dg, bias_ptr, D_ptr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """This program's channels (grid axis 0: blocks of BLOCK_D within the group of axis 1): their offsets
    within the group and in d, the mask of those past ``dg``, and their delta_bias and D in ACC (zeros where
    absent)."""
    offs_c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_c < dg
    offs_d = tl.program_id(1) * dg + offs_c
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    else:
        Dv = tl.zeros((BLOCK_D,), dtype=ACC)
    return offs_c, mask_d, offs_d, bias, Dv


@triton.jit
def _gated_out(y, Du, out_b, ypre_b, z_b, o_off, z_off, m2, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
               ACC: tl.constexpr):
    """A tile's output: y + D·u (``Du``: D broadcast times u), with HAS_Z the ungated y kept in ypre for the
    backward and y · silu(z) stored; ``o_off`` / ``z_off``: the tile's offsets into out (and ypre) and z."""
    if HAS_D:
        y += Du
    if HAS_Z:
        tl.store(ypre_b + o_off, y.to(ypre_b.dtype.element_ty), mask=m2)
        zt = tl.load(z_b + z_off, mask=m2, other=0.0).to(ACC)
        y = y * zt * tl.sigmoid(zt)
    tl.store(out_b + o_off, y.to(out_b.dtype.element_ty), mask=m2)


@triton.jit
def _gated_dout(dout_b, z_b, ypre_b, dz_b, offs_d, t, m2, s_gd, s_gl, s_zd, s_zl, s_yd, s_yl, s_dzd, s_dzl,
                HAS_Z: tl.constexpr, ACC: tl.constexpr):
    """A (channels, steps) tile's gradient of the ungated y from dout; with HAS_Z also stores dz for
    out = y · silu(z) (y read back from ypre)."""
    dy = tl.load(dout_b + offs_d[:, None] * s_gd + t[None, :] * s_gl, mask=m2, other=0.0).to(ACC)
    if HAS_Z:
        zt = tl.load(z_b + offs_d[:, None] * s_zd + t[None, :] * s_zl, mask=m2, other=0.0).to(ACC)
        y = tl.load(ypre_b + offs_d[:, None] * s_yd + t[None, :] * s_yl, mask=m2, other=0.0).to(ACC)
        sig = tl.sigmoid(zt)
        # silu'(z) = σ(z) (1 + z (1 - σ(z)))
        dz = dy * y * sig * (1.0 + zt * (1.0 - sig))
        tl.store(dz_b + offs_d[:, None] * s_dzd + t[None, :] * s_dzl, dz.to(dz_b.dtype.element_ty), mask=m2)
        dy = dy * zt * sig
    return dy


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
    grp = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_c, mask_d, offs_d, bias, Dv = _program_channels(dg, bias_ptr, D_ptr, HAS_BIAS, HAS_D, ACC, BLOCK_D)
    offs_t = tl.arange(0, T)
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
        _gated_out(y, Dv[:, None] * u, out_b, ypre_b, z_b, offs_d[:, None] * s_od + t[None, :] * s_ol,
                   offs_d[:, None] * s_zd + t[None, :] * s_zl, m2, HAS_D, HAS_Z, ACC)
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
    grp = tl.program_id(1)
    n_groups = tl.num_programs(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_c, mask_d, offs_d, bias, Dv = _program_channels(dg, bias_ptr, D_ptr, HAS_BIAS, HAS_D, ACC, BLOCK_D)
    offs_t = tl.arange(0, T)
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
        dy = _gated_dout(dout_b, z_b, ypre_b, dz_b, offs_d, t, m2, s_gd, s_gl, s_zd, s_zl, s_yd, s_yl, s_dzd, s_dzl,
                         HAS_Z, ACC)
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
