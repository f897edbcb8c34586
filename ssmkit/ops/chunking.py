"""The one ``chunk_size`` rule of the chunked scans (SSD and Mamba-3), for every backend.

``chunk_size`` is any positive int. It decides where the parallel algorithms cut the sequence into chunks,
never what they compute: every backend returns the reference's result (to float rounding) for every
allowed ``chunk_size``, and ``tests/ops/test_chunk_size.py`` checks that they agree. The chunk length T a
backend uses is :func:`chunk_length`:

- T = ``chunk_size``, shortened to the sequence length rounded up to 16 when the sequence is shorter (a
  prompt or a decode burst is one chunk of its own length, not a padded chunk of 256);
- kernels that need power-of-two tiles (the Triton SSD: tensor-core tiles of at least 16 rows) round T
  up to a power of two in [16, 256].

The reference backends have no chunks; they accept ``chunk_size`` (checked like everywhere) and ignore it.
"""

from __future__ import annotations

__all__ = ["MAX_POW2_CHUNK", "check_chunk_size", "chunk_length"]

MIN_POW2_CHUNK = 16  # the smallest tensor-core tile
MAX_POW2_CHUNK = 256  # (T, T) tiles larger than this no longer fit on chip


def check_chunk_size(chunk_size: object) -> int:
    """``chunk_size`` itself if it is a positive int (not a bool); else TypeError / ValueError."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return chunk_size


def chunk_length(chunk_size: int, length: int, *, power_of_two: bool = False) -> int:
    """The chunk length T for a sequence of ``length`` positions (see the module's rule)."""
    T = min(chunk_size, -(-length // 16) * 16)
    if power_of_two:
        T = min(MAX_POW2_CHUNK, max(MIN_POW2_CHUNK, 1 << (T - 1).bit_length()))
    return T
