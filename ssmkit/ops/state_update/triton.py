"""Triton kernel for one decode step of a selective SSM (``selective_state_update``), state in place.

Works on the full Mamba-2 form of ``reference.py``: state (b, h, p, n) and per-head broadcast views.
One program owns a (BLOCK_P, n) tile of one head of one row: it reads the tile of the state once,
updates it, writes it back over itself and reduces it against C. A decode step reads and writes the
whole state once, so the step is bound by memory bandwidth; nothing but the state is re-read.

Mamba-1 states (b, d, n) arrive here as (b, d, 1, n); they are regrouped into (b, g, d / g, n) (the
channels of one B/C group as the "head dim"), a view of the same memory, so a tile holds BLOCK_P
channels instead of one.

Compact per-head inputs (dt (b, h, 1), A (h, 1, 1), D (h, 1)) are expanded to full shapes with zero
strides, so the kernel reads every input through strides and never copies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmkit.ops.state_update.inputs import StepInputs

# Softplus returns its input above this value, as torch.nn.functional.softplus.
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)


@triton.jit
def _log1p(u):
    """log(1 + u) accurate for small u (Goldberg's trick: the rounding of 1 + u is divided out)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, slot_ptr,
    p, n, heads_per_group, dt_lo, dt_hi, n_slots, pad_slot_id,
    s_b, s_h, s_p, s_n,
    x_b, x_h, x_p,
    dt_b, dt_h, dt_p,
    A_h, A_p, A_n,
    B_b, B_g, B_n,
    C_b, C_g, C_n,
    D_h, D_p,
    z_b, z_h, z_p,
    bias_h, bias_p,
    y_b, y_h, y_p,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    CLAMP: tl.constexpr, HAS_SLOTS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_p = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2).to(tl.int64)
    group = head // heads_per_group
    ct = tl.float32
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < p
    mask_n = offs_n < n
    mask = mask_p[:, None] & mask_n[None, :]
    slot = row
    if HAS_SLOTS:
        slot = tl.load(slot_ptr + row).to(tl.int64)
        # Padding rows (and, under CUDA-graph capture where the host cannot check, out-of-range
        # slots) give y = 0 and leave the pool alone.
        if (slot < 0) | (slot == pad_slot_id) | (slot >= n_slots):
            tl.store(y_ptr + row * y_b + head * y_h + offs_p * y_p, tl.zeros([BLOCK_P], dtype=ct).to(
                y_ptr.dtype.element_ty), mask=mask_p)
            return

    x = tl.load(x_ptr + row * x_b + head * x_h + offs_p * x_p, mask=mask_p, other=0.0).to(ct)
    dt = tl.load(dt_ptr + row * dt_b + head * dt_h + offs_p * dt_p, mask=mask_p, other=0.0).to(ct)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + head * bias_h + offs_p * bias_p, mask=mask_p, other=0.0).to(ct)
    if SOFTPLUS:
        dt = tl.where(dt <= SOFTPLUS_THRESHOLD, _log1p(tl.exp(dt)), dt)
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
    A = tl.load(A_ptr + head * A_h + offs_p[:, None] * A_p + offs_n[None, :] * A_n, mask=mask, other=0.0).to(ct)
    B = tl.load(B_ptr + row * B_b + group * B_g + offs_n * B_n, mask=mask_n, other=0.0).to(ct)
    C = tl.load(C_ptr + row * C_b + group * C_g + offs_n * C_n, mask=mask_n, other=0.0).to(ct)

    state_ptrs = state_ptr + slot * s_b + head * s_h + offs_p[:, None] * s_p + offs_n[None, :] * s_n
    state = tl.load(state_ptrs, mask=mask, other=0.0).to(ct)
    state = state * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * B[None, :]
    tl.store(state_ptrs, state.to(state_ptr.dtype.element_ty), mask=mask)

    y = tl.sum(state * C[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + head * D_h + offs_p * D_p, mask=mask_p, other=0.0).to(ct)
    if HAS_Z:
        z = tl.load(z_ptr + row * z_b + head * z_h + offs_p * z_p, mask=mask_p, other=0.0).to(ct)
        y *= z / (1.0 + tl.exp(-z))
    tl.store(y_ptr + row * y_b + head * y_h + offs_p * y_p, y.to(y_ptr.dtype.element_ty), mask=mask_p)


def _strides(t: torch.Tensor | None, rank: int) -> tuple[int, ...]:
    return (0,) * rank if t is None else tuple(t.stride())


def selective_state_update_triton(
    inputs: StepInputs, state_batch_indices: torch.Tensor | None = None, pad_slot_id: int = -1
) -> torch.Tensor:
    """Same arguments and result as ``selective_state_update_reference`` (the full (b, h, p, n) form).

    ``state`` (any floating dtype but float64) is updated in place; y (b, h, p) comes back in x's
    dtype. The step is computed in float32 (float64 inputs are refused by the dispatcher: the torch
    step handles them). With ``state_batch_indices`` (b,) the state is a pool (s, h, p, n) of slots.
    """
    state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit = inputs.unpack()
    _, h, p, n = state.shape
    b = x.shape[0]
    g = B.shape[1]
    if p == 1 and h > g:
        # Mamba-1: the channels of a group become one head of p = h / g channels (views only).
        hg = h // g
        state = state.squeeze(2).unflatten(1, (g, hg))
        x, dt = x.squeeze(2).unflatten(1, (g, hg)), dt.squeeze(2).unflatten(1, (g, hg))
        A = A.squeeze(1).unflatten(0, (g, hg))
        D = None if D is None else D.squeeze(1).unflatten(0, (g, hg))
        z = None if z is None else z.squeeze(2).unflatten(1, (g, hg))
        dt_bias = None if dt_bias is None else dt_bias.squeeze(1).unflatten(0, (g, hg))
        _, h, p, n = state.shape
    dt = dt.expand(b, h, p)
    A = A.expand(h, p, n)
    D = None if D is None else D.expand(h, p)
    dt_bias = None if dt_bias is None else dt_bias.expand(h, p)
    y = torch.empty(b, h, p, dtype=x.dtype, device=x.device)
    block_n = triton.next_power_of_2(n)
    # About 4K state elements per program: enough work per program, and many programs at batch 1.
    block_p = max(1, min(triton.next_power_of_2(p), 4096 // block_n, 64))
    grid = (triton.cdiv(p, block_p), b, h)
    lo, hi = dt_limit
    clamp = (lo, hi) != (0.0, float("inf"))
    _state_update_kernel[grid](
        # Absent inputs pass x as a placeholder pointer (never read: HAS_* is False).
        state, x, dt, A, B, C, x if D is None else D, x if z is None else z, x if dt_bias is None else dt_bias, y,
        x if state_batch_indices is None else state_batch_indices,
        p, n, h // g, lo, hi if hi != float("inf") else 3.0e38, state.shape[0], pad_slot_id,
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
        *_strides(D, 2), *_strides(z, 3), *_strides(dt_bias, 2), *y.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        CLAMP=clamp, HAS_SLOTS=state_batch_indices is not None, BLOCK_P=block_p, BLOCK_N=block_n,
        num_warps=4 if block_p * block_n >= 2048 else 2,
    )
    return y
