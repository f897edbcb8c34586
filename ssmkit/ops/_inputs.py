"""The base of the ops' inputs values: each op family checks its arguments once, in its public function,
and hands every backend one frozen dataclass of them (``SSDInputs``, ``Mamba3Inputs``, ``ScanInputs``,
``ConvInputs``, ...) instead of repeating its argument list per backend."""

from __future__ import annotations

import dataclasses
import functools

__all__ = ["OpInputs", "field_names"]


@functools.cache
def field_names(cls: type) -> tuple[str, ...]:
    """A dataclass's field names in order, looked up once per class (``dataclasses.fields`` walks the class
    every call: a few microseconds an op call, at sizes where the layers are bound by the host)."""
    return tuple(f.name for f in dataclasses.fields(cls))


class OpInputs:
    """Mixin of the frozen dataclasses that carry an op's checked arguments to its backends."""

    def unpack(self) -> tuple:
        """The fields in order, the tensors themselves (``dataclasses.astuple`` would copy them)."""
        return tuple(getattr(self, name) for name in field_names(type(self)))
