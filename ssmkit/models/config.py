"""Model configuration: typed, nested dataclasses that round-trip through JSON.

A :class:`ModelConfig` holds the model-wide sizes and one nested config per mixer kind
(:class:`MambaConfig`, :class:`Mamba2Config`, :class:`Mamba3Config`, :class:`AttentionConfig`, ...) and per
feed-forward kind (:class:`MLPConfig`, :class:`MoEConfig`); the argument names and defaults are mamba_ssm's.

Layer pattern
-------------
``layer_pattern`` is a string of layer tokens. Each token is one *mixer letter*, optionally followed by
one lowercase *feed-forward letter*; the pattern repeats until it covers ``n_layer`` layers (it may not
be longer than ``n_layer``). Letters:

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
wrong type raise a ``ValueError`` that names them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Union

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
    _positive,
)

MIXER_LETTERS: dict[str, str] = {
    "M": "mamba",
    "2": "mamba2",
    "3": "mamba3",
    "A": "attention",
    "W": "sliding_window_attention",
    "S": "s4d",
    "4": "s4",
    "H": "hyena",
}
FF_LETTERS: dict[str, str] = {"m": "mlp", "e": "moe"}


class LayerSpec(NamedTuple):
    """What one layer is made of: its mixer kind (``"mamba"``, ``"attention"``, ...) and feed-forward
    (``"mlp"``, ``"moe"`` or None)."""

    mixer: str
    ff: str | None


@dataclass(kw_only=True)
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
    mamba: MambaConfig = field(default_factory=MambaConfig)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    mamba3: Mamba3Config = field(default_factory=Mamba3Config)
    s4d: S4DConfig = field(default_factory=S4DConfig)
    s4: S4Config = field(default_factory=S4Config)
    hyena: HyenaConfig = field(default_factory=HyenaConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
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

    def __post_init__(self) -> None:
        self.validate()

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
        _positive("norm_eps", self.norm_eps)
        _positive("initializer_range", self.initializer_range)
        kinds = {spec.mixer for spec in self.layer_specs()}
        if "mamba" in kinds:
            self.mamba.validate(self.d_model)
        if "mamba2" in kinds:
            self.mamba2.validate(self.d_model)
        if "mamba3" in kinds:
            self.mamba3.validate(self.d_model)
        for kind in ("s4d", "s4", "hyena"):
            if kind in kinds:
                getattr(self, kind).validate(self.d_model)
        if kinds & {"attention", "sliding_window_attention"}:
            self.attention.validate(self.d_model)
        ffs = {spec.ff for spec in self.layer_specs()}
        for kind in ("mlp", "moe"):
            if kind in ffs:
                getattr(self, kind).validate(self.d_model)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (infinities as ``"inf"``)."""
        return _encode(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from :meth:`to_dict`'s output; unknown or missing keys and bad values raise ``ValueError``."""
        return _decode_dataclass(cls, data, "")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as JSON, atomically (temporary file, then rename)."""
        write_text_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelConfig:
        """Read a config written by :meth:`save` (or an ssmkit checkpoint's ``config.json``)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict) and data.get("format") == "ssmkit" and "config" in data:
            data = data["config"]
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def parse_layer_pattern(pattern: str, n_layer: int) -> list[LayerSpec]:
    """Expand ``pattern`` (see the module docstring) to one :class:`LayerSpec` per layer."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"layer_pattern must be a non-empty string such as 'M' or '2', got {pattern!r}")
    tokens: list[LayerSpec] = []
    i = 0
    while i < len(pattern):
        letter = pattern[i]
        if letter not in MIXER_LETTERS:
            raise ValueError(
                f"layer_pattern {pattern!r}: unknown mixer letter {letter!r} at position {i}; mixer letters are "
                + ", ".join(f"{k} ({v})" for k, v in MIXER_LETTERS.items())
                + "; a lowercase feed-forward letter may follow one (m mlp, e moe)"
            )
        ff = None
        if i + 1 < len(pattern) and pattern[i + 1].islower():
            ff_letter = pattern[i + 1]
            if ff_letter not in FF_LETTERS:
                raise ValueError(
                    f"layer_pattern {pattern!r}: unknown feed-forward letter {ff_letter!r} at position {i + 1}; "
                    "feed-forward letters are m (mlp), e (moe)"
                )
            ff = FF_LETTERS[ff_letter]
            i += 1
        tokens.append(LayerSpec(MIXER_LETTERS[letter], ff))
        i += 1
    if len(tokens) > n_layer:
        raise ValueError(f"layer_pattern {pattern!r} describes {len(tokens)} layers but n_layer is {n_layer}")
    return [tokens[k % len(tokens)] for k in range(n_layer)]


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hints.append(f"{path}{k}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"unknown config key(s): {', '.join(hints)}; known keys of {where}: {', '.join(fields)}")
    missing = [
        n for n, f in fields.items()
        if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"missing required config key(s): {', '.join(path + m for m in missing)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _decode_value(hints[k], v, f"{path}{k}") for k, v in data.items()}
    return cls(**kwargs)


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
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, tp):
                raise ValueError(f"{name} must be a {tp.__name__}, got {type(value).__name__}")
            _check_types(value, name + ".")
        elif not _matches(tp, value):
            raise ValueError(f"{name} must be {_describe(tp)}, got {value!r}")


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
