"""Backend choice for every op: ``"auto" | "reference" | "chunked" | "triton"``.

Triton is probed once, lazily, so that ``import ssmkit`` never imports it.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

BACKENDS = ("auto", "reference", "chunked", "triton")


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported and a CUDA device is present."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def resolve_backend(backend: str, device: torch.device, *, has_triton: bool = False) -> str:
    """Turn ``backend`` into a concrete one for tensors on ``device``.

    ``has_triton`` says whether the op has a Triton implementation. ``"auto"`` picks Triton on CUDA
    when the op has one and triton imports, else ``"chunked"``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if has_triton and device.type == "cuda" and triton_available():
            return "triton"
        return "chunked"
    if backend == "triton":
        if not has_triton:
            raise ValueError("backend='triton': this op has no Triton implementation; use 'chunked'")
        if device.type != "cuda" and not _triton_interpreter():
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}")
        if importlib.util.find_spec("triton") is None:
            raise ValueError("backend='triton' needs the triton package: pip install 'ssmkit[gpu]'")
    return backend


def _triton_interpreter() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"
