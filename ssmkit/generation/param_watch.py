"""Whether a model's parameters or buffers changed since last asked, cheaply enough to ask every decode step.

A captured CUDA graph reads what it read at capture: the parameters' storage (so an in-place update is
seen by a replay), but also tensors computed from the parameters outside the graph and cached on the
layers while the parameters keep their version counter (Mamba's decode ``A = -exp(A_log)``,
:func:`ssmkit.layers.mamba.decode_A`; an int8 layer's cast scales). After ``load_state_dict`` or
``A_log.add_(...)`` a replay would read the old ``A`` -- or freed memory, once an eager step has
recomputed it. So a graph is valid only while every parameter and buffer keeps its storage
(``data_ptr``) and version (``_version``, bumped by every in-place op), the rule of
:mod:`ssmkit.generation.graph_cache`, and while no module of the model got a new parameter, buffer or
submodule.

Walking ``model.parameters()`` costs about half a millisecond for a 130M model (the module tree), too much
per token. So :class:`ParameterWatch` lists the tensors once and compares their versions and addresses
per call (tens of microseconds for a 130M model's 218 tensors), and a process-wide count of
registrations (``torch.nn``'s global registration hooks: a parameter, buffer or submodule assigned to any
module) tells when the list itself must be made again.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

# Parameters, buffers and submodules assigned to any module of the process so far (approximate under
# concurrent assignments, but it changes whenever one happens, which is all a watch needs).
_registrations = [0]


def _count(*_: object) -> None:
    _registrations[0] += 1


@functools.cache
def _count_registrations() -> None:
    """Install the counting hooks, once, when the first watch is made (not at import: they see every
    module of the process, so a program that never watches a model should not carry them)."""
    for register in (register_module_parameter_registration_hook, register_module_buffer_registration_hook,
                     register_module_module_registration_hook):
        register(_count)


class ParameterWatch:
    """Tells whether ``model``'s parameters and buffers changed (updated in place, their storage swapped, or
    replaced by other tensors) since the last :meth:`changed` (or since the watch was made)."""

    def __init__(self, model: nn.Module) -> None:
        _count_registrations()
        self.model = model
        self.walks = 0  # times the module tree was walked (once, then after registrations anywhere)
        self._state = self._walk()

    def changed(self) -> bool:
        """True when anything changed since the last call; then the new state is the reference."""
        state = self._walk() if _registrations[0] != self._seen else (*self._read(), self._state[2])
        if state == self._state:
            return False
        self._state = state
        return True

    def _walk(self) -> tuple[list[int], list[int], list[int]]:
        self._seen = _registrations[0]
        self._tensors: tuple[torch.Tensor, ...] = (*self.model.parameters(), *self.model.buffers())
        self.walks += 1
        # The tensors' ids too: another tensor of the same storage and version in a module is a change.
        return (*self._read(), [id(t) for t in self._tensors])

    def _read(self) -> tuple[list[int], list[int]]:
        tensors = self._tensors
        return [t._version for t in tensors], [t.data_ptr() for t in tensors]
