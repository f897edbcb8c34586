"""Recurrent state objects: what one layer carries from one call to the next.

Each layer kind owns a state class (``MambaState`` beside ``Mamba``, ``Mamba2State`` beside ``Mamba2``);
they share this base, a dataclass of tensors whose first dimension is the batch. States are values:
:meth:`clone` gives an independent copy, and a layer called with ``cache=state`` updates it in place
(so a CUDA graph can capture decode steps).

The state protocol: what the model, its cache, generation and the server rely on from every mixer,
whatever its class (they never check classes):

- ``forward(x, *, seq_idx=None, initial_state=None, cache=None)``: ``initial_state`` is read, never written;
  ``cache`` is read and updated in place to the state after ``x``;
- ``allocate_state(batch_size, dtype=None, device=None, max_length=None)``: a zero state (``max_length``
  preallocates room in states that grow; fixed-size states ignore it);
- optionally ``step_from_residual(residual, norm, cache, *, scale=1.0)``: one token of the pre-norm block,
  ``residual + scale * mixer(norm(residual))``, fused;
- ``decode_graph_blocker``: None when the one-token step with a cache makes no host synchronisation and
  allocates nothing (a CUDA graph may capture it), else the reason; absent = not known to be capturable.
  Feed-forwards carry it too.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

STATE_TYPES: dict[str, type[LayerState]] = {}
# Field names per state class, read once: ``dataclasses.fields`` costs microseconds a call, and servers ask
# for the tensors of every layer's state per request (copies into batch rows, snapshot sizes).
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


@dataclasses.dataclass(eq=False)
class LayerState:
    """Base of the per-layer-kind states: tensor fields, batch first.

    Subclasses set ``kind`` (the name used in saved caches) and are registered in ``STATE_TYPES``.
    """

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            STATE_TYPES[cls.kind] = cls

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state's tensors by field name."""
        names = _FIELD_NAMES.get(type(self))
        if names is None:
            names = _FIELD_NAMES[type(self)] = tuple(f.name for f in dataclasses.fields(self))
        return {name: getattr(self, name) for name in names}

    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors().values())).shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())

    def clone(self) -> LayerState:
        """An independent copy (same dtypes and device)."""
        return type(self)(**{k: v.clone() for k, v in self.tensors().items()})

    def copy_(self, other: LayerState) -> LayerState:
        """Overwrite this state in place with ``other``'s values (same kind and shapes)."""
        if type(other) is not type(self):
            raise TypeError(f"cannot copy a {type(other).__name__} into a {type(self).__name__}")
        for name, t in self.tensors().items():
            src = getattr(other, name)
            if src.shape != t.shape:
                raise ValueError(f"{type(self).__name__}.{name}: shape {tuple(src.shape)} != {tuple(t.shape)}")
            t.copy_(src)
        return self

    def zero_(self, rows: torch.Tensor | None = None) -> LayerState:
        """Reset to the zero state, in place: every row, or the rows where the bool (b,) ``rows`` is True."""
        for t in self.tensors().values():
            if rows is None:
                t.zero_()
            else:
                t.masked_fill_(rows.view(-1, *([1] * (t.dim() - 1))), 0)
        return self

    def check(self, owner: str, expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]]) -> None:
        """Raise ``ValueError`` unless each field has the expected shape (and dtype when not None)."""
        for name, (shape, dtype) in expected.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise ValueError(f"{owner}: state.{name} has shape {tuple(t.shape)}, expected {shape}")
            if dtype is not None and t.dtype != dtype:
                raise ValueError(f"{owner}: state.{name} has dtype {t.dtype}, expected {dtype}")


def next_conv_state(conv_state: torch.Tensor, x: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """The convolution window after reading ``x``: its last ``w`` inputs, (b, d, w).

    conv_state: (b, d, w), the window before ``x``; x: (b, d, l), pre-convolution inputs. With
    ``seq_idx`` (b, l) the window belongs to the last position's document: entries of other documents
    are zeroed, and the old window counts as part of the document of ``seq_idx[:, 0]``.
    """
    w = conv_state.shape[-1]
    window = torch.cat([conv_state, x.to(conv_state.dtype)], dim=-1)[..., -w:]
    if seq_idx is not None:
        docs = torch.cat([seq_idx[:, :1].expand(-1, w), seq_idx], dim=1)[:, -w:]
        window = window * (docs == seq_idx[:, -1:]).unsqueeze(1).to(window.dtype)
    return window


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or kept in float64: SSM parameters (A, D, Δ bias) are used at full precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def one_token(residual: torch.Tensor, owner: str) -> torch.Tensor:
    """The (b, d) row of a one-token step's (b, 1, d) input; any other shape is an error naming ``owner``."""
    if residual.dim() != 3 or residual.shape[1] != 1:
        raise ValueError(f"{owner}: step_from_residual takes one token, (b, 1, d_model); got shape "
                         f"{tuple(residual.shape)}")
    return residual[:, 0]
