"""Model configuration: typed, nested dataclasses that round-trip through JSON.

A :class:`ModelConfig` holds the model-wide sizes and one settings section per registered layer kind
(:class:`MambaConfig` as ``config.mamba``, :class:`Mamba2Config` as ``config.mamba2``, ...,
:class:`MLPConfig`, :class:`MoEConfig`; :mod:`ssmkit.layers.registry` lists them); the argument names and
defaults are mamba_ssm's.

Layer pattern
-------------
``layer_pattern`` is a string of layer tokens. Each token is one *mixer letter*, optionally followed by
one lowercase *feed-forward letter*; the pattern repeats until it covers ``n_layer`` layers (it may not
be longer than ``n_layer``). The letters, settings sections and layer classes are those of the layer
registry (:mod:`ssmkit.layers.registry`); the built-in ones:

====== ==========================================================================
letter mixer
====== ==========================================================================
``M``  Mamba-1 (:class:`ssmkit.layers.Mamba`, settings ``mamba``)
``2``  Mamba-2 (:class:`ssmkit.layers.Mamba2`, ``mamba2``)
``3``  Mamba-3 (:class:`ssmkit.layers.Mamba3`, ``mamba3``)
``A``  full causal attention (:class:`ssmkit.layers.Attention`, ``attention``)
``W``  sliding-window attention (the same, window ``attention.window``)
``S``  S4D (:class:`ssmkit.layers.S4D`, ``s4d``)
``4``  S4 (:class:`ssmkit.layers.S4`, ``s4``)
``H``  Hyena (:class:`ssmkit.layers.Hyena`, ``hyena``)
====== ==========================================================================

Feed-forward suffix: none (the default: the block is mixer only), ``m`` SwiGLU MLP (``mlp``), ``e``
mixture of experts (``moe``). Examples: ``"M"`` is a pure Mamba stack, ``"2"`` pure Mamba-2,
``"MM2"`` with ``n_layer=6`` gives ``M M 2 M M 2``; Samba is ``"MmWm"``; Jamba (attention at
i % 8 == 4, MoE at i % 2 == 1) is ``"MmMeMmMeAmMeMmMe"``.

JSON
----
:meth:`ModelConfig.to_dict` / :meth:`ModelConfig.from_dict` (and :meth:`save` / :meth:`load` for files)
convert to and from plain JSON values; infinities (``dt_limit``) are written as the string ``"inf"``
because JSON has no infinity. Unknown keys at any nesting level, missing required keys and values of the
wrong type raise a ``ValueError`` that names them. A missing optional key takes its default, except where a
config class names it in ``LEGACY_DEFAULTS`` (a field added later whose default changed the function, such as
``mamba3.decay_activation``): there it takes the value that configs written before it meant.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Union

from ssmkit.io import files
from ssmkit.io.files import shown, write_text_atomic
from ssmkit.layers import registry
from ssmkit.layers.configs import (  # noqa: F401  (part of this module's public names)
    AttentionConfig,
    HyenaConfig,
    Mamba2Config,
    Mamba3Config,
    MambaConfig,
    MLPConfig,
    MoEConfig,
    S4Config,
    S4DConfig,
)
from ssmkit.layers.configs._checks import _positive

# Bounds on every int field, checked before anything is sized from them: sizes index int32 kernels, and
# no real model has more layers than this (the largest have a few hundred).
MAX_CONFIG_INT = 2**31 - 1
MAX_LAYERS = 100_000


class LayerSpec(NamedTuple):
    """What one layer is made of: its mixer kind (``"mamba"``, ``"attention"``, ...) and feed-forward
    (``"mlp"``, ``"moe"`` or None)."""

    mixer: str
    ff: str | None


@dataclass(kw_only=True, init=False)
class ModelConfig:
    """Everything needed to build a :class:`ssmkit.models.LanguageModel`.

    ``vocab_size`` is the number of real tokens; the embedding and the logits have
    :attr:`padded_vocab_size` rows (rounded up to ``pad_vocab_size_multiple``, as mamba_ssm does).

    Example::

        cfg = ModelConfig(vocab_size=256, d_model=64, n_layer=4, layer_pattern="2",
                          mamba2=Mamba2Config(headdim=32, d_state=32))
        cfg2 = ModelConfig.from_dict(cfg.to_dict())
    """

    vocab_size: int
    """Real tokens (the embedding is padded up to pad_vocab_size_multiple)."""
    d_model: int
    """Width of the residual stream."""
    n_layer: int
    """Number of layers."""
    layer_pattern: str = "M"
    """Mixer (and feed-forward) letters, repeated over the layers; see ssmkit.models.config."""
    norm_eps: float = 1e-5
    """RMSNorm eps."""
    tie_embeddings: bool = True
    """The head reuses the embedding matrix."""
    residual_in_fp32: bool = True
    """Keep the residual stream in float32."""
    pad_vocab_size_multiple: int = 8
    """Round the vocabulary up to a multiple of this."""
    initializer_range: float = 0.02
    """Std of the embedding initialisation."""
    rescale_prenorm_residual: bool = True
    """Scale residual output projections by 1/sqrt(branches) at init."""
    embedding_multiplier: float = 1.0
    """Scale of the embedding's output (µP; Falcon-H1's embedding_multiplier)."""
    logits_multiplier: float = 1.0
    """Scale of a language model's logits (µP; Falcon-H1's lm_head_multiplier)."""
    residual_multiplier: float = 1.0
    """Every mixer's and feed-forward's output is multiplied by this before it is added to the residual
    stream (Granite-4.0's residual_multiplier)."""
    sections: dict[str, Any] = field(default_factory=dict, metadata={"sections": registry.sections})
    """The settings of every registered layer kind by section name (``config.mamba2`` reads
    ``config.sections["mamba2"]``); in JSON each is a key of its own, beside the fields above."""

    def __init__(self, **values: Any) -> None:
        known = registry.sections()
        given = values.pop("sections", {})  # from dataclasses.replace; an explicit section wins over it
        sections = {name: values.pop(name) if name in values else given.get(name) for name in known}
        object.__setattr__(self, "sections", {n: known[n]() if s is None else s for n, s in sections.items()})
        missing = []
        for f in dataclasses.fields(self):
            if f.name == "sections":
                continue
            if f.name in values:
                object.__setattr__(self, f.name, values.pop(f.name))
            elif f.default is not dataclasses.MISSING:
                object.__setattr__(self, f.name, f.default)
            else:
                missing.append(f.name)
        if missing:
            raise TypeError(f"ModelConfig() missing required argument(s): {', '.join(missing)}")
        if values:
            raise TypeError(f"ModelConfig() got unknown argument(s) {', '.join(values)}; layer settings sections "
                            f"are {', '.join(known)}")
        self.validate()

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections")
        if sections is not None and name not in sections and name in registry.sections():
            sections[name] = registry.sections()[name]()  # a kind registered after this config was made
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"ModelConfig has no field or layer settings section {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__.get("sections", {}):
            self.sections[name] = value
        else:
            object.__setattr__(self, name, value)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def layer_specs(self) -> list[LayerSpec]:
        """The mixer and feed-forward of each of the ``n_layer`` layers, from ``layer_pattern``."""
        return parse_layer_pattern(self.layer_pattern, self.n_layer)

    def validate(self) -> None:
        """Check every value; raise ``ValueError`` with a message naming the bad field."""
        _check_types(self, "")
        for name in ("vocab_size", "d_model", "n_layer", "pad_vocab_size_multiple"):
            _positive(name, getattr(self, name))
        if self.n_layer > MAX_LAYERS:
            raise ValueError(f"n_layer must be at most {MAX_LAYERS:,}, got {self.n_layer:,}")
        _positive("norm_eps", self.norm_eps)
        _positive("initializer_range", self.initializer_range)
        for name in ("embedding_multiplier", "logits_multiplier", "residual_multiplier"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        tokens = pattern_tokens(self.layer_pattern)
        if len(tokens) > self.n_layer:
            raise ValueError(f"layer_pattern {self.layer_pattern!r} describes {len(tokens)} layers but n_layer "
                             f"is {self.n_layer}")
        used = {registry.by_name(name).section for spec in tokens for name in spec if name is not None}
        for section in (s for s in registry.sections() if s in used):
            validate = getattr(getattr(self, section), "validate", None)
            if validate is not None:
                validate(self.d_model)
        _check_no_negative_ints(self, "")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (infinities as ``"inf"``): the fields, then one key per settings section."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sections"}
        data.update((name, dataclasses.asdict(s)) for name, s in self.sections.items())
        return _encode(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from :meth:`to_dict`'s output; unknown or missing keys and bad values raise ``ValueError``.

        Sections absent from ``data`` (a kind registered after the file was written) take their defaults.
        """
        if not isinstance(data, dict):
            raise ValueError(f"config must be a JSON object, got {type(data).__name__}")
        known = registry.sections()
        plain = {k: v for k, v in data.items() if k not in known}
        _check_keys(cls, plain, "", extra=list(known))
        hints = typing.get_type_hints(cls)
        kwargs = {k: _decode_value(hints[k], v, k) for k, v in plain.items()}
        kwargs.update((k, _decode_dataclass(known[k], v, f"{k}.")) for k, v in data.items() if k in known)
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as JSON, atomically (temporary file, then rename)."""
        write_text_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelConfig:
        """Read a config written by :meth:`save` (or an ssmkit checkpoint's ``config.json``)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {shown(path)} does not exist")
        data = files.read_json(path, "config")
        if isinstance(data, dict) and data.get("format") == "ssmkit" and "config" in data:
            data = data["config"]
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def parse_layer_pattern(pattern: str, n_layer: int) -> list[LayerSpec]:
    """Expand ``pattern`` (see the module docstring) to one :class:`LayerSpec` per layer."""
    tokens = pattern_tokens(pattern)
    if len(tokens) > n_layer:
        raise ValueError(f"layer_pattern {pattern!r} describes {len(tokens)} layers but n_layer is {n_layer}")
    return [tokens[k % len(tokens)] for k in range(n_layer)]


def pattern_tokens(pattern: str) -> list[LayerSpec]:
    """The layers of one repetition of ``pattern``: one :class:`LayerSpec` per mixer letter."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"layer_pattern must be a non-empty string such as 'M' or '2', got {pattern!r}")
    tokens: list[LayerSpec] = []
    i = 0
    while i < len(pattern):
        kind = registry.by_letter(pattern[i])
        if kind is None or kind.feed_forward:
            raise ValueError(
                f"layer_pattern {pattern!r}: unknown mixer letter {pattern[i]!r} at position {i}; mixer letters are "
                + ", ".join(f"{k.letter} ({k.name})" for k in registry.kinds() if not k.feed_forward)
                + "; a lowercase feed-forward letter may follow one ("
                + ", ".join(f"{k.letter} {k.name}" for k in registry.kinds() if k.feed_forward) + ")"
            )
        ff = None
        if i + 1 < len(pattern) and pattern[i + 1].islower():
            ff_kind = registry.by_letter(pattern[i + 1])
            if ff_kind is None or not ff_kind.feed_forward:
                raise ValueError(
                    f"layer_pattern {pattern!r}: unknown feed-forward letter {pattern[i + 1]!r} at position {i + 1}; "
                    "feed-forward letters are "
                    + ", ".join(f"{k.letter} ({k.name})" for k in registry.kinds() if k.feed_forward)
                )
            ff = ff_kind.name
            i += 1
        tokens.append(LayerSpec(kind.name, ff))
        i += 1
    return tokens


def _encode(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode_dataclass(cls: type, data: Any, path: str) -> Any:
    where = path.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    _check_keys(cls, data, path)
    hints = typing.get_type_hints(cls)
    kwargs = {k: _decode_value(hints[k], v, f"{path}{k}") for k, v in data.items()}
    # A field that a saved config lacks because it predates the field takes the value it had then.
    legacy = {k: v for k, v in getattr(cls, "LEGACY_DEFAULTS", {}).items() if k not in data}
    return cls(**legacy, **kwargs)


def _check_keys(cls: type, data: dict[str, Any], path: str, extra: list[str] = ()) -> None:
    """Unknown keys (with the closest known one) and missing required keys raise ``ValueError``."""
    where = path.rstrip(".") or "config"
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "sections"}
    names = [*fields, *extra]
    unknown = [k for k in data if k not in fields]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), names, n=1)
            hints.append(f"{path}{k}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"unknown config key(s): {', '.join(hints)}; known keys of {where}: {', '.join(names)}")
    missing = [
        n for n, f in fields.items()
        if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"missing required config key(s): {', '.join(path + m for m in missing)}")


def _decode_value(tp: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _decode_dataclass(tp, value, name + ".")
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(tp)):
            raise ValueError(f"{name} must be a list of {len(typing.get_args(tp))} numbers, got {value!r}")
        return tuple(_decode_value(t, v, name) for t, v in zip(typing.get_args(tp), value))
    if tp is float and isinstance(value, str) and value in ("inf", "-inf", "Infinity", "-Infinity"):
        return float(value.replace("Infinity", "inf"))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _check_types(obj: Any, path: str) -> None:
    """Check each field of a config dataclass against its annotation (recursing into nested configs)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp, name = getattr(obj, f.name), hints[f.name], f"{path}{f.name}"
        if f.metadata.get("sections"):
            known = f.metadata["sections"]()
            for section, settings in value.items():
                if section not in known:
                    raise ValueError(f"{section}: no registered layer kind has this settings section")
                if not isinstance(settings, known[section]):
                    raise ValueError(f"{section} must be a {known[section].__name__}, got {type(settings).__name__}")
                _check_types(settings, section + ".")
            continue
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, tp):
                raise ValueError(f"{name} must be a {tp.__name__}, got {type(value).__name__}")
            _check_types(value, name + ".")
        elif not _matches(tp, value):
            raise ValueError(f"{name} must be {_describe(tp)}, got {_short(value)}")
        elif isinstance(value, int) and not isinstance(value, bool) and value > MAX_CONFIG_INT:
            raise ValueError(f"{name} must be at most {MAX_CONFIG_INT:,}, got {value:,}")


def _check_no_negative_ints(obj: Any, path: str) -> None:
    """No int field is negative, also in the settings of kinds the pattern does not use (a config's
    numbers all mean sizes or counts)."""
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{path}{f.name}"
        if f.metadata.get("sections"):
            for section, settings in value.items():
                _check_no_negative_ints(settings, section + ".")
        elif dataclasses.is_dataclass(value):
            _check_no_negative_ints(value, name + ".")
        elif isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def _short(value: Any) -> str:
    """``repr(value)``, cut short: a hostile config's value may be megabytes long."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _matches(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(t, value) for t in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        return isinstance(value, tuple) and len(value) == len(args) and all(map(_matches, args, value))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(t) for t in typing.get_args(tp))
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a pair ({', '.join(_describe(t) for t in typing.get_args(tp))})"
    if tp is type(None):
        return "null"
    return {bool: "a bool", int: "an int", float: "a number", str: "a string"}.get(tp, str(tp))
