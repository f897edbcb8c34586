"""Launch arithmetic for host code, in plain Python.

Triton's ``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` objects (3.5 on): called from
the host each unwraps its arguments through a list and a dict comprehension, a few microseconds a call, and a
layer's step makes dozens of such calls at sizes where it is bound by the host. These give the same integers.
"""

from __future__ import annotations

__all__ = ["cdiv", "next_power_of_2"]


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for positive b."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
