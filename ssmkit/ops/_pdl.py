"""Programmatic dependent launch inside Triton kernels (see :mod:`ssmkit.ops.decode_launch`).

A kernel launched with ``launch_pdl`` may start while the kernel before it on the stream still runs. It
calls :func:`pdl_trigger` first (its successor may start once every program of this one has), loads what
no kernel of the step writes (parameters), then :func:`pdl_wait` (the predecessor has finished and its
writes are visible) before it reads activations or states or writes anything: a write before the wait
could land in memory the predecessor still reads (a CUDA graph's pool reuses freed buffers). A parameter
read before the wait must not have been written by the kernel right before this one (a decode step's first
such kernel follows the embedding lookup, so an optimizer step or ``load_state_dict`` before decoding is
complete by then).
``PDL=False`` compiles neither (Triton's interpreter, older GPUs).
"""

from __future__ import annotations

import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: decode_launch.pdl_available says no
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def pdl_trigger(PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    if PDL:
        gdc_wait()
