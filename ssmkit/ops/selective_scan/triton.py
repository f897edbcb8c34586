"""Triton selective scan: the hardware-aware Mamba-1 scan on the GPU (and on CPU under TRITON_INTERPRET=1).

Three kernel families compute the same function with the same checkpoint tensor: the chunk-tile kernels
of ``triton_kernels.py`` (a program loops over the state index; (channels, chunk) tiles), the fused-state
kernels of ``triton_fused.py`` (a program holds every state index; short chunks, carries in registers) and
the time-wise kernels of ``triton_timewise.py`` (mamba_ssm's layout: a program's threads split long tiles
of one or two channels along time and loop over the state index). This module holds the launch
configuration, the launchers, the autograd Function and the backend function; :data:`TRAINING_CONFIG` and
:data:`DEFAULT_CONFIG` pick the family per call, :data:`TIMEWISE_CANDIDATES` are time-wise launch shapes.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ssmkit.ops._checks import MAX_ROW_OFFSET, row_offset
from ssmkit.ops._precision import compute_dtype
from ssmkit.ops.selective_scan.inputs import ScanInputs
from ssmkit.ops.selective_scan.triton_fused import _fused_bwd_kernel, _fused_fwd_kernel
from ssmkit.ops.selective_scan.triton_kernels import (
    _selective_scan_bwd_kernel,
    _selective_scan_fwd_kernel,
)
from ssmkit.ops.selective_scan.triton_timewise import _tw_bwd_kernel, _tw_fwd_kernel


@dataclasses.dataclass(frozen=True)
class ScanConfig:
    """Launch shape: ``chunk`` steps per tile (also the checkpoint interval), channels and warps per program.

    ``fused_states`` picks the kernels that hold every state index at once in (channels, N, chunk) tiles
    (one scan per chunk, states and adjoints carried in registers) over those that loop over the state
    index with (channels, chunk) tiles (carries through global memory). With fused states the forward
    may walk longer tiles of ``fwd_chunk`` steps (a multiple of ``chunk``; default ``chunk``): it
    still writes a checkpoint every ``chunk`` steps, the backward's tile.

    ``lowp_checkpoints``: with fused states and bfloat16 u, the checkpoints are stored in bfloat16 (half
    the bytes saved for the backward; the forward carries its float32 state in registers and writes the
    float32 last state apart, so only the backward's recomputed states see the rounding, 2^-9 relative).
    float16 keeps float32 checkpoints: its range (65,504) could overflow a state that float32 holds. Off in
    :data:`TRAINING_CONFIG`: the rounding reaches the weights' gradients (dA 2-3e-3 relative).

    ``timewise`` picks the time-wise kernels instead (``triton_timewise.py``): (channels, chunk) tiles with
    long chunks (256 .. 2048 steps) split along time over the program's threads, looping over the state
    index; one float32 checkpoint per chunk. Every family needs ``chunk`` a power of two (a tile's length)."""

    def __post_init__(self) -> None:
        fwd = self.fwd_chunk or self.chunk
        if fwd % self.chunk or (fwd != self.chunk and not self.fused_states):
            raise ValueError(f"fwd_chunk={fwd} must be a multiple of chunk={self.chunk} (and needs fused_states)")
        if self.timewise and self.fused_states:
            raise ValueError("timewise and fused_states pick different kernels: set one")
        if self.chunk < 1 or self.chunk & (self.chunk - 1):
            raise ValueError(f"chunk={self.chunk} must be a power of two")

    chunk: int = 128
    fwd_block_d: int = 8
    fwd_warps: int = 4
    bwd_block_d: int = 16
    bwd_warps: int = 8
    fused_states: bool = False
    fwd_chunk: int | None = None
    lowp_checkpoints: bool = True
    timewise: bool = False


# Chosen from the launch-config sweep on an H200 (bf16, b 8, d 2048, N 16, L 8192; benchmarks/RESULTS.md):
# for training the fused-state kernels with 2-channel programs (forward+backward 20.8 ms against 44.6 for
# the chunk-128 kernels); for a forward alone the chunk-128 kernels (4.8 ms against 6.6).
# Float32 checkpoints: bfloat16 ones (lowp_checkpoints) put a 2-3e-3 relative error on dA, the weights' gradients
# (dD, d(delta_bias), a time-invariant B or C) near it, against 1e-7 with float32 (bf16 time-major input, b 2, d 4,
# N 8, L 37 / 200, against float64), past mamba_ssm's own test tolerance for them (rtol 1e-3).
TRAINING_CONFIG = ScanConfig(16, 2, 1, 2, 1, fused_states=True, fwd_chunk=32, lowp_checkpoints=False)
DEFAULT_CONFIG = ScanConfig()
# For time-contiguous u and delta (mamba_ssm's (b, d, l) layout) the time-wise kernels, forward and backward:
# on an H100 at L 8192 fwd 2.674 / fwd+bwd 12.335 ms against mamba_ssm's CUDA scan's 2.682 / 12.311 in the same
# process (TRAINING_CONFIG: 6.662 / 20.636). On channel-contiguous inputs they read across rows (53 ms), so the
# two configs above keep those.
TIMEWISE_CONFIG = ScanConfig(256, 1, 1, 1, 1, timewise=True)
# Time-wise launch shapes for the sweep (benchmarks/gpu_selective_scan.py), named tw{chunk}_f{channels}x{warps}
# _b{channels}x{warps} (forward, backward). A thread holds chunk x channels / (32 warps) steps: 8 in these
# forwards (one 16-byte bf16 vector; 77-122 registers on sm_90, Triton 3.6), 8 or 4 in the backwards (the
# adjoint walks these runs by hand; 199-219 and 151-165 registers; benchmarks/scan_registers.py).
TIMEWISE_CANDIDATES = {
    f"tw{chunk}_f{fd}x{fw}_b{bd}x{bw}": ScanConfig(chunk, fd, fw, bd, bw, timewise=True)
    for chunk, fd, fw, bd, bw in (
        (2048, 1, 8, 1, 8), (1024, 1, 4, 1, 4), (1024, 1, 4, 1, 8), (512, 1, 2, 1, 2), (512, 1, 2, 1, 4),
        (512, 2, 4, 2, 4), (256, 1, 1, 1, 1), (256, 1, 1, 1, 2),
        # For short sequences (at L 2048 tw256 is 1.11x mamba_ssm's forward): 4 steps a thread, or two channels a
        # program.
        (128, 1, 1, 1, 1), (256, 2, 2, 1, 1),
    )
}


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _strides(x: torch.Tensor | None, dims: int) -> tuple[int, ...]:
    return (0,) * dims if x is None else tuple(x.stride())


def _block_d(dg: int, block_d: int) -> int:
    """Channels per program: the configured block, shrunk (power of 2) for groups with few channels."""
    return max(1, min(block_d, 1 << max(0, dg - 1).bit_length()))


def _fused_warps(warps: int, block_d: int, n: int) -> int:
    """Warps for a fused-state program: no more than its (channel, state) pairs fill, so that a shrunk
    channel block does not spread the time axis over warps (the scan would cross them)."""
    return max(1, min(warps, block_d * triton.next_power_of_2(n) // 32))


def _timewise_run(chunk: int, block_d: int, warps: int, element_size: int) -> int:
    """Consecutive steps a thread holds of a time-wise backward tile, where that is 4 or 8 (the adjoint
    then walks them by hand, ``triton_runs.py``), else 0 (a reverse scan): its share of the tile, in runs
    of at most one 16-byte vector of the inputs (Triton's layout for the tile's loads)."""
    run = min(chunk * block_d // (32 * warps), 16 // element_size)
    return run if run in (4, 8) and chunk >= run else 0


# The kernels index within a batch row with 32-bit integers (channel x stride + step x stride, as Triton types
# the strides): an offset from 2^31 on would wrap and reach memory outside the tensors.


def _check_row_offsets(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError where an element's offset within its batch row (dims 1.., with these strides) passes
    2^31 - 1: the kernels' 32-bit offsets would wrap (wrong memory, not an error)."""
    for name, x in tensors.items():
        if x is None:
            continue
        offset = row_offset(x)
        if offset > MAX_ROW_OFFSET:
            raise ValueError(
                f"selective scan (triton): {name} {tuple(x.shape)} with strides {tuple(x.stride())} reaches "
                f"offset {offset} within a batch row, past the kernels' 32-bit indexing (2^31 - 1); use "
                "backend='chunked', or split the sequence and pass each part the last state as initial_state"
            )


def _checkpoint_dtype(u: torch.Tensor, acc: torch.dtype, cfg: ScanConfig) -> torch.dtype:
    """bfloat16 checkpoints where the kernels allow them (see ``ScanConfig.lowp_checkpoints``), else ``acc``.
    Only the fused-state forward carries its state in registers: the chunk-tile forward reads the state
    back from the checkpoint, which would round the forward itself."""
    lowp = cfg.lowp_checkpoints and cfg.fused_states and u.dtype == torch.bfloat16 and acc == torch.float32
    return torch.bfloat16 if lowp else acc


def _forward(u, delta, A, B, C, D, z, bias, h0, seq_idx, softplus, acc, cfg):
    """Returns out, the ungated y (or None), the checkpoints and the last state (b, d, n) in ``acc``."""
    b, d, l = u.shape
    g, n = B.shape[1], B.shape[2]
    dg = d // g
    n_chunks = triton.cdiv(l, cfg.chunk)
    # Before any allocation; out (u's layout) and the backward's contiguous (b, g, n, l) dB, dC buffers as
    # meta tensors.
    _check_row_offsets(u=u, delta=delta, z=z, out=torch.empty_like(u, device="meta"), B=B, C=C, seq_idx=seq_idx,
                       dB=torch.empty(b, g, n, l, device="meta"))
    # empty_like keeps u's layout: time-major in, time-major out, as the chunked backend.
    out = torch.empty_like(u)
    ypre = torch.empty_like(u) if z is not None else None
    ckpt = u.new_empty(b, d, n_chunks + 1, n, dtype=_checkpoint_dtype(u, acc, cfg))
    # The fused-state forward writes the last state apart, in acc (the checkpoints may be bfloat16).
    last = u.new_empty(b, d, n, dtype=acc) if cfg.fused_states else None
    block_d = _block_d(dg, cfg.fwd_block_d)
    grid = (triton.cdiv(dg, block_d), g, b)
    dummy = u
    # The initial state as the kernels take it: a pointer and a flag, or (time-wise) in the first checkpoint.
    state_in, shape = (dummy if h0 is None else h0,), {"HAS_H0": h0 is not None}
    if cfg.fused_states:
        kernel = _fused_fwd_kernel
        shape |= {"BLOCK_N": triton.next_power_of_2(n), "CK": cfg.chunk}
        warps, last_arg = _fused_warps(cfg.fwd_warps, block_d, n), (last,)
    elif cfg.timewise:
        ckpt[:, :, 0] = 0.0 if h0 is None else h0
        kernel, warps, last_arg, state_in, shape = _tw_fwd_kernel, cfg.fwd_warps, (), (), {}
    else:
        kernel, warps, last_arg = _selective_scan_fwd_kernel, cfg.fwd_warps, ()
    kernel[grid](
        u, delta, A, B, C, dummy if D is None else D, dummy if z is None else z,
        dummy if bias is None else bias, *state_in, dummy if seq_idx is None else seq_idx,
        out, dummy if ypre is None else ypre, ckpt, *last_arg,
        d, dg, l, n,
        *u.stride(), *delta.stride(), *_strides(z, 3), *out.stride(),
        *B.stride(), *C.stride(), *_strides(seq_idx, 2),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None,
        HAS_SEQ=seq_idx is not None, SOFTPLUS=softplus, ACC=_tl_dtype(acc),
        BLOCK_D=block_d, T=cfg.fwd_chunk or cfg.chunk, num_warps=warps, **shape,
    )
    if last is None:
        # The chunk-tile kernels keep acc checkpoints; the last one is the state after the sequence.
        last = ckpt[:, :, -1].clone()
    return out, ypre, ckpt, last


def _backward(u, delta, A, B, C, D, z, bias, seq_idx, ckpt, ypre, dout, dlast, softplus, acc, cfg):
    b, d, l = u.shape
    g, n = B.shape[1], B.shape[2]
    dg = d // g
    n_chunks = ckpt.shape[2] - 1
    # The forward checked u, delta, z (so du, ddelta, dz); dout may come in any layout.
    _check_row_offsets(dout=dout)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = None if z is None else torch.empty_like(z)
    dB = torch.zeros(b, g, n, l, dtype=acc, device=u.device)
    dC = torch.zeros(b, g, n, l, dtype=acc, device=u.device)
    dD = None if D is None else u.new_empty(b, d, dtype=acc)
    dbias = None if bias is None else u.new_empty(b, d, dtype=acc)
    block_d = _block_d(dg, cfg.bwd_block_d)
    grid = (triton.cdiv(dg, block_d), g, b)
    dummy = u
    if cfg.fused_states:
        # One (b, d, n) tensor each: the kernel keeps the running values in registers.
        dh = u.new_empty(b, d, n, dtype=acc)
        dh.copy_(dlast)
        dA = u.new_empty(b, d, n, dtype=acc)
        kernel, last, shape, slot = _fused_bwd_kernel, (), {"BLOCK_N": triton.next_power_of_2(n)}, ()
        warps = _fused_warps(cfg.bwd_warps, block_d, n)
    elif cfg.timewise:
        # Adjoint carries in per-boundary slots (the last: d(last state)), dA shares per tile: no slot is
        # written twice, so the kernel needs neither parity slots nor read-modify-writes.
        dh = u.new_empty(b, d, n_chunks + 1, n, dtype=acc)
        dh[:, :, -1] = dlast
        dA = u.new_empty(b, d, n_chunks, n, dtype=acc)
        kernel, slot, warps = _tw_bwd_kernel, (), cfg.bwd_warps
        shape = {"EVEN_T": l % cfg.chunk == 0, "RUN": _timewise_run(cfg.chunk, block_d, warps, u.element_size())}
    else:
        dh = u.new_empty(2, b, d, n, dtype=acc)
        dh[0] = dlast
        dA = u.new_zeros(2, b, d, n, dtype=acc)
        kernel, last, shape, slot = _selective_scan_bwd_kernel, (n_chunks % 2,), {}, (b * d * n,)
        warps = cfg.bwd_warps
    kernel[grid](
        u, delta, A, B, C, dummy if D is None else D, dummy if z is None else z,
        dummy if bias is None else bias, dummy if seq_idx is None else seq_idx, ckpt,
        dummy if ypre is None else ypre, dout,
        du, ddelta, dummy if dz is None else dz, dB, dC, dA,
        dummy if dD is None else dD, dummy if dbias is None else dbias, dh,
        d, dg, l, n, *slot,
        *u.stride(), *delta.stride(), *_strides(z, 3), *_strides(ypre, 3), *dout.stride(),
        *B.stride(), *C.stride(), *_strides(seq_idx, 2),
        *du.stride(), *ddelta.stride(), *_strides(dz, 3),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None,
        HAS_SEQ=seq_idx is not None, SOFTPLUS=softplus, ACC=_tl_dtype(acc),
        BLOCK_D=block_d, T=cfg.chunk, num_warps=warps, **shape,
    )
    if cfg.timewise:
        dA, dh = dA.sum(2), dh[:, :, 0]
    else:
        # The unfused kernel leaves its results in one of two slots; last == () picks the whole tensor.
        dA, dh = dA[last], dh[last]
    return (
        du, ddelta, dA.sum(0), dB, dC, None if dD is None else dD.sum(0), dz,
        None if dbias is None else dbias.sum(0), dh,
    )


class _SelectiveScanTriton(torch.autograd.Function):
    """The whole op; inputs in their own dtypes (converted in the kernels), B and C as (b, g, n, l)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias, h0, seq_idx, softplus, acc, cfg):
        out, ypre, ckpt, last = _forward(u, delta, A, B, C, D, z, bias, h0, seq_idx, softplus, acc, cfg)
        ctx.save_for_backward(u, delta, A, B, C, D, z, bias, h0, seq_idx, ckpt, ypre)
        ctx.softplus, ctx.acc, ctx.cfg = softplus, acc, cfg
        return out, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, bias, h0, seq_idx, ckpt, ypre = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _backward(
            u, delta, A, B, C, D, z, bias, seq_idx, ckpt, ypre, dout, dlast, ctx.softplus, ctx.acc, ctx.cfg
        )

        def cast(grad, like):
            return None if like is None else grad.to(like.dtype)

        return (
            du, ddelta, cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), dz, cast(dbias, bias),
            cast(dh0, h0), None, None, None, None,
        )


def default_config(u: torch.Tensor, delta: torch.Tensor, needs_grad: bool) -> ScanConfig:
    """The launch shape for u and delta (b, d, l): time-wise where both are contiguous along time."""
    if u.stride(-1) == 1 and delta.stride(-1) == 1:
        return TIMEWISE_CONFIG
    return TRAINING_CONFIG if needs_grad else DEFAULT_CONFIG


def selective_scan_triton(
    inputs: ScanInputs, config: ScanConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``selective_scan_reference`` (validated arguments, B and C as (b, g, n, l)).

    u, delta, z (b, d, l) and B, C (b, g, n, l) may have any strides (time-major views included; ``out``
    keeps u's layout). The state and all sums are float32 (float64 when an input is float64). Extra
    memory: the (b, d, cdiv(l, chunk) + 1, n) checkpoint tensor saved for backward (float32; bfloat16 for
    bfloat16 u where a config sets ``ScanConfig.lowp_checkpoints``), and float32 (b, g, n, l)
    dB, dC buffers during backward. ``config`` sets the launch shape (default: ``TIMEWISE_CONFIG`` when u and
    delta are contiguous along time, else ``TRAINING_CONFIG`` when a gradient will be needed, else
    ``DEFAULT_CONFIG``). The kernels index a batch row with 32-bit offsets:
    a call where an offset within a row passes 2^31 - 1 (d l > 2^31 for dense u) raises ValueError.
    """
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx = inputs.unpack()
    acc = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    cfg = config or default_config(u, delta, needs_grad)
    # Small per-channel tensors are read with unit strides; (b, d, n) states as contiguous rows.
    A, D, delta_bias = (None if t is None else t.contiguous() for t in (A, D, delta_bias))
    h0 = None if initial_state is None else initial_state.contiguous()
    out, last = _SelectiveScanTriton.apply(
        u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, delta_softplus, acc, cfg
    )
    return out, last
