"""The arguments of one selective scan as every backend takes them: one :class:`ScanInputs` value.

``selective_scan_fn`` checks its arguments, then builds this with B and C in their grouped (b, g, n, l)
form; a backend neither re-checks them nor repeats the op's argument list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from ssmkit.ops._inputs import OpInputs

__all__ = ["ScanInputs"]


@dataclasses.dataclass(frozen=True)
class ScanInputs(OpInputs):
    """Arguments of ``selective_scan_fn`` (see there): u, delta, z (b, d, l); A (d, n); B, C (b, g, n, l);
    D, delta_bias (d,); initial_state (b, d, n); seq_idx (b, l)."""

    u: torch.Tensor
    delta: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor | None
    z: torch.Tensor | None
    delta_bias: torch.Tensor | None
    delta_softplus: bool
    initial_state: torch.Tensor | None
    seq_idx: torch.Tensor | None

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> ScanInputs:
        """From arguments by name (the op's ``locals()``, a test's dict; not checked here). u .. C are
        required; B and C of shape (b, n, l) become (b, 1, n, l); the rest default as in the op; names that
        are not fields (``backend``, ...) are left out."""
        fields = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in args.items() if k in fields}
        for name in ("B", "C"):
            given[name] = given[name] if given[name].dim() == 4 else given[name][:, None]
        return cls(**(_DEFAULTS | given))


_DEFAULTS = dict.fromkeys(("D", "z", "delta_bias", "initial_state", "seq_idx")) | {"delta_softplus": False}
