"""Triton kernels of the fused decode steps: the convolution update folded into the state update.

A decode step at small batch is bound by kernel launches, not bytes, so each kernel here does a whole
chain for one token:

* Mamba-2, one kernel: a program owns a (BLOCK_P, N) tile of one head of one row. It runs the convolution
  update of its head's x channels and of its group's B and C channels in registers (window shift, taps,
  bias, SiLU), then the state update and y. x channels belong to one program each, so their new window is
  written by their owner. B and C channels are shared by every program of the group (``heads_per_group`` ×
  p-blocks): each recomputes them from the *old* window, so no program may overwrite that window before all
  have read it. Each program takes a ticket from a per-(row, group) counter after its reads (atomic,
  acquire-release); the one that draws the last ticket writes the group's new B/C window and resets the
  counter to zero for the next step. No ordering between programs is assumed.
* Mamba-1, one kernel in two phases (x_proj sums over every channel, so every convolution output is needed
  before any Δ): phase-1 programs give partial sums of x_proj over blocks of channels (each recomputes its
  block's convolution and writes nothing to the state); phase-2 programs wait until all partials are
  published, add them, apply the optional norms and dt_proj, recompute their channels' convolution, write
  their new window, update the state and gate y. Phases go by ticket (start order), so a waiting program
  only waits for programs that started before it: no deadlock, however many programs are resident.

Everything is computed in float32; the new window entries are stored in the conv state's dtype. Launch
settings (the Mamba-2 kernel's head rows per program, programmatic dependent launch) come from
:mod:`ssmkit.ops.decode_launch`; under PDL a program waits for the previous kernel before anything else.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ssmkit.ops import decode_launch
from ssmkit.ops._pdl import pdl_trigger, pdl_wait
from ssmkit.ops.decode_step.inputs import (
    COUNTERS_ATTR,
    ConvStepInputs2,
    InnerStepInputs,
)
from ssmkit.ops.state_update.triton import SOFTPLUS_THRESHOLD, _log1p


@triton.jit
def _conv_taps(w_ptr, cb_ptr, ch, mask, w_c, w_k, S: tl.constexpr, W: tl.constexpr, HAS_CB: tl.constexpr,
               BLOCK_S: tl.constexpr):
    """The convolution's parameters for channels ``ch`` (float32): the taps of the window's entries
    (BLOCK_C, BLOCK_S), the new input's tap and the bias (BLOCK_C,). Parameters only: never written while
    decoding, so a kernel may load them before its programmatic-dependent-launch wait."""
    j = tl.arange(0, BLOCK_S)
    # Window entry j is tap k = j - (S - W + 1) (the last W - 1 entries); the new input is tap W - 1.
    k = j - (S - W + 1)
    tap = mask[:, None] & ((k >= 0) & (k < W - 1))[None, :]
    wt = tl.load(w_ptr + ch[:, None] * w_c + k[None, :] * w_k, mask=tap, other=0.0).to(tl.float32)
    w_new = tl.load(w_ptr + ch * w_c + (W - 1) * w_k, mask=mask, other=0.0).to(tl.float32)
    cb = tl.zeros_like(w_new)
    if HAS_CB:
        cb = tl.load(cb_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    return wt, w_new, cb


@triton.jit
def _conv_channels(x_ptr, conv_ptr, wt, w_new, cb, ch, mask, x_c, cs_c, cs_k,
                   S: tl.constexpr, BLOCK_S: tl.constexpr):
    """SiLU(convolution) of channels ``ch`` for the new token (float32), and their new window (old window
    shifted left, the new input appended; in the state's dtype). x_ptr / conv_ptr point at the row; wt, w_new,
    cb are ``_conv_taps``'s."""
    j = tl.arange(0, BLOCK_S)
    v = tl.load(x_ptr + ch * x_c, mask=mask, other=0.0)
    in_win = mask[:, None] & (j < S)[None, :]
    old = tl.load(conv_ptr + ch[:, None] * cs_c + j[None, :] * cs_k, mask=in_win, other=0.0)
    acc = tl.sum(old.to(tl.float32) * wt, axis=1) + v.to(tl.float32) * w_new + cb
    acc = acc / (1.0 + tl.exp(-acc))
    shifted = tl.load(conv_ptr + ch[:, None] * cs_c + (j[None, :] + 1) * cs_k,
                      mask=mask[:, None] & (j + 1 < S)[None, :], other=0.0)
    new = tl.where((j == S - 1)[None, :], v[:, None].to(shifted.dtype), shifted)
    return acc, new


@triton.jit
def _store_window(conv_ptr, ch, mask, new, cs_c, cs_k, S: tl.constexpr, BLOCK_S: tl.constexpr):
    j = tl.arange(0, BLOCK_S)
    tl.store(conv_ptr + ch[:, None] * cs_c + j[None, :] * cs_k, new, mask=mask[:, None] & (j < S)[None, :])


@triton.jit
def _gpu_fence(FENCE: tl.constexpr):
    """0, after a GPU-scope acquire-release fence of the calling thread (FENCE: off in Triton's interpreter,
    which runs programs one after another and has no inline assembly)."""
    zero = 0
    if FENCE:
        zero += tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                          is_pure=False, pack=1)
    return zero


@triton.jit
def _step_size(dt, bias, lo, hi, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr):
    dt += bias
    if SOFTPLUS:
        dt = tl.where(dt <= SOFTPLUS_THRESHOLD, _log1p(tl.exp(dt)), dt)
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, lo), hi)
    return dt


@triton.jit
def _conv_ssm_step_kernel(
    x_ptr, conv_ptr, w_ptr, cb_ptr, sync_ptr, state_ptr, dt_ptr, A_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    p, n, dim, heads_per_group, ngroups, programs_per_group, dt_lo, dt_hi,
    x_b, x_c, cs_b, cs_c, cs_k, w_c, w_k,
    s_b, s_h, s_p, s_n, dt_b, dt_h, D_h, D_p, z_b, z_h, z_p, y_b, y_h, y_p,
    S: tl.constexpr, W: tl.constexpr, HAS_CB: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, SYNC: tl.constexpr,
    FENCE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    pdl_trigger(PDL)
    pid_p = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2).to(tl.int64)
    group = head // heads_per_group
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < p
    mask_n = offs_n < n
    x_row, conv_row = x_ptr + row * x_b, conv_ptr + row * cs_b
    ch_x = head * p + offs_p
    ch_B = dim + group * n + offs_n
    ch_C = ch_B + ngroups * n
    # The parameters before the wait (under PDL they load while the in_proj GEMV before this kernel runs). Not A:
    # callers compute it as -exp(A_log) (decode_A on its first call, mamba_ssm's and transformers' layers every
    # step), a kernel that may be the one right before this; one scalar, read after the wait.
    wt_x, wn_x, cb_x = _conv_taps(w_ptr, cb_ptr, ch_x, mask_p, w_c, w_k, S, W, HAS_CB, BLOCK_S)
    wt_B, wn_B, cb_B = _conv_taps(w_ptr, cb_ptr, ch_B, mask_n, w_c, w_k, S, W, HAS_CB, BLOCK_S)
    wt_C, wn_C, cb_C = _conv_taps(w_ptr, cb_ptr, ch_C, mask_n, w_c, w_k, S, W, HAS_CB, BLOCK_S)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + head).to(tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + head * D_h + offs_p * D_p, mask=mask_p, other=0.0).to(tl.float32)
    pdl_wait(PDL)
    A = tl.load(A_ptr + head).to(tl.float32)
    x, win_x = _conv_channels(x_row, conv_row, wt_x, wn_x, cb_x, ch_x, mask_p, x_c, cs_c, cs_k, S, BLOCK_S)
    B, win_B = _conv_channels(x_row, conv_row, wt_B, wn_B, cb_B, ch_B, mask_n, x_c, cs_c, cs_k, S, BLOCK_S)
    C, win_C = _conv_channels(x_row, conv_row, wt_C, wn_C, cb_C, ch_C, mask_n, x_c, cs_c, cs_k, S, BLOCK_S)
    dt = _step_size(tl.load(dt_ptr + row * dt_b + head * dt_h).to(tl.float32), bias, dt_lo, dt_hi, SOFTPLUS, CLAMP)
    mask = mask_p[:, None] & mask_n[None, :]
    state_ptrs = state_ptr + row * s_b + head * s_h + offs_p[:, None] * s_p + offs_n[None, :] * s_n
    state = tl.load(state_ptrs, mask=mask, other=0.0).to(tl.float32)
    state = state * tl.exp(dt * A) + (dt * x)[:, None] * B[None, :]
    tl.store(state_ptrs, state.to(state_ptr.dtype.element_ty), mask=mask)
    y = tl.sum(state * C[None, :], axis=1)
    if HAS_D:
        y += x * D
    if HAS_Z:
        z = tl.load(z_ptr + row * z_b + head * z_h + offs_p * z_p, mask=mask_p, other=0.0).to(tl.float32)
        y *= z / (1.0 + tl.exp(-z))
    tl.store(y_ptr + row * y_b + head * y_h + offs_p * y_p, y.to(y_ptr.dtype.element_ty), mask=mask_p)

    # Every window read above is done before any is written (in this program; across programs: the ticket).
    tl.debug_barrier()
    _store_window(conv_row, ch_x, mask_p, win_x, cs_c, cs_k, S, BLOCK_S)
    if SYNC:
        counter = sync_ptr + row * ngroups + group
        # Every thread's window reads are done at GPU scope before the one ticket of the program is taken.
        one = 1 + _gpu_fence(FENCE)
        tl.debug_barrier()
        ticket = tl.atomic_add(counter, one, sem="acq_rel")
        if ticket == programs_per_group - 1:
            # The last ticket: every program of the group has read the old window; this one writes the new.
            zero = _gpu_fence(FENCE)
            _store_window(conv_row, ch_B, mask_n, win_B, cs_c, cs_k, S, BLOCK_S)
            _store_window(conv_row, ch_C, mask_n, win_C, cs_c, cs_k, S, BLOCK_S)
            tl.atomic_xchg(counter, zero, sem="relaxed")
    else:
        _store_window(conv_row, ch_B, mask_n, win_B, cs_c, cs_k, S, BLOCK_S)
        _store_window(conv_row, ch_C, mask_n, win_C, cs_c, cs_k, S, BLOCK_S)


def _fence_on() -> bool:
    """Fences are compiled in except in Triton's interpreter (no inline assembly; programs run in turn)."""
    return os.environ.get("TRITON_INTERPRET", "0") != "1"


def _sync_counters(conv_state: torch.Tensor, numel: int) -> torch.Tensor:
    """The zeroed int32 counters of the step kernels' tickets, kept on the conv state tensor (each kernel
    leaves them at zero). One set per state tensor: steps of different caches (which may run on different
    streams) never share counters; a step that passes a new view of its state each time gets new counters."""
    counters = getattr(conv_state, COUNTERS_ATTR, None)
    if counters is None or counters.numel() < numel:
        counters = torch.zeros(numel, dtype=torch.int32, device=conv_state.device)
        setattr(conv_state, COUNTERS_ATTR, counters)
    return counters


def conv_ssm_step_triton(inputs: ConvStepInputs2) -> torch.Tensor:
    """Triton path of :func:`ssmkit.ops.decode_step.conv1d_selective_state_update`: y (b, h, p) in xBC's dtype."""
    xBC, conv_state, weight, bias, state, dt, A, D, z, dt_bias, ngroups, softplus, dt_limit = inputs.unpack()
    b, h, p, n = state.shape
    S, W = conv_state.shape[-1], weight.shape[-1]
    block_n = triton.next_power_of_2(n)
    block_p = max(1, min(triton.next_power_of_2(p), 4096 // block_n, decode_launch.current().step_block_p))
    p_blocks = triton.cdiv(p, block_p)
    pdl, launch = decode_launch.pdl_launch(xBC.device)
    programs_per_group = p_blocks * (h // ngroups)
    sync = programs_per_group > 1
    counters = _sync_counters(conv_state, b * ngroups) if sync else dt
    D2 = None if D is None else (D[:, None].expand(h, p) if D.dim() == 1 else D)
    y = torch.empty(b, h, p, dtype=xBC.dtype, device=xBC.device)
    lo, hi = dt_limit
    clamp = (lo, hi) != (0.0, float("inf"))
    zs = (0, 0, 0) if z is None else z.stride()
    _conv_ssm_step_kernel[(p_blocks, b, h)](
        # Absent inputs pass dt as a placeholder pointer (never read).
        xBC, conv_state, weight, dt if bias is None else bias.contiguous(), counters, state, dt, A.contiguous(),
        dt if D2 is None else D2, dt if z is None else z, dt if dt_bias is None else dt_bias.contiguous(), y,
        p, n, h * p, h // ngroups, ngroups, programs_per_group, lo, hi if hi != float("inf") else 3.0e38,
        *xBC.stride(), *conv_state.stride(), *weight.stride(),
        *state.stride(), *dt.stride(), *((0, 0) if D2 is None else D2.stride()), *zs, *y.stride(),
        S=S, W=W, HAS_CB=bias is not None, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=softplus, CLAMP=clamp, SYNC=sync, FENCE=_fence_on(), BLOCK_P=block_p, BLOCK_N=block_n,
        BLOCK_S=triton.next_power_of_2(S), PDL=pdl, num_warps=4 if block_p * block_n >= 2048 else 2, **launch,
    )
    return y


@triton.jit
def _x_proj_partial(x_row, conv_row, w_ptr, cb_ptr, xw_ptr, part, role, d, rows, n_rblocks,
                    x_c, cs_c, cs_k, w_c, w_k, xw_r, xw_c, pt_s,
                    S: tl.constexpr, W: tl.constexpr, HAS_CB: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C1: tl.constexpr, BLOCK_S: tl.constexpr):
    """Phase 1, role (row block, channel split): part[split, r] = Σ_{c in split} x_proj[r, c] · conv(x)[c]."""
    offs_r = (role % n_rblocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rows
    split = role // n_rblocks
    ch = split * BLOCK_C1 + tl.arange(0, BLOCK_C1)
    mask_c = ch < d
    wt, w_new, cb = _conv_taps(w_ptr, cb_ptr, ch, mask_c, w_c, w_k, S, W, HAS_CB, BLOCK_S)
    x, _ = _conv_channels(x_row, conv_row, wt, w_new, cb, ch, mask_c, x_c, cs_c, cs_k, S, BLOCK_S)
    wt = tl.load(xw_ptr + offs_r[:, None] * xw_r + ch[None, :] * xw_c, mask=mask_r[:, None] & mask_c[None, :],
                 other=0.0).to(tl.float32)
    tl.store(part + split * pt_s + offs_r, tl.sum(wt * x[None, :], axis=1), mask=mask_r)


@triton.jit
def _summed(part_ptr, offs, mask, splits, pt_s, rms_ptr, eps, count, NORM: tl.constexpr, BLOCK_SPLIT: tl.constexpr):
    """One slice of x_proj's output, the partial sums added (then RMS-normalised by rms_ptr's weights)."""
    sp = tl.arange(0, BLOCK_SPLIT)
    v = tl.sum(tl.load(part_ptr + sp[:, None] * pt_s + offs[None, :], mask=(sp < splits)[:, None] & mask[None, :],
                       other=0.0), axis=0)
    if NORM:
        v = v / tl.sqrt(tl.sum(v * v, axis=0) / count + eps) * tl.load(rms_ptr + offs, mask=mask, other=0.0).to(
            tl.float32)
    return v


@triton.jit
def _inner_state(x_row, conv_row, w_ptr, cb_ptr, part, counters, n_phase1, dtw_ptr, dtb_ptr, dtn_ptr, bn_ptr, cn_ptr,
                 state_row, A_ptr, D_ptr, y_row, role, d, n, rank, splits, eps,
                 x_c, cs_c, cs_k, w_c, w_k, pt_s, dtw_c, dtw_r, s_c, s_n, A_c, A_n, y_c,
                 S: tl.constexpr, W: tl.constexpr, HAS_CB: tl.constexpr, HAS_DTB: tl.constexpr,
                 DT_NORM: tl.constexpr, B_NORM: tl.constexpr, C_NORM: tl.constexpr, HAS_D: tl.constexpr,
                 SOFTPLUS: tl.constexpr, FENCE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_SPLIT: tl.constexpr):
    """Phase 2, role (channel block): x_proj's sums, the norms, dt_proj, the convolution again, the state update
    and the gated y of those channels, and their new conv window. Everything that does not depend on x_proj
    (the convolution, the state, the parameters) is loaded before waiting for the phase-1 programs, so those
    loads overlap phase 1 instead of following it."""
    ch = role * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = ch < d
    wt, w_new, cb = _conv_taps(w_ptr, cb_ptr, ch, mask_c, w_c, w_k, S, W, HAS_CB, BLOCK_S)
    x, win = _conv_channels(x_row, conv_row, wt, w_new, cb, ch, mask_c, x_c, cs_c, cs_k, S, BLOCK_S)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    wdt = tl.load(dtw_ptr + ch[:, None] * dtw_c + offs_r[None, :] * dtw_r, mask=mask_c[:, None] & mask_r[None, :],
                  other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_DTB:
        bias = tl.load(dtb_ptr + ch, mask=mask_c, other=0.0).to(tl.float32)
    mask = mask_c[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + ch[:, None] * A_c + offs_n[None, :] * A_n, mask=mask, other=0.0).to(tl.float32)
    state_ptrs = state_row + ch[:, None] * s_c + offs_n[None, :] * s_n
    state = tl.load(state_ptrs, mask=mask, other=0.0).to(tl.float32)
    Dx = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_D:
        Dx = x * tl.load(D_ptr + ch, mask=mask_c, other=0.0).to(tl.float32)
    z = tl.load(x_row + (d + ch) * x_c, mask=mask_c, other=0.0).to(tl.float32)

    while tl.atomic_add(counters + 1, 0, sem="acquire") < n_phase1:
        pass
    part += _gpu_fence(FENCE)  # every thread acquires before reading the partial sums
    dt_low = _summed(part, offs_r, mask_r, splits, pt_s, dtn_ptr, eps, rank, DT_NORM, BLOCK_SPLIT)
    B = _summed(part + rank, offs_n, mask_n, splits, pt_s, bn_ptr, eps, n, B_NORM, BLOCK_SPLIT)
    C = _summed(part + rank + n, offs_n, mask_n, splits, pt_s, cn_ptr, eps, n, C_NORM, BLOCK_SPLIT)
    dt = _step_size(tl.sum(wdt * dt_low[None, :], axis=1), bias, 0.0, 0.0, SOFTPLUS, False)
    state = state * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * B[None, :]
    tl.store(state_ptrs, state.to(state_row.dtype.element_ty), mask=mask)
    y = tl.sum(state * C[None, :], axis=1) + Dx
    y *= z / (1.0 + tl.exp(-z))
    tl.store(y_row + ch * y_c, y.to(y_row.dtype.element_ty), mask=mask_c)
    tl.debug_barrier()
    _store_window(conv_row, ch, mask_c, win, cs_c, cs_k, S, BLOCK_S)


@triton.jit
def _inner_step_kernel(
    x_ptr, conv_ptr, w_ptr, cb_ptr, xw_ptr, part_ptr, sync_ptr, dtw_ptr, dtb_ptr, dtn_ptr, bn_ptr, cn_ptr,
    state_ptr, A_ptr, D_ptr, y_ptr,
    d, n, rank, splits, n_rblocks, n_phase1, n_phase2, eps,
    x_b, x_c, cs_b, cs_c, cs_k, w_c, w_k, xw_r, xw_c, pt_b, pt_s, dtw_c, dtw_r, s_b, s_c, s_n, A_c, A_n, y_b, y_c,
    S: tl.constexpr, W: tl.constexpr, HAS_CB: tl.constexpr, HAS_DTB: tl.constexpr, DT_NORM: tl.constexpr,
    B_NORM: tl.constexpr, C_NORM: tl.constexpr, HAS_D: tl.constexpr, SOFTPLUS: tl.constexpr, FENCE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C1: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_RANK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    """The whole Mamba-1 step of one row in two phases. Roles go by ticket (the order programs start), not by
    program id: the first ``n_phase1`` tickets compute x_proj's partial sums, the others wait for all of them
    and then update their channels. A waiting program only ever waits for programs that started before it,
    so the step completes whatever the number of programs resident at once. Counters per row: tickets,
    finished partials, finished updates; the last update resets all three for the next step."""
    pdl_trigger(PDL)
    pdl_wait(PDL)
    row = tl.program_id(1).to(tl.int64)
    counters = sync_ptr + row * 3
    x_row, conv_row, part = x_ptr + row * x_b, conv_ptr + row * cs_b, part_ptr + row * pt_b
    ticket = tl.atomic_add(counters, 1, sem="relaxed")
    if ticket < n_phase1:
        _x_proj_partial(x_row, conv_row, w_ptr, cb_ptr, xw_ptr, part, ticket, d, n + n + rank, n_rblocks,
                        x_c, cs_c, cs_k, w_c, w_k, xw_r, xw_c, pt_s, S, W, HAS_CB, BLOCK_R, BLOCK_C1, BLOCK_S)
        # Publish the partial sums (every thread fences at GPU scope), then count this role done.
        one = 1 + _gpu_fence(FENCE)
        tl.debug_barrier()
        tl.atomic_add(counters + 1, one, sem="release")
    else:
        _inner_state(x_row, conv_row, w_ptr, cb_ptr, part, counters, n_phase1, dtw_ptr, dtb_ptr, dtn_ptr, bn_ptr,
                     cn_ptr, state_ptr + row * s_b, A_ptr, D_ptr, y_ptr + row * y_b, ticket - n_phase1, d, n, rank,
                     splits, eps, x_c, cs_c, cs_k, w_c, w_k, pt_s, dtw_c, dtw_r, s_c, s_n, A_c, A_n, y_c,
                     S, W, HAS_CB, HAS_DTB, DT_NORM, B_NORM, C_NORM, HAS_D, SOFTPLUS, FENCE, BLOCK_C, BLOCK_N,
                     BLOCK_RANK, BLOCK_S, BLOCK_SPLIT)
        one = 1 + _gpu_fence(FENCE)
        tl.debug_barrier()
        if tl.atomic_add(counters + 2, one, sem="acq_rel") == n_phase2 - 1:
            # Every ticket is drawn and every waiter is past its wait: reset for the next step.
            tl.atomic_xchg(counters, 0, sem="relaxed")
            tl.atomic_xchg(counters + 1, 0, sem="relaxed")
            tl.atomic_xchg(counters + 2, 0, sem="relaxed")


def inner_step_triton(inputs: InnerStepInputs) -> torch.Tensor:
    """Triton path of :func:`ssmkit.ops.decode_step.mamba_inner_step`: y (b, d) in xz's dtype, one kernel."""
    (xz, conv_state, weight, bias, x_proj_weight, dt_proj_weight, dt_proj_bias, state, A, D, dt_rms, b_rms, c_rms,
     eps, softplus) = inputs.unpack()
    b, d, n = state.shape
    rank = dt_proj_weight.shape[1]
    rows = rank + 2 * n
    S, W = conv_state.shape[-1], weight.shape[-1]
    # Phase 1: blocks of 16 output rows of x_proj by 256 channels; phase 2: blocks of channels of the state.
    block_r, block_c1 = 16, min(256, triton.next_power_of_2(d))
    splits, n_rblocks = triton.cdiv(d, block_c1), triton.cdiv(rows, block_r)
    block_n, block_rank = triton.next_power_of_2(n), triton.next_power_of_2(rank)
    # About 4K elements in the (channels, N) and (channels, R) tiles of a phase-2 program.
    block_c = max(1, min(64, 4096 // max(block_n, block_rank), triton.next_power_of_2(d)))
    n_phase1, n_phase2 = splits * n_rblocks, triton.cdiv(d, block_c)
    partials = torch.empty(b, splits, rows, dtype=torch.float32, device=xz.device)
    counters = _sync_counters(conv_state, 3 * b)
    y = torch.empty(b, d, dtype=xz.dtype, device=xz.device)
    cb = weight if bias is None else bias.contiguous()
    placeholder = partials
    pdl, launch = decode_launch.pdl_launch(xz.device)
    _inner_step_kernel[(n_phase1 + n_phase2, b)](
        xz, conv_state, weight, cb, x_proj_weight, partials, counters, dt_proj_weight,
        placeholder if dt_proj_bias is None else dt_proj_bias.contiguous(),
        *(placeholder if t is None else t.contiguous() for t in (dt_rms, b_rms, c_rms)),
        state, A, placeholder if D is None else D.contiguous(), y,
        d, n, rank, splits, n_rblocks, n_phase1, n_phase2, eps,
        *xz.stride(), *conv_state.stride(), *weight.stride(), *x_proj_weight.stride(), *partials.stride()[:2],
        *dt_proj_weight.stride(), *state.stride(), *A.stride(), *y.stride(),
        S=S, W=W, HAS_CB=bias is not None, HAS_DTB=dt_proj_bias is not None, DT_NORM=dt_rms is not None,
        B_NORM=b_rms is not None, C_NORM=c_rms is not None, HAS_D=D is not None, SOFTPLUS=softplus,
        FENCE=_fence_on(), BLOCK_R=block_r, BLOCK_C1=block_c1, BLOCK_C=block_c, BLOCK_N=block_n,
        BLOCK_RANK=block_rank, BLOCK_S=triton.next_power_of_2(S),
        BLOCK_SPLIT=triton.next_power_of_2(splits), PDL=pdl, num_warps=4, **launch,
    )
    return y
