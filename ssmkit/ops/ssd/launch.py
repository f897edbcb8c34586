"""Launch settings of the Triton SSD: one frozen value per call, never a module global.

:class:`SSDLaunch` says, per kernel, (num_warps, num_stages[, maxnreg]) (maxnreg caps registers per thread;
128: two programs of 8 warps per SM), and the tiles: ``*_tile`` rows (and source columns) of a chunk per
matmul tile in the forward's chunk states, its C Bᵀ and scan, and the backward (each also at most the chunk
length); ``min_programs``: the backward splits a group's heads over programs until it has this many;
``cols_split``: the columns kernel in two launches (dB with ``cols_dB``, then the rest); ``chain``: the
state passing chained into the chunk-state kernels (forward and backward), ``state_bwd_bn`` columns of the
state per program of the chained backward.

Registers and spills (benchmarks/ssd_registers.py: sm_90, the benchmark's call): scan 178 (128 with the
cap, no spills); backward rows 255 (8 B spilled), rows_state 224 (none), cols 255 (240 B; split: dB 231,
no spills, the rest 255, 8 B); chained state passing: forward 192, backward 236 (128 columns of the state
a program: ``state_bwd_bn``; 128 registers at 64 columns, but dy is then read twice). Fastest configs of
forward and backward kernels combine (separate fields).

:data:`CONFIGS` holds the named alternatives that ``benchmarks/gpu_ssd.py --sweep`` times on a GPU; pass one
as ``mamba_chunk_scan_combined(..., launch=CONFIGS[name])``. This module imports no Triton.
"""

from __future__ import annotations

import dataclasses

__all__ = ["CONFIGS", "DEFAULT_LAUNCH", "SSDLaunch"]

Opts = tuple[int, ...]  # (num_warps, num_stages) or (num_warps, num_stages, maxnreg)
_KERNELS = ("state", "scan", "state_bwd", "rows", "rows_state", "cols", "cols_dB")


@dataclasses.dataclass(frozen=True)
class SSDLaunch:
    """Warps, stages and tiles of every launch of the Triton SSD (see the module's docstring)."""

    state: Opts = (8, 2)
    scan: Opts = (8, 2)
    state_bwd: Opts = (8, 2)
    rows: Opts = (8, 3)
    rows_state: Opts = (8, 2)
    cols: Opts = (8, 1)
    cols_dB: Opts = (8, 2)
    cols_split: bool = False
    state_tile: int = 64
    fwd_tile: int = 64
    bwd_tile: int = 64
    min_programs: int = 1024
    chain: bool = True
    state_bwd_bn: int = 128

    def __post_init__(self) -> None:
        for kernel in _KERNELS:
            opts = getattr(self, kernel)
            if not (isinstance(opts, tuple) and len(opts) in (2, 3) and all(isinstance(v, int) and v > 0 for v in opts)):
                raise ValueError(f"SSDLaunch.{kernel} must be (num_warps, num_stages[, maxnreg]), got {opts!r}")
        for name in ("state_tile", "fwd_tile", "bwd_tile", "state_bwd_bn"):
            tile = getattr(self, name)
            if not isinstance(tile, int) or tile < 16 or tile & (tile - 1):
                raise ValueError(f"SSDLaunch.{name} must be a power of two of at least 16, got {tile!r}")
        if not isinstance(self.min_programs, int) or self.min_programs < 1:
            raise ValueError(f"SSDLaunch.min_programs must be a positive int, got {self.min_programs!r}")

    def opts(self, kernel: str) -> dict:
        """Keyword launch options (num_warps, num_stages[, maxnreg]) of one kernel."""
        warps, stages, *maxnreg = getattr(self, kernel)
        return {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg[0]} if maxnreg else {})}

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
    "bwd_tile32": _R(DEFAULT_LAUNCH, bwd_tile=32, rows=(8, 2), cols=(8, 1)),
    "bwd_tile32_r128": _R(DEFAULT_LAUNCH, bwd_tile=32, rows=(8, 2, 128), cols=(8, 1)),
    "slices4": _R(DEFAULT_LAUNCH, min_programs=4096),
    "cols_split": _R(DEFAULT_LAUNCH, cols_split=True),
    "scan32_w4": _R(DEFAULT_LAUNCH, fwd_tile=32, scan=(4, 2)),
    "scan32_w4_s3": _R(DEFAULT_LAUNCH, fwd_tile=32, scan=(4, 3)),
    # The state passing as separate kernels (per-chunk states through memory). Chained is the default since
    # tests/gpu/test_ssd.py passed with it on an H100 and it timed 6.52 against 6.95 ms fwd+bwd at L 8192.
    "no_chain": _R(DEFAULT_LAUNCH, chain=False),
    "bwd32_w4": _R(DEFAULT_LAUNCH, bwd_tile=32, rows=(4, 2), rows_state=(4, 2), cols=(4, 1)),
    # The chained state-passing backward reads each chunk's dy once per block of the state's columns: the
    # default takes 128 (N 128: once), 6.06 against 6.52 ms fwd+bwd at L 8192 with 64 (H100, sweep).
    "state_bwd_bn64": _R(DEFAULT_LAUNCH, state_bwd_bn=64, state_bwd=(8, 3)),
    "state_bwd_bn128_s3": _R(DEFAULT_LAUNCH, state_bwd=(8, 3)),
    "state_bwd_bn32_w4": _R(DEFAULT_LAUNCH, state_bwd_bn=32, state_bwd=(4, 3)),
}
