"""Triton backend of ``mamba_chunk_scan_combined``: launchers, the autograd Function, the backend.

Forward: four kernels, or three chained (``triton_fwd``); backward: five launches of four (``triton_bwd``),
plus a few small sums of per-block partials. The state passing can be chained into the chunk-state
kernels (forward and backward: each chunk's own work in parallel, then a wait for the previous chunk's
float32 state in a
small ring that stays in L2; ``SSDLaunch.chain``, the default since it passed the GPU tests and timed faster on
an H100; off, the
passing is a kernel of its own, and the backward's walks the chunks in one program per head). What goes
through memory: the states entering each chunk and their gradients (b, chunks, h, p, n), in the
inputs' dtype for bf16/fp16 (float32 otherwise; always summed in float32), and C Bᵀ per group
(b, chunks, g, T, T) in float32; the rest of the (T, T) work stays on chip. The backward gets these
(and Δ, cum) by running the forward's chunk-state and C Bᵀ launches again (``SSDLaunch.recompute_states``,
the default: less activation memory), or, off, from the forward.

The kernels' chunk length follows :mod:`ssmkit.ops.chunking` (a power of two in [16, 256]: tensor-core
tiles). The result does not depend on the chunk length: it only moves where the per-chunk sums are cut. Float64 inputs go to the chunked backend (no float64 tensor cores).
Warps, pipeline stages and row tiles of each launch come from the frozen :class:`~ssmkit.ops.ssd.launch.SSDLaunch`
passed in (``launch.CONFIGS`` holds the named alternatives that ``benchmarks/gpu_ssd.py --sweep`` times).
"""

from __future__ import annotations

import os

import torch
import triton
from torch.autograd.function import once_differentiable

from ssmkit.ops._step_sizes import NO_LIMIT
from ssmkit.ops.chunking import chunk_length
from ssmkit.ops.ssd import triton_bwd as _bwd
from ssmkit.ops.ssd import triton_fwd as _fwd
from ssmkit.ops.ssd.chunked import _varlen_states, ssd_chunked
from ssmkit.ops.ssd.inputs import SSDInputs
from ssmkit.ops.ssd.launch import DEFAULT_LAUNCH, SSDLaunch
from ssmkit.ops.ssd.reference import doc_starts

_STATE_BLOCK = 1024  # state elements per program in the forward state passing


def _pow2(v: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(v))


def _head_slices(heads_per_group: int, programs: int, min_programs: int) -> int:
    """Slices of each group's heads for the backward's rows/columns kernels: enough programs to fill
    the GPU (``SSDLaunch.min_programs``) when the sequence is short, one slice (no partial sums) when long."""
    slices = 1
    while heads_per_group % (2 * slices) == 0 and programs * slices < min_programs:
        slices *= 2
    return slices


def _low_or_f32(dtype: torch.dtype, low: bool) -> torch.dtype:
    """``dtype`` where ``low`` and it is bf16/fp16 (a buffer stored like the inputs), else float32."""
    return dtype if low and dtype in (torch.bfloat16, torch.float16) else torch.float32


def _interpreting() -> bool:
    """Triton's CPU interpreter is on (no inline assembly there; programs run one after another)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_types(dtype: torch.dtype):
    """(tl dtype of matmul operands, precision): tensor-core bf16/fp16, IEEE fp32 for float32 inputs.

    Triton's CPU interpreter gets bf16 tl.dot wrong (3.9: garbage results), so there bf16 inputs use
    float32 matmuls; everything else about them (loads, casts, stores) stays as on the GPU.
    """
    import triton.language as tl

    if dtype == torch.bfloat16 and not _interpreting():
        return tl.bfloat16, "tf32"
    if dtype == torch.float16:
        return tl.float16, "tf32"
    return tl.float32, "ieee"


def _chunk_states(x, dt, A, B, dt_bias, doc, init, scale, T, step, launch):
    """The forward's chunk-state launch (and, unchained, its state passing): ``(delta, cum (b, h, Lp) float32,
    final (b, h, p, n) float32, prev (b, chunks, h, p, n))``; step = (dt_softplus, has_limit, lo, hi).

    The backward calls it again when ``launch.recompute_states``: the same kernels on the same inputs at the
    same launch, so the same bits as the forward's (the chained passing orders its programs by a ticket, but each
    state is summed in one fixed order whatever the schedule).
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    nc = -(-l // T)
    dev, f32 = x.device, torch.float32
    DOT, PREC = _dot_types(x.dtype)
    BP, BN, BK = _pow2(p), _pow2(n), min(T, launch.state_tile)
    dt_softplus, has_limit, lo, hi = step
    delta = torch.empty(b, h, nc * T, device=dev, dtype=f32)
    cum = torch.empty_like(delta)
    final = torch.empty(b, h, p, n, device=dev, dtype=f32)
    prev = torch.empty(b, nc, h, p, n, device=dev, dtype=f32 if x.dtype == f32 else x.dtype)
    chain = launch.chain
    dummy = delta
    # Chained: a ticket counter, one flag per (head, chunk), a ring of two float32 states per head.
    # Else the chunk sums S_c go through memory to the state passing kernel.
    sync = torch.zeros(1 + b * h * nc if chain else 1, device=dev, dtype=torch.int32)
    ring = torch.empty(b * h * 2 * p * n if chain else 1, device=dev, dtype=f32)
    states = dummy if chain else torch.empty(b, nc, h, p, n, device=dev, dtype=f32)
    init = dummy if init is None else init
    docp = dummy if doc is None else doc
    _fwd._chunk_state_fwd[(nc, b * h)](
        x, dt, A, dummy if dt_bias is None else dt_bias, B, docp, delta, cum, states,
        dummy if scale is None else scale, sync, ring, init, final, prev,
        l, h, g, p, n, nc, lo, hi,
        T=T, BK=BK, BP=BP, BN=BN, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_LIMIT=has_limit,
        HAS_DOC=doc is not None, SEP_SCALE=scale is not None, DOT=DOT, PREC=PREC, CHAIN=chain,
        HAS_INIT=init is not dummy, FENCE=not _interpreting(), ONLINE=launch.state_online,
        **launch.opts("state"),
    )
    if not chain:
        _fwd._state_pass_fwd[(b * h, triton.cdiv(p * n, _STATE_BLOCK))](
            states, init, final, cum, docp, prev, h, p * n, nc,
            T=T, BLOCK=_STATE_BLOCK, HAS_INIT=init is not dummy, HAS_DOC=doc is not None, **launch.opts("state_pass"),
        )
    return delta, cum, final, prev


def _chunk_cb(B, C, T, BM, dtype, launch):
    """C Bᵀ (b, chunks, g, T, T), its causal (BM, BM) tiles only (the rest is not written), float32 or, with
    ``launch.cb_lowp``, ``dtype`` where that is bf16/fp16. Called again by the backward with
    ``launch.recompute_states`` (the same bits, as :func:`_chunk_states`)."""
    b, l, g, n = B.shape
    nc, nrb = -(-l // T), T // BM
    DOT, PREC = _dot_types(dtype)
    cb = torch.empty(b, nc, g, T, T, device=B.device, dtype=_low_or_f32(dtype, launch.cb_lowp))
    _fwd._chunk_cb_fwd[(nc * nrb * nrb, b * g)](
        B, C, cb, l, g, n, nc, T=T, BM=BM, BN=_pow2(n), DOT=DOT, PREC=PREC, **launch.opts("cb"),
    )
    return cb


class _SSDFunction(torch.autograd.Function):
    """Shapes: x, z (b, l, h, p); dt (b, l, h); A, dt_bias (h,); B, C (b, l, g, n); D (h, p) float32 or
    None; initial_states (b, h, p, n) float32 or None; doc (b, Lp) int32 or None. Returns out (b, l, h, p),
    final (b, h, p, n), and for the varlen states cum, delta (b, h, Lp) and the entering states
    (b, chunks, h, p, n).

    Saved for the backward: the inputs, the pre-gate output where z is given, and either Δ, cum, the
    entering states and C Bᵀ (``launch.recompute_states`` off) or, on, nothing more: the backward runs
    :func:`_chunk_states` and :func:`_chunk_cb` again (mamba_ssm's backward recomputes them too).
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_states, doc, T, dt_softplus, dt_limit, scale, launch):
        b, l, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        nc = -(-l // T)
        DOT, PREC = _dot_types(x.dtype)
        BP, BN, BM = _pow2(p), _pow2(n), min(T, launch.fwd_tile)
        has_limit = tuple(dt_limit) != NO_LIMIT
        lo, hi = (float(v) for v in dt_limit) if has_limit else (0.0, 0.0)
        step = (dt_softplus, has_limit, lo, hi)
        delta, cum, final, prev = _chunk_states(x, dt, A, B, dt_bias, doc, initial_states, scale, T, step, launch)
        nrb = T // BM
        cb = _chunk_cb(B, C, T, BM, x.dtype, launch)
        dummy = delta
        out = torch.empty_like(x)
        keep_ypre = any(ctx.needs_input_grad)
        ypre = torch.empty_like(x) if z is not None and keep_ypre else out
        two_heads = launch.scan_heads == 2 and (h // g) % 2 == 0
        _fwd._chunk_scan_fwd[(nrb * h // (2 if two_heads else 1), nc, b)](
            x, dummy if z is None else z, dummy if D is None else D, C, cb, delta, cum,
            dummy if doc is None else doc, prev, out, ypre,
            l, h, g, p, n, nc,
            T=T, BM=BM, BP=BP, BN=BN, HAS_Z=z is not None, HAS_D=D is not None, HAS_DOC=doc is not None,
            STORE_YPRE=z is not None and keep_ypre, DOT=DOT, PREC=PREC, TWO_HEADS=two_heads,
            **launch.opts("scan"),
        )
        if launch.recompute_states:
            # The backward rebuilds the rest from these (two more small tensors, usually inputs anyway).
            ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, doc, ypre, initial_states, scale)
        else:
            ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, doc, ypre, delta, cum, prev, cb)
        ctx.meta = (T, BM, step, initial_states is not None, scale is not None, launch)
        ctx.set_materialize_grads(False)
        return out, final, cum, delta, prev

    @staticmethod
    @once_differentiable  # first-order only: a second-order gradient through it fails, never drops its terms
    def backward(ctx, dout, dfinal, dcum_x, ddelta_x, dprev_x):
        T, BM_fwd, step, has_init, has_scale, launch = ctx.meta
        x, dt, A, B, C, D, z, dt_bias, doc, ypre, *rest = ctx.saved_tensors
        if launch.recompute_states:
            # The forward's own launches again, before any backward kernel: bit-identical Δ, cum, states, C Bᵀ.
            init, scale = rest
            delta, cum, _, states = _chunk_states(x, dt, A, B, dt_bias, doc, init, scale, T, step, launch)
            cb = _chunk_cb(B, C, T, BM_fwd, x.dtype, launch)
        else:
            delta, cum, states, cb = rest  # states: the states entering the chunks (the forward's prev)
        dt_softplus, has_limit, lo, hi = step
        b, l, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        nc = -(-l // T)
        dev = x.device
        f32 = torch.float32
        DOT, PREC = _dot_types(x.dtype)
        # At most the forward's tile: C Bᵀ holds only the forward's causal tiles (the rest is not written).
        BP, BN, BM = _pow2(p), _pow2(n), min(BM_fwd, launch.bwd_tile)
        dummy = delta
        docp = dummy if doc is None else doc
        dout = torch.zeros_like(x) if dout is None else dout.contiguous()
        dfinal = None if dfinal is None else dfinal.contiguous()

        # 1. Gradients of the per-chunk states, walking the chunks backwards (chained: in parallel, only
        # the passing in order).
        chain = launch.chain
        BN1 = min(BN, launch.state_bwd_bn if chain else 32)
        n_nb = triton.cdiv(n, BN1)
        # Summed in float32 in the kernel; stored like the entering states (the columns kernel multiplies
        # it in the inputs' dtype anyway).
        dstates = torch.empty(states.shape, device=dev, dtype=states.dtype)
        ddecay = torch.empty(b, h, nc, n_nb, device=dev, dtype=f32)
        dinit = torch.empty(b, h, p, n, device=dev, dtype=f32)
        sync = torch.zeros(1 + b * h * n_nb * nc if chain else 1, device=dev, dtype=torch.int32)
        ring = torch.empty(b * h * 2 * p * n if chain else 1, device=dev, dtype=f32)
        _bwd._state_pass_bwd[(nc, b * h * n_nb) if chain else (b * h, n_nb)](
            dout, dummy if z is None else z, C, cum, docp, states,
            dummy if dfinal is None else dfinal, dummy if dprev_x is None else dprev_x.contiguous(),
            dstates, ddecay, dinit, sync, ring,
            l, h, g, p, n, nc, n_nb,
            T=T, BK=min(T, launch.state_bwd_tile), BP=BP, BN=BN1, HAS_Z=z is not None, HAS_DOC=doc is not None,
            HAS_DFINAL=dfinal is not None, HAS_DPREV=dprev_x is not None, DOT=DOT, PREC=PREC, CHAIN=chain,
            FENCE=not _interpreting(), **launch.opts("state_bwd"),
        )
        del sync, ring
        # 2. Rows: dC, dz, dD partials, the gradient of C Bᵀ summed over heads, dcum (atomic adds).
        nrb = T // BM
        S = _head_slices(h // g, nrb * nc * b * g, launch.min_programs)
        dz = torch.empty_like(z) if z is not None else None
        dD_part = torch.empty(b, nc * nrb, h, p, device=dev, dtype=f32) if D is not None else None
        # One slice: the kernels write dB, dC in their final dtype; several: float32 partial sums.
        dC_part = torch.empty(S, *C.shape, device=dev, dtype=C.dtype if S == 1 else f32)
        dcum = torch.zeros(b, h, nc * T, device=dev, dtype=f32)
        # Read only after a cast to the inputs' dtype where one slice holds all of a group's heads.
        dcb = torch.empty(S, *cb.shape, device=dev, dtype=_low_or_f32(x.dtype, launch.dcb_lowp and S == 1))
        for part, kernel in ((0, "rows"), (1, "rows_state")):
            _bwd._bwd_rows[(nrb, nc, b * g * S)](
                x, dummy if z is None else z, dout, ypre, dummy if D is None else D, B, C, cb, delta, cum, docp,
                states, dummy if dz is None else dz, dummy if dD_part is None else dD_part, dC_part, dcum, dcb,
                l, h, g, p, n, nc, S,
                T=T, BM=BM, BP=BP, BN=BN, HAS_Z=z is not None, HAS_D=D is not None, HAS_DOC=doc is not None,
                DOT=DOT, PREC=PREC, PART=part, HEAD_STAGES=launch.head_stages(kernel), **launch.opts(kernel),
            )
        # 3. Columns: dB, dx, the Δ·x part of dΔ, the chunk-state part of dcum.
        dx = torch.empty_like(x)
        dB_part = torch.empty(S, *B.shape, device=dev, dtype=B.dtype if S == 1 else f32)
        ddelta = torch.empty_like(delta)
        dlast = torch.empty(b, h, nc, nrb, device=dev, dtype=f32)
        parts = ((0, "cols_dB"), (1, "cols")) if launch.cols_split else ((2, "cols"),)
        for part, kernel in parts:
            _bwd._bwd_cols[(nrb, nc, b * g * S)](
                x, dummy if z is None else z, dout, dummy if D is None else D, B, C, cb, dcb, delta, cum, docp,
                dstates, dx, dB_part, ddelta, dcum, dlast,
                l, h, g, p, n, nc, S,
                T=T, BK=BM, BP=BP, BN=BN, HAS_Z=z is not None, HAS_D=D is not None, HAS_DOC=doc is not None,
                DOT=DOT, PREC=PREC, PART=part, HEAD_STAGES=launch.head_stages("cols"),
                FLAT=launch.cols_head_stages > 0, **launch.opts(kernel),
            )
        # 4. dcum -> dΔ -> ddt, with per-chunk partials of dA and ddt_bias.
        ddt = torch.empty_like(dt)
        dA_part = torch.empty(b, h, nc, device=dev, dtype=f32)
        dbias_part = torch.empty_like(dA_part)
        has_extra = dcum_x is not None or ddelta_x is not None
        dscale = torch.empty(b, l, h, device=dev, dtype=f32) if has_scale else None
        _bwd._bwd_dt[(nc, b * h)](
            dt, A, dummy if dt_bias is None else dt_bias, delta, dcum, ddelta, ddecay, dlast,
            (dcum_x if dcum_x is not None else torch.zeros_like(delta)).contiguous() if has_extra else dummy,
            (ddelta_x if ddelta_x is not None else torch.zeros_like(delta)).contiguous() if has_extra else dummy,
            ddt, dA_part, dbias_part, dummy if dscale is None else dscale,
            l, h, nc, lo, hi, n_nb,
            T=T, BK=BM, NDB=_pow2(n_nb, 2), NLB=_pow2(nrb, 2), HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
            HAS_LIMIT=has_limit, HAS_EXTRA=has_extra, SEP_SCALE=has_scale, **launch.opts("dt_bwd"),
        )
        dA = dA_part.sum((0, 2)).to(A.dtype) if ctx.needs_input_grad[2] else None  # Mamba-3's A is a constant
        dbias = dbias_part.sum((0, 2)).to(dt_bias.dtype) if dt_bias is not None else None
        dD = dD_part.sum((0, 1)) if D is not None else None
        dB, dC = (dB_part[0], dC_part[0]) if S == 1 else (dB_part.sum(0).to(B.dtype), dC_part.sum(0).to(C.dtype))
        return (dx, ddt, dA, dB, dC, dD, dz, dbias, dinit if has_init else None,
                None, None, None, None, dscale, None)


def ssd_triton(inputs: SSDInputs, launch: SSDLaunch = DEFAULT_LAUNCH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Triton SSD; same arguments and results as ``ssd_chunked`` (validated by the caller).

    x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n). Returns ``(out (b, l, h, p),
    final_states (b, h, p, n) float32, varlen_states (s, h, p, n) or None)``.
    """
    (x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_softplus, dt_limit,
     input_scale) = inputs.unpack()
    tensors = (x, dt, A, B, C, D, z, dt_bias, initial_states, input_scale)
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return ssd_chunked(inputs)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    T = chunk_length(chunk_size, l, power_of_two=True)
    nc = -(-l // T)
    doc = None
    if seq_idx is not None:
        # Document number (0, 1, ...) of each position; padding joins the last document.
        doc = torch.cumsum(doc_starts(seq_idx), dim=1, dtype=torch.int32)
        doc = torch.cat([doc, doc[:, -1:].expand(b, nc * T - l)], dim=1).contiguous()
    Dhp = None
    if D is not None:
        Dhp = (D[:, None].expand(h, p) if D.dim() == 1 else D).float().contiguous()
    init = None if initial_states is None else initial_states.float().contiguous()
    out, final, cum, delta, prev = _SSDFunction.apply(
        x.contiguous(), dt.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(), Dhp,
        None if z is None else z.contiguous(), None if dt_bias is None else dt_bias.contiguous(),
        init, doc, T, dt_softplus, tuple(dt_limit), None if input_scale is None else input_scale.contiguous(), launch,
    )
    varlen_states = None
    if cu_seqlens is not None:
        # One pass of plain PyTorch over the last chunk of each sequence (b = 1).
        pad = nc * T - l
        xc = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, pad)).view(nc, T, h, p)
        Bc = torch.nn.functional.pad(B.float(), (0, 0, 0, 0, 0, pad)).view(nc, T, g, n)
        varlen_states = _varlen_states(
            cu_seqlens, cum[0].view(h, nc, T).permute(1, 2, 0), delta[0].view(h, nc, T).permute(1, 2, 0), xc, Bc,
            prev[0].float().view(nc, g, h // g * p, n),
        )
    return out, final, varlen_states
