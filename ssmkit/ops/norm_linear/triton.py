"""Triton kernel for a (gated) RMS norm feeding a linear layer, for the few rows of a decode step.

At batch 1 a decode step's matmuls are matrix-vector products and each costs about as much as its
launch; folding the norm in front of them (and the residual add behind) removes two launches per
matmul. One program computes ``BLOCK_N`` output features for every row (at most ``MAX_ROWS``): it walks
the input row(s) once per norm group for the mean square, then again to normalise, round to the
weight's dtype and reduce against its ``(BLOCK_N, K)`` slab of the weight. The input is re-read by every
program (a few KB, from L2); the weight, which is what the step is bound by, is read once in all.

The products are reduced on CUDA cores in float32 (no tensor cores: at these row counts the kernel is
bound by reading the weight, and float32 weights then get exact float32 sums, not TF32 ones).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 16


@triton.jit
def _norm_linear_kernel(
    x_ptr, z_ptr, nw_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, n_groups, group_size, eps,
    x_m, x_k, z_m, z_k, w_n, w_k, r_m, r_n, o_m, o_n,
    HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    w_dtype = w_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, n_groups):
        start = g * group_size
        # Pass 1: the group's mean square (of x, or of x * silu(z) when the gate comes first).
        ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, group_size, BLOCK_K):
            in_group = k0 + tl.arange(0, BLOCK_K) < group_size
            offs_k = start + k0 + tl.arange(0, BLOCK_K)
            mask = mask_m[:, None] & in_group[None, :]
            h = tl.load(x_ptr + offs_m[:, None] * x_m + offs_k[None, :] * x_k, mask=mask, other=0.0).to(tl.float32)
            if HAS_Z and not NORM_BEFORE_GATE:
                zz = tl.load(z_ptr + offs_m[:, None] * z_m + offs_k[None, :] * z_k, mask=mask, other=0.0)
                zz = zz.to(tl.float32)
                h *= zz * tl.sigmoid(zz)
            ss += tl.sum(h * h, axis=1)
        rstd = 1.0 / tl.sqrt(ss / group_size + eps)
        # Pass 2: normalise, round as the unfused layer would, and reduce against the weight slab.
        for k0 in range(0, group_size, BLOCK_K):
            in_group = k0 + tl.arange(0, BLOCK_K) < group_size
            offs_k = start + k0 + tl.arange(0, BLOCK_K)
            mask = mask_m[:, None] & in_group[None, :]
            h = tl.load(x_ptr + offs_m[:, None] * x_m + offs_k[None, :] * x_k, mask=mask, other=0.0).to(tl.float32)
            if HAS_Z:
                zz = tl.load(z_ptr + offs_m[:, None] * z_m + offs_k[None, :] * z_k, mask=mask, other=0.0)
                zz = zz.to(tl.float32)
                gate = zz * tl.sigmoid(zz)
                if not NORM_BEFORE_GATE:
                    h *= gate
            nw = tl.load(nw_ptr + offs_k, mask=in_group, other=0.0).to(tl.float32)
            normed = h * rstd[:, None] * nw[None, :]
            if HAS_Z and NORM_BEFORE_GATE:
                normed *= gate
            normed = normed.to(w_dtype).to(tl.float32)
            w = tl.load(w_ptr + offs_n[:, None] * w_n + offs_k[None, :] * w_k,
                        mask=mask_n[:, None] & in_group[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(normed[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(w_dtype).to(tl.float32)[None, :]
    out = acc.to(w_dtype)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RES:
        res = tl.load(res_ptr + offs_m[:, None] * r_m + offs_n[None, :] * r_n, mask=mask, other=0.0)
        out = res.to(out_ptr.dtype.element_ty) + out.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_m[:, None] * o_m + offs_n[None, :] * o_n, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_linear_triton(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None,
    eps: float,
    group_size: int | None,
    norm_before_gate: bool,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """Same arguments and result as ``rms_norm_linear_ref``, for x (m, k) with few rows (the dispatcher's MAX_ROWS), no autograd."""
    m, k = x.shape
    n = weight.shape[0]
    group_size = group_size or k
    out_dtype = weight.dtype if residual is None else torch.promote_types(residual.dtype, weight.dtype)
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    block_m = triton.next_power_of_2(m)
    # About 4K products in flight per program whatever the row count: registers stay bounded.
    block_k = max(16, min(triton.next_power_of_2(group_size), 4096 // (block_m * BLOCK_N)))
    placeholder = x  # absent inputs: never read (HAS_* is False)
    _norm_linear_kernel[(triton.cdiv(n, BLOCK_N),)](
        x, placeholder if z is None else z, norm_weight, weight, placeholder if bias is None else bias,
        placeholder if residual is None else residual, out,
        m, n, k // group_size, group_size, eps,
        *x.stride(), *(x.stride() if z is None else z.stride()), *weight.stride(),
        *((0, 0) if residual is None else residual.stride()), *out.stride(),
        HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=block_k, num_warps=4,
    )
    return out
