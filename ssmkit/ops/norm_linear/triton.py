"""Triton kernel for a (gated) RMS norm feeding a linear layer, for the few rows of a decode step.

At batch 1 a decode step's matmuls are matrix-vector products that read a few MB of weights; they are
bound by how many loads are in flight, not by arithmetic. So each program owns ``BLOCK_N`` output
features and reads their whole ``(BLOCK_N, K)`` weight slab in one go (no loop over K: a loop would
put one memory latency per iteration on the critical path), with enough programs (hundreds) to keep
every SM streaming. Per row it loads the input once, takes the norm statistics from registers,
normalises, rounds to the weight's dtype as the unfused layer does, and reduces against the slab;
the bias and the residual add are applied before the single store. The input row is re-read by every
program (a few KB, from L2); the weight, which bounds the step, is read once in all.

The products are reduced on CUDA cores in float32 (no tensor cores at one to eight rows; float32
weights get exact float32 sums, not TF32 ones).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmkit.ops.norm_linear import MAX_K
from ssmkit.ops.norm_linear.inputs import NormLinearInputs


@triton.jit
def _norm_linear_kernel(
    x_ptr, z_ptr, nw_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    N, K, n_groups, group_size, eps,
    x_m, x_k, z_m, z_k, w_n, w_k, r_m, r_n, o_m, o_n,
    HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n, mask_k = offs_n < N, offs_k < K
    w_dtype = w_ptr.dtype.element_ty
    w = tl.load(w_ptr + offs_n[:, None] * w_n + offs_k[None, :] * w_k,
                mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
    nw = tl.load(nw_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(w_dtype).to(tl.float32)
    group = offs_k // group_size
    for m in tl.static_range(ROWS):
        h = tl.load(x_ptr + m * x_m + offs_k * x_k, mask=mask_k, other=0.0).to(tl.float32)
        if HAS_Z:
            zz = tl.load(z_ptr + m * z_m + offs_k * z_k, mask=mask_k, other=0.0).to(tl.float32)
            gate = zz * tl.sigmoid(zz)
            if not NORM_BEFORE_GATE:
                h *= gate
        # 1/rms of each entry's group: one masked reduction per group (Mamba-2 has one to a few).
        rstd = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for g in range(0, n_groups):
            in_group = group == g
            ss = tl.sum(tl.where(in_group, h * h, 0.0), axis=0)
            rstd = tl.where(in_group, 1.0 / tl.sqrt(ss / group_size + eps), rstd)
        normed = h * rstd * nw
        if HAS_Z and NORM_BEFORE_GATE:
            normed *= gate
        normed = normed.to(w_dtype).to(tl.float32)
        acc = tl.sum(w * normed[None, :], axis=1)
        if HAS_BIAS:
            acc += bias
        out = acc.to(w_dtype).to(out_ptr.dtype.element_ty)
        if HAS_RES:
            out += tl.load(res_ptr + m * r_m + offs_n * r_n, mask=mask_n, other=0.0).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + m * o_m + offs_n * o_n, out, mask=mask_n)


def rms_norm_linear_triton(inputs: NormLinearInputs) -> torch.Tensor:
    """Same arguments and result as ``rms_norm_linear_ref``, for x (m, k) with few rows and k <= MAX_K.

    No autograd (the dispatcher sends anything needing a gradient to the unfused ops).
    """
    x, norm_weight, weight, bias, z, eps, group_size, norm_before_gate, residual = inputs.unpack()
    m, k = x.shape
    n = weight.shape[0]
    group_size = group_size or k
    out_dtype = weight.dtype if residual is None else torch.promote_types(residual.dtype, weight.dtype)
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    block_k = triton.next_power_of_2(k)
    # A program holds BLOCK_N x next_pow2(K) weight elements, as many as one row of the longest K.
    block_n = max(1, MAX_K // block_k)
    placeholder = x  # absent inputs: never read (HAS_* is False)
    _norm_linear_kernel[(triton.cdiv(n, block_n),)](
        x, placeholder if z is None else z, norm_weight, weight, placeholder if bias is None else bias,
        placeholder if residual is None else residual, out,
        n, k, k // group_size, group_size, eps,
        *x.stride(), *(x.stride() if z is None else z.stride()), *weight.stride(),
        *((0, 0) if residual is None else residual.stride()), *out.stride(),
        HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, ROWS=m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8,
    )
    return out
