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

The tile size, the warps and programmatic dependent launch (the weight slab loaded before waiting for the
previous kernel) come from :mod:`ssmkit.ops.decode_launch`. Without a norm weight the kernel is a plain
GEMV (+ bias, + residual): a Mamba block's ``out_proj`` and residual add. The greedy head
(:func:`rms_norm_linear_argmax_triton`) runs the same product over the vocabulary and keeps, per program
and row, only the largest logit and its index; a second one-program-per-row kernel reduces those.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmkit.ops import decode_launch
from ssmkit.ops._pdl import pdl_trigger, pdl_wait
from ssmkit.ops.norm_linear.inputs import NormLinearInputs


@triton.jit
def _normed_row(x_ptr, z_ptr, nw, m, x_m, x_k, z_m, z_k, offs_k, mask_k, K, n_groups, group_size, eps, w_dtype,
                HAS_NORM: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Row m of the (gated) RMS norm's output, rounded to the weight's dtype, in float32 (no norm: x rounded)."""
    h = tl.load(x_ptr + m * x_m + offs_k * x_k, mask=mask_k, other=0.0).to(tl.float32)
    if HAS_NORM:
        if HAS_Z:
            zz = tl.load(z_ptr + m * z_m + offs_k * z_k, mask=mask_k, other=0.0).to(tl.float32)
            gate = zz * tl.sigmoid(zz)
            if not NORM_BEFORE_GATE:
                h *= gate
        # 1/rms of each entry's group: one masked reduction per group (Mamba-2 has one to a few).
        group = offs_k // group_size
        rstd = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for g in range(n_groups):
            in_group = group == g
            ss = tl.sum(tl.where(in_group, h * h, 0.0), axis=0)
            rstd = tl.where(in_group, 1.0 / tl.sqrt(ss / group_size + eps), rstd)
        h = h * rstd * nw
        if HAS_Z and NORM_BEFORE_GATE:
            h *= gate
    return h.to(w_dtype).to(tl.float32)


@triton.jit
def _norm_linear_kernel(
    x_ptr, z_ptr, nw_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    N, K, n_groups, group_size, eps,
    x_m, x_k, z_m, z_k, w_n, w_k, r_m, r_n, o_m, o_n,
    HAS_NORM: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    pdl_trigger(PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n, mask_k = offs_n < N, offs_k < K
    w_dtype = w_ptr.dtype.element_ty
    # Parameters first: under PDL they stream while the previous kernel finishes.
    w = tl.load(w_ptr + offs_n[:, None] * w_n + offs_k[None, :] * w_k,
                mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
    nw = tl.zeros((BLOCK_K,), dtype=tl.float32)
    if HAS_NORM:
        nw = tl.load(nw_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(w_dtype).to(tl.float32)
    pdl_wait(PDL)
    for m in tl.static_range(ROWS):
        normed = _normed_row(x_ptr, z_ptr, nw, m, x_m, x_k, z_m, z_k, offs_k, mask_k, K, n_groups, group_size, eps,
                             w_dtype, HAS_NORM, HAS_Z, NORM_BEFORE_GATE, BLOCK_K)
        acc = tl.sum(w * normed[None, :], axis=1)
        if HAS_BIAS:
            acc += bias
        out = acc.to(w_dtype).to(out_ptr.dtype.element_ty)
        if HAS_RES:
            out += tl.load(res_ptr + m * r_m + offs_n * r_n, mask=mask_n, other=0.0).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + m * o_m + offs_n * o_n, out, mask=mask_n)


def _tile(k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K): a program holds BLOCK_N x next_pow2(K) weight elements, the configured tile."""
    block_k = triton.next_power_of_2(k)
    return max(1, decode_launch.current().gemv_tile // block_k), block_k


def rms_norm_linear_triton(inputs: NormLinearInputs, *, norm: bool = True) -> torch.Tensor:
    """Same arguments and result as ``rms_norm_linear_ref``, for x (m, k) with few rows and k <= MAX_K.

    ``norm=False``: no norm (``inputs.norm_weight``, z and the groups are not read), ``residual + linear(x)``.
    No autograd (the dispatcher sends anything needing a gradient to the unfused ops).
    """
    x, norm_weight, weight, bias, z, eps, group_size, norm_before_gate, residual = inputs.unpack()
    m, k = x.shape
    n = weight.shape[0]
    group_size = group_size or k
    out_dtype = weight.dtype if residual is None else torch.promote_types(residual.dtype, weight.dtype)
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    block_n, block_k = _tile(k)
    pdl, launch = decode_launch.pdl_launch(x.device)
    placeholder = x  # absent inputs: never read (HAS_* is False)
    _norm_linear_kernel[(triton.cdiv(n, block_n),)](
        x, placeholder if z is None else z, placeholder if norm_weight is None else norm_weight, weight,
        placeholder if bias is None else bias, placeholder if residual is None else residual, out,
        n, k, k // group_size, group_size, eps,
        *x.stride(), *(x.stride() if z is None else z.stride()), *weight.stride(),
        *((0, 0) if residual is None else residual.stride()), *out.stride(),
        HAS_NORM=norm, HAS_Z=norm and z is not None, NORM_BEFORE_GATE=norm_before_gate, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, ROWS=m, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl,
        num_warps=decode_launch.current().gemv_warps, **launch,
    )
    return out


@triton.jit
def _argmax_combine(v1, i1, v2, i2):
    """torch.argmax's order: NaN above everything, then the larger value, then the smaller index."""
    n1, n2 = v1 != v1, v2 != v2  # noqa: PLR0124 - the NaN test
    take2 = ((n2 & ~n1) | (~n1 & ~n2 & ((v2 > v1) | ((v2 == v1) & (i2 < i1))))
             | (n1 & n2 & (i2 < i1)))
    return tl.where(take2, v2, v1), tl.where(take2, i2, i1)


@triton.jit
def _norm_linear_argmax_kernel(
    x_ptr, nw_ptr, w_ptr, val_ptr, idx_ptr,
    N, K, vocab, eps, x_m, x_k, w_n, w_k, p_m,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    """Per program and row: the largest logit of its BLOCK_N vocabulary entries (rounded to the weight's dtype,
    as the unfused head's logits) and its index; entries at or past ``vocab`` count as -inf."""
    pdl_trigger(PDL)
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n, mask_k = offs_n < N, offs_k < K
    w_dtype = w_ptr.dtype.element_ty
    w = tl.load(w_ptr + offs_n[:, None] * w_n + offs_k[None, :] * w_k,
                mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
    nw = tl.load(nw_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    pdl_wait(PDL)
    for m in tl.static_range(ROWS):
        normed = _normed_row(x_ptr, x_ptr, nw, m, x_m, x_k, 0, 0, offs_k, mask_k, K, 1, K, eps, w_dtype,
                             True, False, False, BLOCK_K)
        logits = tl.sum(w * normed[None, :], axis=1).to(w_dtype).to(tl.float32)
        logits = tl.where(offs_n < vocab, logits, float("-inf"))
        best, at = tl.reduce((logits, offs_n), 0, _argmax_combine)
        tl.store(val_ptr + m * p_m + pid, best)
        tl.store(idx_ptr + m * p_m + pid, at)


@triton.jit
def _argmax_final_kernel(val_ptr, idx_ptr, out_ptr, P, p_m, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One program per row: the best of its programs' (value, index) pairs."""
    pdl_trigger(PDL)
    pdl_wait(PDL)
    m = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < P
    v = tl.load(val_ptr + m * p_m + offs, mask=mask, other=float("-inf"))
    i = tl.load(idx_ptr + m * p_m + offs, mask=mask, other=2147483647)
    _, at = tl.reduce((v, i), 0, _argmax_combine)
    tl.store(out_ptr + m, at.to(tl.int64))


# The second pass reads every first-pass program's pair at once: at most this many programs.
MAX_PARTIALS = 8192


def rms_norm_linear_argmax_triton(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, eps: float,
                                  vocab_size: int) -> torch.Tensor:
    """``argmax(linear(rms_norm(x) in weight's dtype, weight)[:, :vocab_size].float(), -1)`` -> (m,) int64, for x
    (m, k) with few rows and k <= MAX_K, weight (n, k), 1 <= vocab_size <= n < 2**31. Two kernels."""
    m, k = x.shape
    n = weight.shape[0]
    block_n, block_k = _tile(k)
    block_n = max(block_n, triton.next_power_of_2(triton.cdiv(n, MAX_PARTIALS)))
    programs = triton.cdiv(n, block_n)
    vals = torch.empty(m, programs, dtype=torch.float32, device=x.device)
    idxs = torch.empty(m, programs, dtype=torch.int32, device=x.device)
    token = torch.empty(m, dtype=torch.int64, device=x.device)
    pdl, launch = decode_launch.pdl_launch(x.device)
    _norm_linear_argmax_kernel[(programs,)](
        x, norm_weight, weight, vals, idxs, n, k, vocab_size, eps, *x.stride(), *weight.stride(), vals.stride(0),
        ROWS=m, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl, num_warps=decode_launch.current().gemv_warps, **launch,
    )
    block = triton.next_power_of_2(programs)
    _argmax_final_kernel[(m,)](vals, idxs, token, programs, vals.stride(0), BLOCK=block, PDL=pdl,
                               num_warps=min(16, max(4, block // 512)), **launch)
    return token
