"""Launch settings of the decode-step kernels at small batch: one table, every variant selectable.

At batch 1 a decode step is a chain of ~3 kernels a layer that each read a few MB of weights; each kernel's
launch, ramp-up and tail cost about as much as its bytes (79 kernels at ~5 µs on an H100 for mamba2-130m,
against a bandwidth floor of ~1 µs each). These settings choose how the kernels of
:mod:`ssmkit.ops.norm_linear`, :mod:`ssmkit.ops.decode_step` and the greedy head launch:

* ``pdl``: programmatic dependent launch (Hopper and later, Triton's ``launch_pdl``). A kernel starts while
  its predecessor runs, loads its weights (parameters: never written during decoding), then waits for the
  predecessor (``gdc_wait``) before it reads activations or writes anything; so the weight stream of layer
  l + 1 overlaps the tail of layer l. Each kernel lets its successor start as soon as all of its own programs
  have started. Off where unsupported (CPU, Triton's interpreter, before sm_90, a Triton without it).
* ``gemv_tile``: weight elements a program of the norm + linear GEMV holds (``BLOCK_N × next_pow2(K)``);
  smaller tiles give more programs (in_proj 768 → 3352: 8192 gives 419 programs, 4096 gives 838).
* ``gemv_warps``: warps a GEMV program runs.
* ``step_block_p``: at most this many head dims a program of the Mamba-2 convolution + state update kernel
  (mamba2-130m at batch 1: 64 → 24 programs, 32 → 48, 8 → 192).
* ``greedy_head``: a greedy step (no penalty) picks its token with the final norm, the head GEMV and the
  argmax fused (:func:`ssmkit.ops.norm_linear.rms_norm_linear_argmax`, two kernels) instead of the norm,
  the head matmul, the vocabulary mask, the float cast and ``argmax`` (five to six).
* ``mamba1_out_gemv``: a Mamba block's ``out_proj`` and residual add in the GEMV kernel (one kernel)
  instead of cuBLAS and an add.

:data:`VARIANTS` names the combinations the decode benchmark times; :func:`use` switches for a block of code,
:func:`set_current` for the process, and the environment variable ``SSMKIT_DECODE_LAUNCH`` (a variant's name)
chooses the settings at import.
Settings are read when a kernel launches: a captured CUDA graph keeps the ones of its capture
(``ssmkit.generation.clear_graph_cache`` after switching).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["VARIANTS", "DecodeLaunch", "current", "pdl_available", "pdl_launch", "set_current", "use"]


@dataclasses.dataclass(frozen=True)
class DecodeLaunch:
    """How the small-batch decode kernels launch (see the module docstring)."""

    pdl: bool = False
    gemv_tile: int = 8192
    gemv_warps: int = 8
    step_block_p: int = 64
    greedy_head: bool = False
    mamba1_out_gemv: bool = False

    def __post_init__(self) -> None:
        for name in ("gemv_tile", "step_block_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 1, got {value!r}")
        if self.gemv_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"gemv_warps must be one of 1, 2, 4, 8, 16, got {self.gemv_warps!r}")


# The benchmark's variants: "default" is what runs unless switched, PDL with the greedy head and Mamba-1's
# out_proj GEMV (on an H100 at batch 1: mamba2-130m 2,659 tokens/s against 2,266 for "plain", everything off;
# mamba-130m 2,227 against 1,538; equal at batch 64; benchmarks/RESULTS.md). "pdl", "greedy_head" and "wide"
# each change one thing from "plain"; "pdl_head" is the default's settings by name, "best" adds "wide".
VARIANTS: dict[str, DecodeLaunch] = {
    "default": DecodeLaunch(pdl=True, greedy_head=True, mamba1_out_gemv=True),
    "plain": DecodeLaunch(),
    "pdl": DecodeLaunch(pdl=True),
    "greedy_head": DecodeLaunch(greedy_head=True, mamba1_out_gemv=True),
    "wide": DecodeLaunch(gemv_tile=4096, gemv_warps=4, step_block_p=8),
    "pdl_head": DecodeLaunch(pdl=True, greedy_head=True, mamba1_out_gemv=True),
    "best": DecodeLaunch(pdl=True, gemv_tile=4096, gemv_warps=4, step_block_p=8, greedy_head=True,
                         mamba1_out_gemv=True),
}



def _from_environment() -> DecodeLaunch:
    """The variant ``SSMKIT_DECODE_LAUNCH`` names (unset or empty: "default")."""
    name = os.environ.get("SSMKIT_DECODE_LAUNCH", "") or "default"
    if name not in VARIANTS:
        raise ValueError(f"SSMKIT_DECODE_LAUNCH={name!r} is not a decode launch variant; known: {', '.join(VARIANTS)}")
    return VARIANTS[name]


_current = _from_environment()


def current() -> DecodeLaunch:
    """The settings kernels launch with now."""
    return _current


def set_current(settings: DecodeLaunch) -> None:
    """Make ``settings`` the ones every later launch uses (process-wide)."""
    global _current
    if not isinstance(settings, DecodeLaunch):
        raise TypeError(f"settings must be a DecodeLaunch, got {type(settings).__name__}")
    _current = settings


@contextmanager
def use(settings: DecodeLaunch | str) -> Iterator[DecodeLaunch]:
    """Launch with ``settings`` (or the :data:`VARIANTS` entry of that name) inside the block."""
    if isinstance(settings, str):
        if settings not in VARIANTS:
            raise ValueError(f"unknown decode launch variant {settings!r}; known: {', '.join(VARIANTS)}")
        settings = VARIANTS[settings]
    saved = current()
    set_current(settings)
    try:
        yield settings
    finally:
        set_current(saved)


def pdl_available(device: torch.device) -> bool:
    """Whether kernels on ``device`` can use programmatic dependent launch (sm_90+, compiled, Triton has it)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return _triton_has_pdl() and _major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


@functools.cache
def _major(index: int) -> int:
    """The compute capability's major number of CUDA device ``index`` (asked once: launches read it)."""
    return torch.cuda.get_device_capability(index)[0]


@functools.cache
def _triton_has_pdl() -> bool:
    try:
        import triton.language.extra.cuda as cuda_extra
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return hasattr(cuda_extra, "gdc_wait") and "launch_pdl" in CUDAOptions.__dataclass_fields__


def pdl_launch(device: torch.device) -> tuple[bool, dict[str, bool]]:
    """(the kernels' ``PDL`` flag, the extra launch arguments) under the current settings on ``device``."""
    on = current().pdl and pdl_available(device)
    return on, ({"launch_pdl": True} if on else {})
