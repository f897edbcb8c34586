"""Fused-state kernels of the Triton selective scan (launched by ``triton.py``); the math and the
checkpoint tensor are those of ``triton_kernels.py``.

Chosen by ``ScanConfig.fused_states``. A program holds
every state index at once in (T, BD, N) tiles, time first, so that Triton's default layout gives each
thread all T steps of one (channel, state) pair and spreads channels and states over the lanes. One scan
per chunk is then sequential in registers; the states, the adjoint carry and dA stay in registers
across chunks (no global round trips, no barriers); y, du and dΔ are sums over the lanes of the state
axis, dB and dC over the channel axis (then one atomic per (n, t) and program). Each chunk's inputs
are loaded one chunk ahead. The backward's registers limit T to about 16 (a checkpoint every 16 steps:
at N 16 as large as u, in bfloat16 for bfloat16 u, twice that in float32); the forward may walk longer
tiles (``fwd_chunk``) and still write a checkpoint every ``chunk`` steps.
"""

import triton
import triton.language as tl

from ssmkit.ops.selective_scan.triton_kernels import (
    _LOG2E,
    _adjoint_combine,
    _gated_out,
    _program_channels,
    _scan_combine,
    _softplus,
)


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
    out_ptr, ypre_ptr, ckpt_ptr, last_ptr,
    d_model, dg, L, N,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_sb, s_sl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_SEQ: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr, CK: tl.constexpr,
):
    """Fused-state forward: every state index at once in (T, BD, BLOCK_N) tiles, one scan per tile, the
    (BD, BLOCK_N) state carried in registers. Grid, inputs and outputs as ``_selective_scan_fwd_kernel``,
    with a checkpoint every CK steps (T a multiple of CK), in ckpt's dtype (bfloat16 or ACC), and the last
    state (b, d, N) in ACC at ``last_ptr``."""
    grp = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    _offs_c, mask_d, offs_d, bias, Dv = _program_channels(dg, bias_ptr, D_ptr, HAS_BIAS, HAS_D, ACC, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_t = tl.arange(0, T)
    mdn = mask_d[:, None] & mask_n[None, :]
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
    ckpt_ty = ckpt_ptr.dtype.element_ty
    tl.store(ckpt_dn, h.to(ckpt_ty), mask=mdn)
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
            tl.store(ckpt_dn + idx * N, h.to(ckpt_ty), mask=mdn & (offs_n[None, :] * 0 + idx <= n_ckpt))
        _gated_out(y, Dv[None, :] * u, out_b, ypre_b, z_b, t[:, None] * s_ol + offs_d[None, :] * s_od,
                   t[:, None] * s_zl + offs_d[None, :] * s_zd, m2, HAS_D, HAS_Z, ACC)
    # Past the end the state passes through unchanged: the last tile's last step is the last state.
    tl.store(last_ptr + (pid_b * d_model + offs_d)[:, None] * N + offs_n[None, :], h, mask=mdn)


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
    grp = tl.program_id(1)
    n_groups = tl.num_programs(1)
    pid_b = tl.program_id(2).to(tl.int64)
    _offs_c, mask_d, offs_d, bias, Dv = _program_channels(dg, bias_ptr, D_ptr, HAS_BIAS, HAS_D, ACC, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_t = tl.arange(0, T)
    mdn = mask_d[:, None] & mask_n[None, :]
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
        dy, zt, y, h_prev = next_dy.to(ACC), next_z.to(ACC), next_y.to(ACC), next_h.to(ACC)
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
