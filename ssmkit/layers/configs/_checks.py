"""Checks shared by the layer configs, and :func:`layer_settings` (a config with keyword overrides)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


# S4 and S4D initialise from a HiPPO matrix whose eigendecomposition costs O(d_state^3) time and
# O(d_state^2) memory; the papers use 64 to 256.
MAX_HIPPO_STATE = 4096


def _even_state(prefix: str, d_state: int) -> None:
    if d_state < 2 or d_state % 2:
        raise ValueError(f"{prefix}.d_state must be even and >= 2 (states come in conjugate pairs), got {d_state}")
    if d_state > MAX_HIPPO_STATE:
        raise ValueError(f"{prefix}.d_state must be at most {MAX_HIPPO_STATE} (its HiPPO initialisation is an "
                         f"O(d_state^3) eigendecomposition), got {d_state}")


def _dt_range(prefix: str, dt_min: float, dt_max: float, floor: float) -> None:
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"{prefix}.dt_min / dt_max must satisfy 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    if floor < 0:
        raise ValueError(f"{prefix}.dt_init_floor must be >= 0, got {floor}")


_Settings = TypeVar("_Settings")


def layer_settings(cls: type[_Settings], config: _Settings | None, overrides: dict[str, Any], owner: str) -> _Settings:
    """What a layer runs with: ``config`` (default ``cls()``: the defaults live only in the config class)
    with keyword ``overrides`` of its fields, so ``Mamba2(64, d_state=32)`` is
    ``Mamba2(64, Mamba2Config(d_state=32))``."""
    if config is not None and not isinstance(config, cls):
        raise TypeError(f"{owner}: config must be a {cls.__name__}, got {type(config).__name__}")
    try:
        return dataclasses.replace(cls() if config is None else config, **overrides)
    except TypeError as e:
        raise TypeError(f"{owner}: {e} (the settings are the fields of {cls.__name__})") from None
