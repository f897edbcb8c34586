"""Argument checks shared by the ops: clear ``TypeError``/``ValueError`` naming the argument.

Shapes are checked against named dimensions. ``dims`` binds sizes as it goes: the first tensor that
carries a dimension fixes it, later tensors must agree, so the message can say what was expected.

NaN/inf in the data is not checked here (that would cost a device sync per call); it propagates
through the ops to the outputs that depend on it, as in any PyTorch op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Dims(dict):
    """Named dimension sizes bound while checking the arguments of one op call."""


def check_tensor(
    name: str,
    t: object,
    dims: Sequence[str],
    bound: Dims,
    *,
    floating: bool = True,
    integer: bool = False,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of shape ``dims`` (names bound in ``bound``) and the right kind.

    A dimension spelled as a digit string (``"1"``) must have exactly that size.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({', '.join(dims)}), got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    shape = t.shape
    if len(shape) != len(dims):
        raise ValueError(f"{name} must have shape {_shown(dims, bound)}, got {tuple(shape)} "
                         f"({len(shape)} dims instead of {len(dims)})")
    for d, got in zip(dims, shape):
        want = bound.get(d)
        if want is None:
            if d.isdigit() and int(d) != got:
                want = int(d)
            else:
                bound[d] = got
                continue
        if want != got:
            raise ValueError(f"{name} must have shape {_shown(dims, bound)}, got {tuple(shape)} "
                             f"(dimension {d}: {got} != {want})")
    return t


def _shown(dims: Sequence[str], bound: Dims) -> str:
    """The expected shape for a message, built only when one is raised (checks run on every op call)."""
    return "(" + ", ".join(f"{d}={bound[d]}" if d in bound else d for d in dims) + ")"


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device; returns it."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    odd = {n: str(d) for n, d in devices.items() if d != first}
    if odd:
        raise ValueError(f"all tensors must be on one device; got {({n: str(d) for n, d in devices.items()})}")
    return first


def check_nonempty(name: str, size: int, what: str) -> None:
    """Refuse a zero-size dimension (an empty batch or sequence)."""
    if size == 0:
        raise ValueError(f"{name} has an empty {what} dimension (size 0)")


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


# Triton kernels that index within a batch row with 32-bit integers reach offsets up to this.
MAX_ROW_OFFSET = 2**31 - 1


def row_offset(x: torch.Tensor) -> int:
    """The largest element offset within one batch row of ``x`` (dims 1.. with their strides): what a kernel
    that indexes each row with 32-bit integers must reach."""
    return sum((size - 1) * abs(stride) for size, stride in zip(x.shape[1:], x.stride()[1:]))

