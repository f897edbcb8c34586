"""The base of the ops' inputs values: each op family checks its arguments once, in its public function,
and hands every backend one frozen dataclass of them (``SSDInputs``, ``Mamba3Inputs``, ``ScanInputs``,
``ConvInputs``, ...) instead of repeating its argument list per backend."""

from __future__ import annotations

import dataclasses

__all__ = ["OpInputs"]


class OpInputs:
    """Mixin of the frozen dataclasses that carry an op's checked arguments to its backends."""

    def unpack(self) -> tuple:
        """The fields in order, the tensors themselves (``dataclasses.astuple`` would copy them)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))
