"""Single-input Mamba-3 through the Mamba-2 SSD op: its Triton kernels serve Mamba-3 too.

``chunked.py`` rewrites the trapezoidal rule as an SSD recurrence with input weight w = γ + δ_next (per
head, the derivation is there)::

    G_t = α_t G_{t-1} + w_t x̃_t ⊗ B̃_t,      y_t = G_t C̃_t - δ_{t+1} (C̃_t·B̃_t) x̃_t

where the last term swaps w for γ on the diagonal. The SSD op computes H_t = e^{Δ'_t A'} H_{t-1} +
s_t x_t ⊗ B_t with its ``input_scale`` s apart from the decay step, so Δ' = -Δ A (any sign), A' = -1 and
s = w give G exactly, gradients included (no division couples the two). B̃ and C̃ carry their absolute
rotations (per head, hence one SSD group per head); the rotations need no per-pair term because C̃_t·B̃_s
holds the relative angle.

MIMO (rank r > 1) sums r inputs inside a step. Each position t becomes r sub-steps (t, 0) … (t, r-1) of
one SSD sequence of length r·l: sub-step (t, j) carries x̃_{t,j}, B̃_{t,j}, C̃_{t,j} and weight w_t, and the
decay α_t only at j = 0 (step 0 after it), so the SSD state after (t, r-1) is G_t exactly and the final
state is exact. The output at (t, j) then lacks the inputs (t, j') with j' > j of its own position, and
still has w instead of γ on the position's diagonal; both are an r×r correction per position::

    y_{t,j} = SSD_{t,j} + Σ_{j'} ([j' > j] w_t - δ_{t+1}) (C̃_{t,j}·B̃_{t,j'}) x̃_{t,j'}

(rank 1: the single-input form above). The SSD kernels do r times a single input's work, the price of
computing MIMO with kernels built for one input per step. On those kernels the rest is three fused kernels each
way (``triton_mimo_rotary.py``: B̃, C̃ of every rank written as the l·r sub-steps, with the scores C̃_{t,j}·B̃_{t,j'};
``triton_mimo_inputs.py``: x̃ and each sub-step's decay step and weight; ``triton_mimo_output.py``: the correction,
skip, gate and down-projection), so that rank r costs about r times the SSD op plus a few memory-bound passes,
not a few dozen PyTorch passes over (b, l, r, h, ·) tensors (``FUSED_MIMO`` off keeps that PyTorch form).

Precision: the rotations, decays and weights are computed in float32 (float64 for float64 inputs); for
bf16/fp16 x the SSD op's matmul operands x̃, B̃, C̃ are rounded to x's dtype, as Mamba-2 feeds them, so its
kernels run bf16 tensor-core dots with float32 accumulation (float32 operands would take the much slower
IEEE float32 dots). The diagonal correction uses the same rounded operands, so it cancels the kernels'
own diagonal term. With the SSD op's Triton kernels the biases, rotations, rounding and C̃·B̃ of B and C are
one fused kernel each way (``triton_rotary.py``), not a dozen PyTorch passes over (b, l, h, n) tensors; so
are the rotary angles (``triton_angles.py``), and without MIMO projections the diagonal correction, skip and
gate (``triton_output.py``).
"""

from __future__ import annotations

import functools

import torch

from ssmkit.ops._step_sizes import NO_LIMIT
from ssmkit.ops.mamba3.chunked import initial_G, next_share, rotated_BC
from ssmkit.ops.mamba3.inputs import Mamba3Inputs
from ssmkit.ops.mamba3.reference import Mamba3ScanState, finish, prepare, rotate
from ssmkit.ops.mamba3.step_sizes import step_weights
from ssmkit.ops.ssd import SSDInputs, mamba_chunk_scan_combined, ssd_scan

# B̃, C̃ (and the output) by the fused Triton kernels when the SSD op runs its Triton kernels in float32 (bf16
# operands included); benchmarks/gpu_mamba3_routes.py switches it off to time the PyTorch form beside it.
FUSED_BC = True
# With FUSED_BC: the step weights and the angles in one autograd node (triton_route_scalars.py); off, the
# step weights in PyTorch (benchmarks/gpu_mamba3.py --glue times the two).
FUSED_SCALARS = True
# Chunk length the SSD op's kernels get (None: the caller's chunk_size). A chunk is only a tiling here (the
# result does not depend on it); the SSD kernels were tuned at 256, Mamba-3 layers pass 64 (mamba_ssm's).
SSD_CHUNK: int | None = None
# MIMO (rank r > 1) on the SSD op's Triton kernels in float32 (bf16 operands included): its glue by the fused
# kernels of triton_mimo_*.py; off, the PyTorch form (benchmarks/gpu_mamba3_routes.py --mimo times the two).
FUSED_MIMO = True


def mamba3_via_ssd(
    inputs: Mamba3Inputs, *, ssd_backend: str = "auto", final_state: bool = True
) -> tuple[torch.Tensor, Mamba3ScanState | None]:
    """Mamba-3 through the SSD op; same arguments and results as ``mamba3_reference`` (validated by the
    caller).

    ``ssd_backend``: the SSD op's backend ("triton" for its kernels; float64 takes "chunked").
    ``final_state=False``: the final state is not needed (None is returned in its place), so the fused forms skip
    the last position's B̃ and x (a dozen launches each way at training time).
    """
    if inputs.B.shape[2] > 1:
        return _mimo_via_ssd(inputs, ssd_backend, final_state)
    (x, dt, _, B, C, _, angles, chunk_size, D, z, B_bias, C_bias, mimo_x, mimo_z, mimo_o, rotary_interleaved,
     initial_state, seq_idx) = inputs.unpack()
    h = x.shape[2]
    dtype = inputs.compute_dtype()
    init = None if initial_state is None else Mamba3ScanState(*(t.to(dtype) for t in initial_state))
    ops = operand_dtype(x.dtype, dtype)
    fused = FUSED_BC and ssd_backend == "triton" and dtype == torch.float32 and B.shape[-1] % 2 == 0
    # The output kernel has no MIMO projections (rank 1 with mimo_* given keeps the PyTorch form).
    fused_out = fused and mimo_x is None and mimo_z is None and mimo_o is None
    prep = prepare(inputs, dtype, fused=fused, scalars=False)
    last_B = None
    if fused:
        # Imported here: `import ssmkit` must never import triton.
        from ssmkit.ops.mamba3.triton_rotary import rotate_bc_triton

        init_angle = None if init is None else init.angle
        if FUSED_SCALARS:
            from ssmkit.ops.mamba3.triton_route_scalars import route_scalars_triton

            # -ΔA, w = γ + δ_next, δ_next and θ: one autograd node, two kernels each way.
            sdt, w, nxt, theta = route_scalars_triton(dt, inputs.A, inputs.trap, angles, seq_idx, init_angle)
        else:
            from ssmkit.ops.mamba3.triton_angles import rotary_angles_triton

            sdt, w, nxt = step_weights(dt, inputs.A, inputs.trap, seq_idx, dtype=dtype, backend="chunked")
            theta = rotary_angles_triton(dt, angles, seq_idx, init_angle)
        # Views, not selects (rank 1 here): a select's backward is a zero fill and a copy, a launch each. The
        # biases go in as (h, 1, n): the kernel's wrapper takes them so (a squeeze would be an autograd node).
        Bb, Cb = (torch.zeros(h, 1, B.shape[-1], device=x.device) if v is None else v for v in (B_bias, C_bias))
        Bo, Co, CB = rotate_bc_triton(B, C, Bb, Cb, theta, rotary_interleaved, ops)  # B, C (b, l, 1, g, n)
        if final_state:
            # The state's B̃ in float32 (the kernel's is rounded to the operand dtype): one position, in PyTorch.
            B_end = B[:, -1, 0].to(dtype).repeat_interleave(h // B.shape[3], dim=1) + Bb[:, 0].to(dtype)
            last_B = rotate(B_end, theta[:, -1], rotary_interleaved)[:, None]
    else:
        sdt, w, nxt = step_weights(dt, inputs.A, inputs.trap, seq_idx, dtype=dtype, backend="chunked")
        theta, Bt, Ct = rotated_BC(prep, seq_idx, init, rotary_interleaved)
        Bt, Ct = Bt.squeeze(2), Ct.squeeze(2)  # (b, l, h, n): rank 1
        last_B = Bt[:, -1, None]
        Bo, Co = Bt.to(ops), Ct.to(ops)
        CB = (Co.to(dtype) * Bo.to(dtype)).sum(-1)  # (b, l, h): C̃_t·B̃_t as the kernels see it
    # (b, l, h, p); x itself where prepare's xr is only x expanded over the rank (no autograd node for nothing).
    xr = x if fused and mimo_x is None else prep.xr.squeeze(2)
    xo = xr.to(ops).contiguous()  # once: the SSD op and the output kernel both read it contiguous
    G0 = None if init is None else initial_G(init, prep.xr, _first_share(dt, inputs.trap, dtype), mimo_x)
    # The SSD op's inputs are built here from checked ones, valid by construction: its checks (about 0.1 ms
    # of host time a call, at sizes where the layer is bound by the host) are not run again.
    y, G, _ = ssd_scan(SSDInputs(
        x=xo, dt=sdt, A=_minus_ones(h, dtype, x.device), B=Bo, C=Co,
        chunk_size=SSD_CHUNK or chunk_size, D=None, z=None, dt_bias=None, initial_states=G0, seq_idx=seq_idx,
        cu_seqlens=None, dt_softplus=False, dt_limit=NO_LIMIT, input_scale=w, device=x.device,
    ), backend="chunked" if dtype == torch.float64 else ssd_backend)
    if fused_out:
        from ssmkit.ops.mamba3.triton_output import output_triton

        out = output_triton(y, xo, z, nxt, CB, D)[:, :, None].to(x.dtype)
    else:
        y = y.to(dtype) - (nxt * CB)[..., None] * xo.to(dtype)
        out = finish(y[:, :, None], prep.xr, D, z, mimo_z, mimo_o).to(x.dtype)
    if not final_state:
        return out, None
    return out, Mamba3ScanState(theta[:, -1], G, last_B, x[:, -1].to(dtype))


def _minus_ones(h: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The SSD op's constant A = -1 (h,): made once per shape and device, not a fill kernel (and for MIMO a
    negation) every call. Never written to; the SSD op computes no gradient for it. Made fresh while a CUDA
    graph is being captured (a cached tensor would live in the graph's private memory pool)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.full((h,), -1.0, dtype=dtype, device=device)
    return _cached_minus_ones(h, dtype, device)


@functools.lru_cache(maxsize=32)
def _cached_minus_ones(h: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor even when first made under inference mode
        return torch.full((h,), -1.0, dtype=dtype, device=device)


def _first_share(dt: torch.Tensor, trap: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """δ_0 = (1 - λ_0) Δ_0 (b, h): the first position's share of the carried (B̃, x)."""
    return (1 - torch.sigmoid(trap[:, 0].to(dtype))) * dt[:, 0].to(dtype)


def _mimo_via_ssd(inputs: Mamba3Inputs, ssd_backend: str, final_state: bool = True
                  ) -> tuple[torch.Tensor, Mamba3ScanState | None]:
    """Rank r > 1: r sub-steps per position through the SSD op plus the r×r correction (module docstring)."""
    x, D, z, seq_idx = inputs.x, inputs.D, inputs.z, inputs.seq_idx
    b, l, h, p = x.shape
    r = inputs.B.shape[2]
    dtype = inputs.compute_dtype()
    init = None if inputs.initial_state is None else Mamba3ScanState(*(t.to(dtype) for t in inputs.initial_state))
    ops = operand_dtype(x.dtype, dtype)
    if FUSED_MIMO and ssd_backend == "triton" and dtype == torch.float32 and inputs.B.shape[-1] % 2 == 0:
        return _mimo_fused(inputs, init, ops, final_state)
    prep = prepare(inputs, dtype)
    theta, Bt, Ct = rotated_BC(prep, seq_idx, init, inputs.rotary_interleaved)  # (b, l, r, h, n)
    Bo, Co, xo = Bt.to(ops), Ct.to(ops), prep.xr.to(ops)
    nxt = next_share(prep.delta, seq_idx)
    w = prep.gamma + nxt  # (b, l, h)
    # The decay step at each position's first sub-step only; the weight w at every sub-step.
    step = torch.cat([-prep.log_a[:, :, None], prep.log_a.new_zeros(b, l, r - 1, h)], dim=2)
    G0 = None if init is None else initial_G(init, prep.xr, prep.delta[:, 0], inputs.mimo_x)
    y, G = mamba_chunk_scan_combined(
        xo.reshape(b, l * r, h, p), step.reshape(b, l * r, h), _minus_ones(h, dtype, x.device),
        Bo.reshape(b, l * r, h, -1), Co.reshape(b, l * r, h, -1), SSD_CHUNK or inputs.chunk_size, initial_states=G0,
        seq_idx=None if seq_idx is None else seq_idx.repeat_interleave(r, dim=1), return_final_states=True,
        input_scale=w[:, :, None].expand(b, l, r, h).reshape(b, l * r, h),
        backend="chunked" if dtype == torch.float64 else ssd_backend,
    )
    # (C̃_{t,j}·B̃_{t,j'}) as the kernels see the operands, weighted by [j' > j] w_t - δ_{t+1}.
    scores = torch.einsum("bljhn,blkhn->blhjk", Co.to(dtype), Bo.to(dtype))
    later = torch.ones(r, r, dtype=torch.bool, device=x.device).triu(1)
    coef = torch.where(later, w[..., None, None], 0.0) - nxt[..., None, None]  # (b, l, h, r, r)
    y = y.view(b, l, r, h, p).to(dtype) + torch.einsum("blhjk,blkhp->bljhp", scores * coef, xo.to(dtype))
    out = finish(y, prep.xr, D, z, inputs.mimo_z, inputs.mimo_o).to(x.dtype)
    if not final_state:
        return out, None
    return out, Mamba3ScanState(theta[:, -1], G, Bt[:, -1], x[:, -1].to(dtype))


def _mimo_fused(inputs: Mamba3Inputs, init: Mamba3ScanState | None, ops: torch.dtype, final_state: bool
                ) -> tuple[torch.Tensor, Mamba3ScanState | None]:
    """MIMO on the SSD op's Triton kernels with the glue in fused kernels of its own: the scalars and angles
    (``triton_route_scalars.py``), B̃, C̃ and the r×r scores (``triton_mimo_rotary.py``), x̃ and the sub-steps' decay
    step and weight (``triton_mimo_inputs.py``), the correction, skip, gate and down-projection
    (``triton_mimo_output.py``); each writes the layout the next reads (b, l·r, ...), so no reshape or expand runs
    in PyTorch."""
    # Imported here: `import ssmkit` must never import triton.
    from ssmkit.ops.mamba3.triton_mimo_inputs import mimo_inputs_triton
    from ssmkit.ops.mamba3.triton_mimo_output import mimo_output_triton
    from ssmkit.ops.mamba3.triton_mimo_rotary import mimo_rotate_bc_triton
    from ssmkit.ops.mamba3.triton_route_scalars import route_scalars_triton

    x, B, dt, trap, seq_idx, mimo_x = inputs.x, inputs.B, inputs.dt, inputs.trap, inputs.seq_idx, inputs.mimo_x
    h, r, g = x.shape[2], B.shape[2], B.shape[3]
    dtype = torch.float32
    sdt, w, nxt, theta = route_scalars_triton(dt, inputs.A, trap, inputs.angles, seq_idx,
                                              None if init is None else init.angle)
    Bo, Co, S = mimo_rotate_bc_triton(B, inputs.C, inputs.B_bias, inputs.C_bias, theta, inputs.rotary_interleaved,
                                      ops)  # B̃, C̃ (b, l·r, h, n), S (b, l, h, r, r)
    xo, step, scale = mimo_inputs_triton(x, mimo_x, sdt, w, r, ops)  # (b, l·r, h, p), (b, l·r, h) twice
    # initial_G reads only the rank and the dtype of its x̃ argument: an empty tensor carries them.
    G0 = None if init is None else initial_G(init, x.new_empty((0, 0, r), dtype=dtype),
                                             _first_share(dt, trap, dtype), mimo_x)
    y, G, _ = ssd_scan(SSDInputs(
        x=xo, dt=step, A=_minus_ones(h, dtype, x.device), B=Bo, C=Co, chunk_size=SSD_CHUNK or inputs.chunk_size,
        D=None, z=None, dt_bias=None, initial_states=G0,
        seq_idx=None if seq_idx is None else seq_idx.repeat_interleave(r, dim=1), cu_seqlens=None,
        dt_softplus=False, dt_limit=NO_LIMIT, input_scale=scale, device=x.device,
    ), backend="triton")
    out = mimo_output_triton(y, x, mimo_x, S, w, nxt, inputs.D, inputs.z, inputs.mimo_z, inputs.mimo_o, ops)
    if not final_state:
        return out, None
    # The state's B̃ in float32 (the kernel's is rounded to the operand dtype): one position, in PyTorch.
    B_end = B[:, -1].to(dtype).repeat_interleave(h // g, dim=2)  # (b, r, h, n)
    if inputs.B_bias is not None:
        B_end = B_end + inputs.B_bias.to(dtype).transpose(0, 1)
    last_B = rotate(B_end, theta[:, -1, None], inputs.rotary_interleaved)
    return out, Mamba3ScanState(theta[:, -1], G, last_B, x[:, -1].to(dtype))


def operand_dtype(x_dtype: torch.dtype, compute: torch.dtype) -> torch.dtype:
    """dtype of the SSD op's x, B, C: x's for bf16/fp16 inputs (tensor-core dots), else the compute dtype."""
    return x_dtype if x_dtype in (torch.bfloat16, torch.float16) else compute
