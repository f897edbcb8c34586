"""The arguments of one Mamba-3 scan as every backend takes them: one :class:`Mamba3Inputs` value.

The public op checks them (``mamba3_scan``) before it builds this; a backend neither re-checks them nor repeats
the op's argument list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from ssmkit.ops._inputs import OpInputs, field_names
from ssmkit.ops._precision import compute_dtype


class Mamba3ScanState(NamedTuple):
    """What the Mamba-3 recurrence carries from one token to the next.

    angle: (b, h, a) accumulated rotary angles θ (in [0, 2π));
    ssm: (b, h, p, n) the state H;
    last_B: (b, r, h, n) the previous position's rotated, biased B̃ (per head);
    last_x: (b, h, p) the previous position's x (before ``mimo_x``).
    """

    angle: torch.Tensor
    ssm: torch.Tensor
    last_B: torch.Tensor
    last_x: torch.Tensor


__all__ = ["Mamba3Inputs"]


@dataclasses.dataclass(frozen=True)
class Mamba3Inputs(OpInputs):
    """Arguments of ``mamba3_scan`` (see there for shapes and meaning), ``initial_state`` as a
    :class:`Mamba3ScanState` or None."""

    x: torch.Tensor
    dt: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    trap: torch.Tensor
    angles: torch.Tensor
    chunk_size: int
    D: torch.Tensor | None
    z: torch.Tensor | None
    B_bias: torch.Tensor | None
    C_bias: torch.Tensor | None
    mimo_x: torch.Tensor | None
    mimo_z: torch.Tensor | None
    mimo_o: torch.Tensor | None
    rotary_interleaved: bool
    initial_state: Mamba3ScanState | None
    seq_idx: torch.Tensor | None

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Mamba3Inputs:
        """From arguments by name (``mamba3_scan``'s ``locals()``, a test's dict; not checked here): the
        tensors x .. angles and chunk_size are required, the rest default as in ``mamba3_scan``; names that
        are not fields (``backend``, ...) are left out."""
        fields = field_names(cls)
        given = {k: v for k, v in args.items() if k in fields}
        state = given.get("initial_state")
        given["initial_state"] = None if state is None else Mamba3ScanState(*state)
        return cls(**(_DEFAULTS | given))

    def compute_dtype(self) -> torch.dtype:
        """float64 if any input (the initial state's tensors included) is float64, else float32."""
        return compute_dtype(*(v for v in self.unpack() if isinstance(v, torch.Tensor)), *(self.initial_state or ()))


_OPTIONAL_TENSORS = ("D", "z", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o", "initial_state", "seq_idx")
_DEFAULTS = dict.fromkeys(_OPTIONAL_TENSORS) | {"rotary_interleaved": True}
