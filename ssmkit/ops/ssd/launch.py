"""Launch settings of the Triton SSD: one frozen value per call, never a module global.

:class:`SSDLaunch` says, per kernel, (num_warps, num_stages[, maxnreg]) (maxnreg caps registers per thread;
128: two programs of 8 warps per SM), and the tiles: ``*_tile`` rows (and source columns) of a chunk per
matmul tile in the forward's chunk states, its C Bᵀ and scan, and the backward (each also at most the chunk
length); ``min_programs``: the backward splits a group's heads over programs until it has this many;
``cols_split``: the columns kernel in two launches (dB with ``cols_dB``, then the rest); ``chain``: the
state passing chained into the chunk-state kernels (forward and backward), ``state_bwd_bn`` columns of the
state per program of the chained backward, ``state_bwd_tile`` its rows of a chunk per matmul tile.
``cb``, ``state_pass``, ``dt_bwd``: the small launches (C Bᵀ, the unchained forward state passing, dΔ).

The loops over a group's heads in the backward's rows and columns kernels (``*_head_stages``): 0 leaves
them to the compiler, which pipelines no load there (their matmuls accumulate nothing across heads:
sm_90 TTGIR shows no async copy), so each head waits out its loads; n > 0 pipelines them into n stages
(``tl.range(num_stages=n)``: the next heads' dy, x, cum, Δ in flight while this one computes; in the
columns kernel the head loop and its loop over row blocks are flattened into one first).
``cb_lowp``: C Bᵀ stored in the inputs' dtype for bf16/fp16 (float32 otherwise), half the bytes of the
tile every head of the scan and the columns kernel reads; it adds one rounding (the kernels round
C Bᵀ ⊙ L to that dtype for the matmul anyway). ``dcb_lowp``: the gradient of C Bᵀ summed over heads
stored likewise when one program holds all of a group's heads (its only readers cast it to that dtype
before their matmuls: the same results, half the bytes); float32 partial sums otherwise. ``scan_heads``:
heads per program of the forward scan (2: C and C Bᵀ loaded once for two heads of a group, half the bytes
of its largest L2 stream, where a group has an even number of heads; else 1). ``state_online``: the
chunk-state kernel in one pass over the chunk (Δ, cum and the chunk's state together, the state rescaled
by each block's decay), not two with Δ and cum written, waited for and read back in between.
``recompute_states`` (the default): the forward keeps neither Δ, cum, the states entering the chunks nor
C Bᵀ for the backward, which runs the forward's chunk-state (and state-passing) and C Bᵀ launches again
before its own kernels (the same kernels and launches: the same bits, the same gradients), as mamba_ssm's
backward does. It saves 2·4 bytes a (position, head), the (b, chunks, h, p, n) states in the inputs' dtype and
the (b, chunks, g, T, T) float32 C Bᵀ: at a Mamba-2 layer's shape (N 128, headdim 64, chunk 256, bf16) 0.81 of
one bf16 (b, l, d_inner) tensor, the cut issue 17 needed for 0.6x of the unfused layer's activations. Its cost:
one more chunk-state and C Bᵀ pass in the backward, by the kernel model of benchmarks/gpu_ssd_sweep.py 14% of
the backward's tensor FLOPs and 19% of its HBM bytes (10% and 13% of forward+backward; RESULTS.md). Off, the
forward saves them (``keep_states`` in :data:`CONFIGS`).

Registers and spills (``benchmarks/ssd_registers.py --all``: sm_90, the benchmark's call, each kernel compiled
from the launcher's own arguments as the JIT specializes them; device's Triton 3.6 / 3.9): the forward's
kernels spill nothing (chunk state 126 / 118 registers, C Bᵀ 80, scan 78 / 113). The backward's are capped at
128 (two 8-warp programs an SM): rows and the state-passing backward spill nothing there, rows_state 64 B,
the split columns kernels 0 and 96 B on 3.6; uncapped (``uncapped``) rows took 198, rows_state 199, cols
241 registers, one program an SM, and timed 16% slower at L 8192 on an H100. Other spilling configs: ``stages3`` and ``cols_h2`` (cols 255, 72 / 40 B on 3.6), ``bwd32_w4`` (cols 32 / 16 B).
Fastest configs of forward and backward kernels combine (separate fields).

:data:`CONFIGS` holds the named alternatives that ``benchmarks/gpu_ssd.py --sweep`` and
``benchmarks/gpu_ssd_sweep.py`` time on a GPU; pass one as ``mamba_chunk_scan_combined(...,
launch=CONFIGS[name])``. This module imports no Triton.
"""

from __future__ import annotations

import dataclasses

__all__ = ["CONFIGS", "DEFAULT_LAUNCH", "SSDLaunch"]

Opts = tuple[int, ...]  # (num_warps, num_stages) or (num_warps, num_stages, maxnreg)
_KERNELS = ("state", "scan", "cb", "state_pass", "state_bwd", "rows", "rows_state", "cols", "cols_dB", "dt_bwd")


@dataclasses.dataclass(frozen=True)
class SSDLaunch:
    """Warps, stages and tiles of every launch of the Triton SSD (see the module's docstring)."""

    state: Opts = (8, 2)
    scan: Opts = (8, 2)
    cb: Opts = (4, 3)
    state_pass: Opts = (4, 3)
    # The backward's 8-warp kernels capped at 128 registers (two programs an SM), the columns kernel split in
    # two: the sweep's winner on an H100 (fwd+bwd at L 8192 5.939 ms against 6.890 uncapped; RESULTS.md).
    state_bwd: Opts = (8, 2, 128)
    rows: Opts = (8, 3, 128)
    rows_state: Opts = (8, 2, 128)
    cols: Opts = (8, 1, 128)
    cols_dB: Opts = (8, 2, 128)
    dt_bwd: Opts = (4, 3)
    cols_split: bool = True
    state_tile: int = 64
    fwd_tile: int = 64
    bwd_tile: int = 64
    min_programs: int = 1024
    chain: bool = True
    state_bwd_bn: int = 128
    state_bwd_tile: int = 64
    rows_head_stages: int = 0
    rows_state_head_stages: int = 0
    cols_head_stages: int = 0
    cb_lowp: bool = False
    dcb_lowp: bool = False
    scan_heads: int = 1
    state_online: bool = False
    recompute_states: bool = True

    def __post_init__(self) -> None:
        for kernel in _KERNELS:
            opts = getattr(self, kernel)
            if not (isinstance(opts, tuple) and len(opts) in (2, 3) and all(isinstance(v, int) and v > 0 for v in opts)):
                raise ValueError(f"SSDLaunch.{kernel} must be (num_warps, num_stages[, maxnreg]), got {opts!r}")
        for name in ("state_tile", "fwd_tile", "bwd_tile", "state_bwd_bn", "state_bwd_tile"):
            tile = getattr(self, name)
            if not isinstance(tile, int) or tile < 16 or tile & (tile - 1):
                raise ValueError(f"SSDLaunch.{name} must be a power of two of at least 16, got {tile!r}")
        if not isinstance(self.min_programs, int) or self.min_programs < 1:
            raise ValueError(f"SSDLaunch.min_programs must be a positive int, got {self.min_programs!r}")
        for name in ("rows_head_stages", "rows_state_head_stages", "cols_head_stages"):
            stages = getattr(self, name)
            if not isinstance(stages, int) or isinstance(stages, bool) or not 0 <= stages <= 8:
                raise ValueError(f"SSDLaunch.{name} must be an int in [0, 8], got {stages!r}")
        if self.scan_heads not in (1, 2) or isinstance(self.scan_heads, bool):
            raise ValueError(f"SSDLaunch.scan_heads must be 1 or 2, got {self.scan_heads!r}")
        for name in ("chain", "cols_split", "cb_lowp", "dcb_lowp", "state_online", "recompute_states"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SSDLaunch.{name} must be a bool, got {getattr(self, name)!r}")

    def opts(self, kernel: str) -> dict:
        """Keyword launch options (num_warps, num_stages[, maxnreg]) of one kernel."""
        warps, stages, *maxnreg = getattr(self, kernel)
        return {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg[0]} if maxnreg else {})}

    def head_stages(self, kernel: str) -> int | None:
        """Pipeline stages of the head loop of ``kernel`` ("rows", "rows_state", "cols"); None: the compiler's."""
        return getattr(self, f"{kernel}_head_stages") or None

    def overrides(self) -> dict:
        """The fields that differ from the defaults (what a named config changes)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}


DEFAULT_LAUNCH = SSDLaunch()
_R = dataclasses.replace
CONFIGS: dict[str, SSDLaunch] = {
    "default": DEFAULT_LAUNCH,
    "scan_r128": _R(DEFAULT_LAUNCH, scan=(8, 2, 128)),
    "fwd_r128": _R(DEFAULT_LAUNCH, state=(8, 3, 128), scan=(8, 3, 128)),
    "state32_r128": _R(DEFAULT_LAUNCH, state_tile=32, scan=(8, 2, 128)),
    "stages3": _R(DEFAULT_LAUNCH, state=(8, 3), scan=(8, 3), rows=(8, 2), rows_state=(8, 3), cols=(8, 2)),
    "tiles128": _R(DEFAULT_LAUNCH, fwd_tile=128),
    "bwd_tile32": _R(DEFAULT_LAUNCH, bwd_tile=32, state_bwd_tile=32, rows=(8, 2), cols=(8, 1)),
    "bwd_tile32_r128": _R(DEFAULT_LAUNCH, bwd_tile=32, state_bwd_tile=32, rows=(8, 2, 128), cols=(8, 1)),
    "slices4": _R(DEFAULT_LAUNCH, min_programs=4096),
    "cols_joint": _R(DEFAULT_LAUNCH, cols_split=False, cols=(8, 1)),
    "scan32_w4": _R(DEFAULT_LAUNCH, fwd_tile=32, scan=(4, 2)),
    "scan32_w4_s3": _R(DEFAULT_LAUNCH, fwd_tile=32, scan=(4, 3)),
    # The state passing as separate kernels (per-chunk states through memory). Chained is the default since
    # tests/gpu/test_ssd.py passed with it on an H100 and it timed 6.52 against 6.95 ms fwd+bwd at L 8192.
    "no_chain": _R(DEFAULT_LAUNCH, chain=False),
    "bwd32_w4": _R(DEFAULT_LAUNCH, bwd_tile=32, state_bwd_tile=32, rows=(4, 2), rows_state=(4, 2), cols=(4, 1)),
    # The chained state-passing backward reads each chunk's dy once per block of the state's columns: the
    # default takes 128 (N 128: once), 6.06 against 6.52 ms fwd+bwd at L 8192 with 64 (H100, sweep).
    "state_bwd_bn64": _R(DEFAULT_LAUNCH, state_bwd_bn=64, state_bwd=(8, 3)),
    "state_bwd_bn128_s3": _R(DEFAULT_LAUNCH, state_bwd=(8, 3)),
    "state_bwd_bn32_w4": _R(DEFAULT_LAUNCH, state_bwd_bn=32, state_bwd=(4, 3)),
    # Issue 16's second sweep (benchmarks/gpu_ssd_sweep.py); registers in the module docstring's tool.
    "rows_h2": _R(DEFAULT_LAUNCH, rows_head_stages=2),
    "rows_h3": _R(DEFAULT_LAUNCH, rows_head_stages=3),
    "rows_state_h2": _R(DEFAULT_LAUNCH, rows_state_head_stages=2),
    "cb_lowp": _R(DEFAULT_LAUNCH, cb_lowp=True),
    "dcb_lowp": _R(DEFAULT_LAUNCH, dcb_lowp=True),
    "lowp": _R(DEFAULT_LAUNCH, cb_lowp=True, dcb_lowp=True),
    "scan_w4": _R(DEFAULT_LAUNCH, scan=(4, 2)),
    "scan_w4_s3": _R(DEFAULT_LAUNCH, scan=(4, 3)),
    "state_bwd_tile32": _R(DEFAULT_LAUNCH, state_bwd_tile=32),
    # The columns kernel's flattened head loop pipelined (cols_h2 spills 40 B on 3.6; split, none).
    "cols_h2": _R(DEFAULT_LAUNCH, cols_head_stages=2),
    "cols_split_h2": _R(DEFAULT_LAUNCH, cols_split=True, cols_head_stages=2),
    "cols_split_h3": _R(DEFAULT_LAUNCH, cols_split=True, cols_head_stages=3),
    "bwd_h2": _R(DEFAULT_LAUNCH, rows_head_stages=2, rows_state_head_stages=2, cols_split=True, cols_head_stages=2),
    "bwd_h2_lowp": _R(DEFAULT_LAUNCH, rows_head_stages=2, rows_state_head_stages=2, cols_split=True,
                      cols_head_stages=2, cb_lowp=True, dcb_lowp=True),
    # The scan two heads a program (158 / 188 registers against 78 / 113 one head; no spills).
    "scan_2h": _R(DEFAULT_LAUNCH, scan_heads=2),
    "scan_2h_s3": _R(DEFAULT_LAUNCH, scan_heads=2, scan=(8, 3)),
    "scan_2h_lowp": _R(DEFAULT_LAUNCH, scan_heads=2, cb_lowp=True),
    "all_h2_lowp": _R(DEFAULT_LAUNCH, scan_heads=2, rows_head_stages=2, rows_state_head_stages=2, cols_split=True,
                      cols_head_stages=2, cb_lowp=True, dcb_lowp=True),
    # The chunk states in one pass (114 / 108 registers against 126 / 118 for two; no spills).
    "state_online": _R(DEFAULT_LAUNCH, state_online=True),
    "state_online_t128": _R(DEFAULT_LAUNCH, state_online=True, state_tile=128),
    # Δ, cum, the entering states and C Bᵀ kept from the forward for the backward (the default before the
    # backward recomputed them: issue 17's activation memory), timed beside the default by gpu_ssd_sweep.py.
    "keep_states": _R(DEFAULT_LAUNCH, recompute_states=False),
    # The default's backward kernels are capped at 128 registers: two programs an SM instead of one (their
    # shared memory, 41-59 KB, allows it). On the device's Triton 3.6, as the JIT specializes the call: rows and
    # the state-passing backward spill nothing at 128 (198 and 132 uncapped), rows_state 64 B, cols 384 B
    # (split: dB none, the rest 96 B). The default before, uncapped, with the columns kernel joint:
    "uncapped": _R(DEFAULT_LAUNCH, rows=(8, 3), rows_state=(8, 2), state_bwd=(8, 2), cols_split=False,
                   cols=(8, 1), cols_dB=(8, 2)),
    "rows_r128": _R(DEFAULT_LAUNCH, rows_state=(8, 2), cols_split=False, cols=(8, 1), cols_dB=(8, 2)),
}
