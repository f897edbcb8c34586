"""Time-wise kernels of the Triton selective scan (launched by ``triton.py``; chosen by ``ScanConfig.timewise``).

Laid out as mamba_ssm's CUDA kernel: a program owns ``BD`` channels (one or two) of one group of one batch
row and walks the sequence in long tiles of ``T`` steps (256 .. 2048) spread over all of its threads, each
thread a run of consecutive steps (Triton's layout for a (BD, T) tile loaded along time; 8 steps, one bf16
vector, in the candidate launches). Per tile the per-channel work is done once (loads of u and delta, bias,
softplus, Δu); then the program LOOPS OVER THE STATE INDEX n: rows B_n, C_n of the tile (loaded straight
into the tile's layout, one state ahead of their turn), the pairs (exp(Δ A_n), Δ u B_n), one associative
scan along time (in-thread runs, warp shuffles, a shared-memory step across warps) with the state carried
in from the previous tile entering the first step, and ``y += C_n h`` in each thread's own registers: no
sum across lanes per element, one state index's tiles live at a time.

Math, scan operator and padding rule (Δ = 0 past ``l``: a = 1, x = 0, so a tile's last column is the state
to carry) are those of ``triton_kernels.py``. A state crosses tiles through the checkpoint tensor
(b, d, l / T + 1, n), written once per tile and state (at T = 2048, 1/128 of a float32 u, as mamba_ssm's);
a barrier ends every tile, after which the next one reads what its program's threads stored.

The backward walks the tiles in reverse; per tile and n it recomputes the states from the checkpoint, solves
the adjoint g_t = c_t + a_{t+1} g_{t+1} (c_t = C_t dy_t; a_{t+1} from Δ read one step ahead) from the
adjoint carried in from the later tile, accumulates the sums over n of du and dΔ in registers, writes the
tile's dA share per (channel, n) (summed over tiles by the caller) and adds dB, dC per (n, t) with atomics
(the block's channels summed first). The adjoint is a reverse scan, which Triton 3.6 lowers by moving every
operand and result register across the lanes (five shuffles each); where threads hold runs of 4 or 8 steps
(``RUN``) each thread walks its run back by hand instead and one reverse scan carries a single value a
thread across the threads (``triton_runs.py``). The carry a_0 g_0 crosses tiles through a (b, d, l / T + 1, n) scratch
tensor, one slot per tile boundary, written once and read by the next tile only (no races).
"""

import triton
import triton.language as tl

from ssmkit.ops.selective_scan.triton_kernels import (
    _LOG2E,
    _gated_dout,
    _gated_out,
    _program_channels,
    _scan_combine,
    _softplus,
    _steps,
)
from ssmkit.ops.selective_scan.triton_runs import _adjoint_by_runs


@triton.jit
def _tile_states(dt, du, A2_n, B_n, h_prev, first, starts, HAS_SEQ: tl.constexpr):
    """States h_t (BD, T) of one state index over a tile from the (BD,) state before it, and a = exp(Δ A_n).
    The carried state enters as part of the first step's input (x_0 + a_0 h_prev), so that the scan's
    cumulative decays are dead once it ends (registers); where a_0 = 0 (a document starts) it is dropped
    outright, so that inf/NaN of the previous document cannot leak in."""
    a = tl.exp2(dt * A2_n[:, None])
    if HAS_SEQ:
        a = tl.where(starts[None, :], 0.0, a)
    x = du * B_n
    x = tl.where(first & (a != 0.0), x + a * h_prev[:, None], x)
    _acum, hs = tl.associative_scan((a, x), axis=1, combine_fn=_scan_combine)
    return hs, a


@triton.jit
def _next_steps(delta_b, seq_b, bias, offs_d, mask_d, t, s_dd, s_dl, s_sl, L,
                HAS_SEQ: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr):
    """Δ_{t+1} (BD, T) of every step t of a tile (0 past ``L``, where a = 1) and whether a document starts
    at t + 1: the decay a_{t+1} of the adjoint g_t = c_t + a_{t+1} g_{t+1} without shifting a tile."""
    mask_n = (t + 1) < L
    raw = tl.load(delta_b + offs_d[:, None] * s_dd + (t + 1)[None, :] * s_dl,
                  mask=mask_d[:, None] & mask_n[None, :], other=0.0).to(ACC) + bias[:, None]
    if SOFTPLUS:
        dt = _softplus(raw)
    else:
        dt = raw
    dt = tl.where(mask_n[None, :], dt, 0.0)
    if HAS_SEQ:
        cur = tl.load(seq_b + t * s_sl, mask=mask_n, other=0)
        nxt = tl.load(seq_b + (t + 1) * s_sl, mask=mask_n, other=0)
        starts = mask_n & (cur != nxt)
    else:
        starts = t < 0
    return dt, starts


@triton.jit
def _sum2(a1, b1, a2, b2):
    return a1 + a2, b1 + b2


@triton.jit
def _rows(B_b, C_b, n, t_B, t_C, s_Bn, s_Cn, mt, more):
    """Rows n of B and C over the tile as (BD, T) tiles in the input dtype (nothing read where the (BD,)
    ``more`` is false)."""
    m = mt & more[:, None]
    return tl.load(B_b + n * s_Bn + t_B, mask=m, other=0.0), tl.load(C_b + n * s_Cn + t_C, mask=m, other=0.0)


@triton.jit
def _tw_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr,
    out_ptr, ypre_ptr, ckpt_ptr,
    d_model, dg, L, N,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_sb, s_sl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SEQ: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, T: tl.constexpr,
):
    """Grid (cdiv(dg, BLOCK_D), g, b). Writes out (b, d, l), the ungated y (same layout as out) when HAS_Z,
    and ckpt (b, d, cdiv(l, T) + 1, N) in ACC: the state before each tile, then the last state. Its first
    slot holds the initial state (or 0) on entry, written by the caller: loaded and stored in the kernel,
    it cost 34 registers a thread more (T 1024, 4 warps, sm_90)."""
    grp = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_c, mask_d, offs_d, bias, Dv = _program_channels(dg, bias_ptr, D_ptr, HAS_BIAS, HAS_D, ACC, BLOCK_D)
    offs_t = tl.arange(0, T)
    u_b, delta_b, z_b = u_ptr + pid_b * s_ub, delta_ptr + pid_b * s_db, z_ptr + pid_b * s_zb
    out_b, ypre_b = out_ptr + pid_b * s_ob, ypre_ptr + pid_b * s_ob
    B_b = B_ptr + pid_b * s_Bb + grp * s_Bg
    C_b = C_ptr + pid_b * s_Cb + grp * s_Cg
    seq_b = seq_ptr + pid_b * s_sb
    n_tiles = tl.cdiv(L, T)
    ckpt_d = ckpt_ptr + (pid_b * d_model + offs_d) * ((n_tiles + 1) * N)
    A_d = A_ptr + offs_d * N
    first = offs_t[None, :] == 0
    for c in range(n_tiles):
        t = c * T + offs_t
        mask_t = t < L
        m2 = mask_d[:, None] & mask_t[None, :]
        # B and C rows as (BD, T) tiles (each row repeated over the channels): loaded straight into the
        # tiles' layout, where a (T,) row would need a layout change for every n.
        mt = (offs_c >= 0)[:, None] & mask_t[None, :]
        t_B, t_C = offs_c[:, None] * 0 + t[None, :] * s_Bl, offs_c[:, None] * 0 + t[None, :] * s_Cl
        u, _raw, dt, starts = _steps(
            u_b, delta_b, seq_b, bias, offs_d, mask_d, t, mask_t, s_ud, s_ul, s_dd, s_dl, s_sl,
            HAS_SEQ, SOFTPLUS, ACC,
        )
        du = dt * u
        y = tl.zeros((BLOCK_D, T), dtype=ACC)
        # State n's inputs are loaded during state n - 1's scan ("next_*").
        next_B, next_C = _rows(B_b, C_b, 0, t_B, t_C, s_Bn, s_Cn, mt, offs_c >= 0)
        next_h = tl.load(ckpt_d + c * N, mask=mask_d, other=0.0)
        next_A = tl.load(A_d, mask=mask_d, other=0.0)
        for n in range(N):
            B_n, C_n, h_prev, A2_n = next_B.to(ACC), next_C.to(ACC), next_h, next_A.to(ACC) * _LOG2E
            # (BD,) rather than a scalar: the interpreter wants boolean tensors in masks.
            more = offs_c * 0 + n + 1 < N
            next_B, next_C = _rows(B_b, C_b, n + 1, t_B, t_C, s_Bn, s_Cn, mt, more)
            next_h = tl.load(ckpt_d + c * N + n + 1, mask=mask_d & more, other=0.0)
            next_A = tl.load(A_d + n + 1, mask=mask_d & more, other=0.0)
            hs, _a = _tile_states(dt, du, A2_n, B_n, h_prev, first, starts, HAS_SEQ)
            y += hs * C_n
            # The last column (a sum picks it: a masked store of the tile would change its layout first).
            h_last = tl.sum(tl.where(offs_t[None, :] == T - 1, hs, 0.0), axis=1)
            tl.store(ckpt_d + (c + 1) * N + n, h_last, mask=mask_d)
        _gated_out(y, Dv[:, None] * u, out_b, ypre_b, z_b, offs_d[:, None] * s_od + t[None, :] * s_ol,
                   offs_d[:, None] * s_zd + t[None, :] * s_zl, m2, HAS_D, HAS_Z, ACC)
        # The next tile reads the states stored above by other threads.
        tl.debug_barrier()


@triton.jit
def _tw_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, ckpt_ptr, ypre_ptr, dout_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh_ptr,
    d_model, dg, L, N,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_yb, s_yd, s_yl, s_gb, s_gd, s_gl,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_sb, s_sl,
    s_dub, s_dud, s_dul, s_ddb, s_ddd, s_ddl, s_dzb, s_dzd, s_dzl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SEQ: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, T: tl.constexpr, EVEN_T: tl.constexpr, RUN: tl.constexpr,
):
    """Grid as the forward. ``dh`` (b, d, cdiv(l, T) + 1, N): slot k holds the adjoint carried into tile
    k - 1 (a_{t+1} g_{t+1} at its last step); the last slot is d(last state) on entry, slot 0 d(initial
    state) on exit. ``dA`` (b, d, cdiv(l, T), N) gets each tile's dA share. Writes du, ddelta, dz (b, d, l),
    dD and d(delta_bias) per row (b, d); adds dB, dC (b, g, N, l) (zeroed by the caller) with atomics."""
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
    n_tiles = tl.cdiv(L, T)
    row = pid_b * d_model + offs_d
    ckpt_d = ckpt_ptr + row * ((n_tiles + 1) * N)
    dh_d = dh_ptr + row * ((n_tiles + 1) * N)
    dA_d = dA_ptr + row * (n_tiles * N)
    A_d = A_ptr + offs_d * N
    first, last = offs_t[None, :] == 0, offs_t[None, :] == T - 1
    for i in range(n_tiles):
        c = n_tiles - 1 - i
        t = c * T + offs_t
        if EVEN_T:
            # Every tile is whole: masks along time are constants. (Not in the forward: there ptxas then
            # keeps more loads in flight, 127 registers a thread against 92 at T 1024, 4 warps, sm_90.)
            mask_t = tl.full((T,), 1, tl.int1)
        else:
            mask_t = t < L
        m2 = mask_d[:, None] & mask_t[None, :]
        mt = (offs_c >= 0)[:, None] & mask_t[None, :]
        t_B, t_C = offs_c[:, None] * 0 + t[None, :] * s_Bl, offs_c[:, None] * 0 + t[None, :] * s_Cl
        u, _raw, dt, starts = _steps(
            u_b, delta_b, seq_b, bias, offs_d, mask_d, t, mask_t, s_ud, s_ul, s_dd, s_dl, s_sl,
            HAS_SEQ, SOFTPLUS, ACC,
        )
        du = dt * u
        dy = _gated_dout(dout_b, z_b, ypre_b, dz_b, offs_d, t, m2, s_gd, s_gl, s_zd, s_zl, s_yd, s_yl, s_dzd, s_dzl,
                         HAS_Z, ACC)
        if HAS_D:
            dD_acc += tl.sum(dy * u, axis=1)
        if not RUN:
            dt_next, starts_next = _next_steps(
                delta_b, seq_b, bias, offs_d, mask_d, t, s_dd, s_dl, s_sl, L, HAS_SEQ, SOFTPLUS, ACC
            )
        # Σ_n B_n g_n and Σ_n A_n q_n, the sums over the state of du and dΔ.
        v = tl.zeros((BLOCK_D, T), dtype=ACC)
        aq = tl.zeros((BLOCK_D, T), dtype=ACC)
        # State n's inputs are loaded during state n - 1's scans ("next_*").
        next_B, next_C = _rows(B_b, C_b, 0, t_B, t_C, s_Bn, s_Cn, mt, offs_c >= 0)
        next_h = tl.load(ckpt_d + c * N, mask=mask_d, other=0.0)
        next_g = tl.load(dh_d + (c + 1) * N, mask=mask_d, other=0.0)
        next_A = tl.load(A_d, mask=mask_d, other=0.0)
        for n in range(N):
            B_n, C_n, h_prev, carry, A_n = next_B.to(ACC), next_C.to(ACC), next_h, next_g, next_A.to(ACC)
            # (BD,) rather than a scalar: the interpreter wants boolean tensors in masks.
            more = offs_c * 0 + n + 1 < N
            next_B, next_C = _rows(B_b, C_b, n + 1, t_B, t_C, s_Bn, s_Cn, mt, more)
            next_h = tl.load(ckpt_d + c * N + n + 1, mask=mask_d & more, other=0.0)
            next_g = tl.load(dh_d + (c + 1) * N + n + 1, mask=mask_d & more, other=0.0)
            next_A = tl.load(A_d + n + 1, mask=mask_d & more, other=0.0)
            hs, a = _tile_states(dt, du, A_n * _LOG2E, B_n, h_prev, first, starts, HAS_SEQ)
            dBC = dBC_b + n * L + t
            # dC first: the states are then only needed as a_t h_{t-1} = h_t - x_t (0 where a document
            # starts, there h_t = x_t exactly).
            tl.atomic_add(dC_ptr + dBC, tl.sum(dy * hs, axis=0), mask=mask_t, sem="relaxed")
            ah = hs - du * B_n
            # g_t = c_t + a_{t+1} g_{t+1}. The adjoint carried in from the later tile (a_T g_T) enters as
            # part of the last step's c, as the state does in the forward scan.
            c_n = dy * C_n
            c_n = tl.where(last, c_n + carry[:, None], c_n)
            if RUN:
                gs = _adjoint_by_runs(a, c_n, RUN)
            else:
                # The affine pairs (a_{t+1}, c_t) scanned from the end: two operands where the (S, Q, F)
                # triples of the chunk kernels have three (a reverse scan moves each across the lanes twice).
                a_next = tl.exp2(dt_next * A_n[:, None] * _LOG2E)
                if HAS_SEQ:
                    a_next = tl.where(starts_next, 0.0, a_next)
                _prod, gs = tl.associative_scan((a_next, c_n), axis=1, combine_fn=_scan_combine, reverse=True)
            tl.atomic_add(dB_ptr + dBC, tl.sum(du * gs, axis=0), mask=mask_t, sem="relaxed")
            v += B_n * gs
            q = gs * ah
            aq += A_n[:, None] * q
            # The adjoint to carry into the earlier tile, a_0 g_0 (none past a document start there), and
            # the tile's dA share, in one reduction.
            carry_out, dA_n = tl.reduce(
                (tl.where(first & (a != 0.0), a * gs, 0.0), dt * q), axis=1, combine_fn=_sum2
            )
            tl.store(dh_d + c * N + n, carry_out, mask=mask_d)
            tl.store(dA_d + c * N + n, dA_n, mask=mask_d)
        ddu = dt * v
        if HAS_D:
            ddu += Dv[:, None] * dy
        tl.store(du_b + offs_d[:, None] * s_dud + t[None, :] * s_dul, ddu.to(du_ptr.dtype.element_ty), mask=m2)
        # u and delta + bias read again (cache hits) rather than kept in registers through the state loop.
        u = tl.load(u_b + offs_d[:, None] * s_ud + t[None, :] * s_ul, mask=m2, other=0.0).to(ACC)
        ddt = u * v + aq
        if SOFTPLUS:
            raw = tl.load(delta_b + offs_d[:, None] * s_dd + t[None, :] * s_dl, mask=m2, other=0.0).to(ACC)
            raw += bias[:, None]
            ddt = ddt * tl.where(raw > 20.0, 1.0, tl.sigmoid(raw))
        ddt = tl.where(m2, ddt, 0.0)
        tl.store(ddelta_b + offs_d[:, None] * s_ddd + t[None, :] * s_ddl, ddt.to(ddelta_ptr.dtype.element_ty), mask=m2)
        if HAS_BIAS:
            dbias_acc += tl.sum(ddt, axis=1)
        # The next (earlier) tile reads the adjoint carries stored above by other threads.
        tl.debug_barrier()
    if HAS_D:
        tl.store(dD_ptr + row, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + row, dbias_acc, mask=mask_d)
