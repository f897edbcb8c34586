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
class MambaConfig:
    """Mamba-1 mixer settings (mamba_ssm's ``Mamba`` arguments).

    ``mixer_rms_eps`` set (falcon_mamba) adds weightless RMSNorms with that eps on dt, B and C;
    ``inner_layernorms`` (Jamba) adds learned RMSNorms ``dt_layernorm``, ``b_layernorm``, ``c_layernorm``
    there instead, with eps ``mixer_rms_eps`` (1e-6 when None, as Jamba's ``rms_norm_eps``).
    """

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: Union[int, Literal["auto"]] = "auto"
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init: Literal["random", "constant"] = "random"
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False
    mixer_rms_eps: float | None = None
    inner_layernorms: bool = False

    def validate(self, d_model: int) -> None:
        _positive("mamba.d_state", self.d_state)
        _positive("mamba.d_conv", self.d_conv)
        _positive("mamba.expand", self.expand)
        if self.dt_rank != "auto":
            _positive("mamba.dt_rank", self.dt_rank)
        _dt_range("mamba", self.dt_min, self.dt_max, self.dt_init_floor)
        _positive("mamba.dt_scale", self.dt_scale)
        if self.mixer_rms_eps is not None:
            _positive("mamba.mixer_rms_eps", self.mixer_rms_eps)


@dataclass(kw_only=True)
class Mamba2Config:
    """Mamba-2 mixer settings (mamba_ssm's ``Mamba2`` arguments).

    ``d_inner = expand * d_model`` is split into ``d_inner // headdim`` heads; B and C have ``ngroups``
    groups (each shared by ``nheads // ngroups`` heads). ``dt_limit`` clamps Δ after the softplus.
    """

    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, math.inf)
    A_init_range: tuple[float, float] = (1.0, 16.0)
    conv_bias: bool = True
    bias: bool = False
    norm_before_gate: bool = False
    rmsnorm: bool = True
    D_has_hdim: bool = False

    def validate(self, d_model: int) -> None:
        for name in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
            _positive(f"mamba2.{name}", getattr(self, name))
        _dt_range("mamba2", self.dt_min, self.dt_max, self.dt_init_floor)
        d_inner = self.expand * d_model
        if d_inner % self.headdim:
            raise ValueError(
                f"mamba2.headdim={self.headdim} must divide d_inner = expand * d_model = "
                f"{self.expand} * {d_model} = {d_inner}"
            )
        nheads = d_inner // self.headdim
        if nheads % self.ngroups:
            raise ValueError(
                f"mamba2.ngroups={self.ngroups} must divide the number of heads {nheads} (d_inner / headdim)"
            )
        lo, hi = self.dt_limit
        if not 0 <= lo <= hi:
            raise ValueError(f"mamba2.dt_limit must be (lo, hi) with 0 <= lo <= hi, got {self.dt_limit}")
        lo, hi = self.A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"mamba2.A_init_range must be (lo, hi) with 0 < lo <= hi, got {self.A_init_range}")


@dataclass(kw_only=True)
class Mamba3Config:
    """Mamba-3 mixer settings (mamba_ssm's ``Mamba3`` arguments; no short convolution).

    ``rope_fraction`` (0.5 or 1.0) of the ``d_state`` entries rotate; ``is_mimo`` gives B and C rank
    ``mimo_rank``; ``A_floor`` bounds the data-dependent decay rate; ``is_outproj_norm`` adds a gated
    RMSNorm before out_proj.
    """

    d_state: int = 128
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    rope_fraction: float = 0.5
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_floor: float = 1e-4
    is_outproj_norm: bool = False
    is_mimo: bool = False
    mimo_rank: int = 4
    chunk_size: int = 64

    def validate(self, d_model: int) -> None:
        for name in ("d_state", "expand", "headdim", "ngroups", "mimo_rank", "chunk_size", "A_floor"):
            _positive(f"mamba3.{name}", getattr(self, name))
        _dt_range("mamba3", self.dt_min, self.dt_max, self.dt_init_floor)
        if self.rope_fraction not in (0.5, 1.0) or int(self.d_state * self.rope_fraction) < 2:
            raise ValueError(
                f"mamba3.rope_fraction must be 0.5 or 1.0 and leave at least one rotary pair of the "
                f"d_state={self.d_state} entries, got {self.rope_fraction}"
            )
        d_inner = self.expand * d_model
        if d_inner % self.headdim or (d_inner // self.headdim) % self.ngroups:
            raise ValueError(
                f"mamba3.headdim={self.headdim} must divide d_inner = expand * d_model = {d_inner}, and "
                f"mamba3.ngroups={self.ngroups} the number of heads"
            )


@dataclass(kw_only=True)
class S4DConfig:
    """S4D mixer settings (:class:`ssmkit.layers.s4d.S4D`): diagonal complex SSM, ``d_state`` even.

    ``init`` "lin" / "inv" / "legs" (S4D-Lin, S4D-Inv, diagonal HiPPO-LegS); ``bidirectional`` adds a
    kernel over the future (for :class:`ssmkit.models.SequenceClassifier`; a LanguageModel refuses it).
    """

    d_state: int = 64
    init: Literal["lin", "inv", "legs"] = "lin"
    discretization: Literal["zoh", "bilinear"] = "zoh"
    dt_min: float = 1e-3
    dt_max: float = 0.1
    bidirectional: bool = False

    def validate(self, d_model: int) -> None:
        _even_state("s4d", self.d_state)
        _dt_range("s4d", self.dt_min, self.dt_max, 0.0)


@dataclass(kw_only=True)
class S4Config:
    """S4 mixer settings (:class:`ssmkit.layers.s4.S4`): DPLR SSM from a HiPPO ``measure``.

    ``l_max`` is the kernel length: parallel calls take at most that many positions (decode steps
    have no limit). ``bidirectional`` as for :class:`S4DConfig`.
    """

    d_state: int = 64
    measure: Literal["legs", "legt", "fourier"] = "legs"
    l_max: int = 2048
    dt_min: float = 1e-3
    dt_max: float = 0.1
    bidirectional: bool = False

    def validate(self, d_model: int) -> None:
        _even_state("s4", self.d_state)
        _positive("s4.l_max", self.l_max)
        _dt_range("s4", self.dt_min, self.dt_max, 0.0)


@dataclass(kw_only=True)
class HyenaConfig:
    """Hyena mixer settings (:class:`ssmkit.layers.hyena.Hyena`, safari's ``HyenaOperator`` arguments).

    ``l_max`` is the length of the implicit filters (the longest dependency; inputs may be longer and
    the decode cache keeps ``l_max - 1`` positions per long convolution).
    """

    order: int = 2
    l_max: int = 2048
    filter_order: int = 64
    emb_dim: int = 3
    short_filter_order: int = 3
    num_inner_mlps: int = 2
    w: float = 1.0
    modulate: bool = True
    fast_decay_pct: float = 0.3
    slow_decay_pct: float = 1.5
    target: float = 1e-2
    shift: float = 0.0

    def validate(self, d_model: int) -> None:
        for name in ("filter_order", "short_filter_order", "fast_decay_pct", "slow_decay_pct", "target"):
            _positive(f"hyena.{name}", getattr(self, name))
        if self.order < 2 or self.l_max < 2:
            raise ValueError(f"hyena.order and hyena.l_max must be >= 2, got {self.order} and {self.l_max}")
        if self.emb_dim < 3 or self.emb_dim % 2 == 0:
            raise ValueError(f"hyena.emb_dim must be odd and >= 3, got {self.emb_dim}")
        if self.num_inner_mlps < 0:
            raise ValueError(f"hyena.num_inner_mlps must be >= 0, got {self.num_inner_mlps}")


@dataclass(kw_only=True)
class AttentionConfig:
    """Attention mixer settings (:class:`ssmkit.layers.Attention`), shared by ``A`` and ``W`` layers.

    ``num_heads_kv`` None = ``num_heads`` (plain multi-head); ``head_dim`` None = d_model / num_heads;
    ``window`` applies to ``W`` layers only; ``rotary_emb_dim`` 0 = no positional encoding (Jamba).
    """

    num_heads: int = 8
    num_heads_kv: int | None = None
    head_dim: int | None = None
    window: int = 2048
    rotary_emb_dim: int = 0
    rotary_emb_base: float = 10000.0
    bias: bool = False

    def validate(self, d_model: int) -> None:
        _positive("attention.num_heads", self.num_heads)
        kv = self.num_heads if self.num_heads_kv is None else self.num_heads_kv
        _positive("attention.num_heads_kv", kv)
        if self.num_heads % kv:
            raise ValueError(f"attention.num_heads={self.num_heads} must be divisible by attention.num_heads_kv={kv}")
        if self.head_dim is None and d_model % self.num_heads:
            raise ValueError(f"attention.num_heads={self.num_heads} must divide d_model={d_model} "
                             "unless attention.head_dim is set")
        head_dim = d_model // self.num_heads if self.head_dim is None else self.head_dim
        _positive("attention.head_dim", head_dim)
        _positive("attention.window", self.window)
        if not 0 <= self.rotary_emb_dim <= head_dim or self.rotary_emb_dim % 2:
            raise ValueError(f"attention.rotary_emb_dim must be even and in [0, head_dim={head_dim}], "
                             f"got {self.rotary_emb_dim}")
        _positive("attention.rotary_emb_base", self.rotary_emb_base)


@dataclass(kw_only=True)
class MLPConfig:
    """SwiGLU feed-forward settings (:class:`ssmkit.layers.MLP`, suffix ``m``)."""

    d_intermediate: int = 1024

    def validate(self, d_model: int) -> None:
        _positive("mlp.d_intermediate", self.d_intermediate)


@dataclass(kw_only=True)
class MoEConfig:
    """Mixture-of-experts settings (:class:`ssmkit.layers.MoE`, suffix ``e``; Jamba's defaults).

    The training loss adds ``router_aux_loss_coef`` × the load-balancing loss and ``router_z_loss_coef``
    × the router z-loss, pooled over the MoE layers (see :meth:`ssmkit.models.LanguageModel.forward`).
    """

    num_experts: int = 16
    top_k: int = 2
    d_intermediate: int = 1024
    renormalize: bool = False
    router_aux_loss_coef: float = 1e-3
    router_z_loss_coef: float = 0.0

    def validate(self, d_model: int) -> None:
        _positive("moe.num_experts", self.num_experts)
        _positive("moe.d_intermediate", self.d_intermediate)
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe.top_k must be in [1, moe.num_experts={self.num_experts}], got {self.top_k}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"moe.{name} must be >= 0, got {getattr(self, name)}")


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
    d_model: int
    n_layer: int
    layer_pattern: str = "M"
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
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    pad_vocab_size_multiple: int = 8
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True

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


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _even_state(prefix: str, d_state: int) -> None:
    if d_state < 2 or d_state % 2:
        raise ValueError(f"{prefix}.d_state must be even and >= 2 (states come in conjugate pairs), got {d_state}")


def _dt_range(prefix: str, dt_min: float, dt_max: float, floor: float) -> None:
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"{prefix}.dt_min / dt_max must satisfy 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    if floor < 0:
        raise ValueError(f"{prefix}.dt_init_floor must be >= 0, got {floor}")


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
