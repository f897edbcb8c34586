"""transformers ``config.json`` of model types mamba, falcon_mamba and mamba2 <-> :class:`ModelConfig`.

Every field that changes the math is mapped; fields that only steer initialisation or transformers'
own runtime (``initializer_range``, ``use_mambapy``, ``use_cache``, token ids...) are read where
ssmkit has a counterpart and otherwise ignored, as transformers' forward ignores them. A field asking
for math that neither transformers' implementation nor ssmkit's computes is refused, naming the field.
The reference is the installed transformers' modeling files (5.x).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ssmkit.models.config import MAX_CONFIG_INT, MAX_LAYERS, Mamba2Config, MambaConfig, ModelConfig
from ssmkit.models.formats.files import CheckpointError

MODEL_TYPES = ("mamba", "falcon_mamba", "mamba2")
ARCHITECTURES = {
    "mamba": "MambaForCausalLM",
    "falcon_mamba": "FalconMambaForCausalLM",
    "mamba2": "Mamba2ForCausalLM",
}
# transformers' defaults for the fields it fills when config.json leaves them out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "mamba": dict(
        vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=32, layer_norm_epsilon=1e-5,
        expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True, hidden_act="silu", residual_in_fp32=True,
        time_step_rank="auto", time_step_scale=1.0, time_step_min=1e-3, time_step_max=0.1,
        time_step_init_scheme="random", time_step_floor=1e-4, tie_word_embeddings=True,
    ),
    "mamba2": dict(
        num_heads=128, head_dim=64, vocab_size=32768, hidden_size=4096, state_size=128, num_hidden_layers=64,
        layer_norm_epsilon=1e-5, expand=2, conv_kernel=4, n_groups=8, use_bias=False, use_conv_bias=True,
        hidden_act="silu", residual_in_fp32=True, time_step_min=1e-3, time_step_max=0.1, time_step_floor=1e-4,
        time_step_limit=(0.0, math.inf), chunk_size=256, tie_word_embeddings=False,
    ),
}
_DEFAULTS["falcon_mamba"] = dict(_DEFAULTS["mamba"], mixer_rms_eps=1e-6)


class _Fields:
    """Typed access to one config.json; errors name the file and the field."""

    def __init__(self, raw: dict[str, Any], model_type: str, source: Path):
        self.raw, self.source = raw, source
        self.values = dict(_DEFAULTS[model_type])
        # An explicit null counts as absent: transformers' default applies.
        self.values.update({k: v for k, v in raw.items() if v is not None})

    def fail(self, field: str, why: str) -> CheckpointError:
        shown = repr(self.values.get(field))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."  # a hostile value may be megabytes long
        return CheckpointError(f"{self.source}: field {field!r} = {shown}: {why}")

    def int(self, field: str, minimum: int = 1) -> int:
        v = self.values.get(field)
        top = MAX_LAYERS if field == "num_hidden_layers" else MAX_CONFIG_INT
        if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= top:
            raise self.fail(field, f"expected an integer from {minimum} to {top:,}")
        return v

    def float(self, field: str, positive: bool = False) -> float:
        v = self.values.get(field)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (positive and not v > 0):
            raise self.fail(field, "expected a positive number" if positive else "expected a number")
        return float(v)

    def bool(self, field: str) -> bool:
        v = self.values.get(field)
        if not isinstance(v, bool):
            raise self.fail(field, "expected true or false")
        return v


def _refuse_unsupported(f: _Fields, model_type: str) -> None:
    if f.values.get("hidden_act") != "silu":
        raise f.fail("hidden_act", "only 'silu' is implemented (transformers' mamba kernels assume it too)")
    if f.raw.get("quantization_config") is not None:
        raise f.fail("quantization_config", "quantized checkpoints are not supported; use unquantized weights")
    if model_type == "mamba2":
        # Keys of older transformers / mamba_ssm configs that transformers 5 ignores: refuse the values
        # whose meaning differs from the gated RMSNorm (gate first, then norm) that it computes.
        if f.raw.get("rms_norm", True) is not True:
            raise f.fail("rms_norm", "only the gated RMSNorm (rms_norm = true) is implemented")
        if f.raw.get("norm_before_gate", False) is not False:
            raise f.fail("norm_before_gate",
                         "transformers' Mamba2 gates before normalising (false); true is not supported")


def config_from_transformers(raw: dict[str, Any], source: Path) -> ModelConfig:
    """The :class:`ModelConfig` equivalent to a transformers config.json (already parsed).

    ``source`` is the file's path, for error messages. Raises :class:`CheckpointError` naming the
    field for values that ssmkit cannot represent.
    """
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is a checkpoint of another model type; ssmkit reads "
            f"transformers checkpoints of model_type {', '.join(MODEL_TYPES)}"
        )
    f = _Fields(raw, model_type, source)
    _refuse_unsupported(f, model_type)
    d_model = f.int("hidden_size")
    common = dict(
        vocab_size=f.int("vocab_size"),
        d_model=d_model,
        n_layer=f.int("num_hidden_layers"),
        norm_eps=f.float("layer_norm_epsilon", positive=True),
        tie_embeddings=f.bool("tie_word_embeddings"),
        residual_in_fp32=f.bool("residual_in_fp32"),
        pad_vocab_size_multiple=1,
        rescale_prenorm_residual=bool(f.values.get("rescale_prenorm_residual", False)),
    )
    mixer = dict(layer_pattern="2", mamba2=_mamba2_from(f, d_model)) if model_type == "mamba2" else dict(
        layer_pattern="M", mamba=_mamba_from(f, d_model, model_type))
    try:
        return ModelConfig(**mixer, **common)
    except ValueError as e:  # ModelConfig's own validation (e.g. time_step_min > time_step_max)
        raise CheckpointError(f"{source}: {e}") from None


def _mamba_from(f: _Fields, d_model: int, model_type: str) -> MambaConfig:
    rank = f.values.get("time_step_rank")
    dt_rank = math.ceil(d_model / 16) if rank == "auto" else f.int("time_step_rank")
    scheme = f.values.get("time_step_init_scheme")
    if scheme not in ("random", "constant"):
        raise f.fail("time_step_init_scheme", "expected 'random' or 'constant'")
    return MambaConfig(
        d_state=f.int("state_size"),
        d_conv=f.int("conv_kernel"),
        expand=f.int("expand"),
        dt_rank=dt_rank,
        dt_min=f.float("time_step_min", positive=True),
        dt_max=f.float("time_step_max", positive=True),
        dt_init=scheme,
        dt_scale=f.float("time_step_scale"),
        dt_init_floor=f.float("time_step_floor", positive=True),
        conv_bias=f.bool("use_conv_bias"),
        bias=f.bool("use_bias"),
        mixer_rms_eps=f.float("mixer_rms_eps", positive=True) if model_type == "falcon_mamba" else None,
    )


def _mamba2_from(f: _Fields, d_model: int) -> Mamba2Config:
    expand, heads, head_dim = f.int("expand"), f.int("num_heads"), f.int("head_dim")
    if expand * d_model != heads * head_dim:
        raise f.fail("num_heads", f"num_heads * head_dim ({heads} * {head_dim}) must equal expand * hidden_size "
                     f"({expand} * {d_model})")
    groups = f.int("n_groups")
    if heads % groups:
        raise f.fail("n_groups", f"num_heads ({heads}) must be divisible by n_groups")
    limit = f.values.get("time_step_limit")
    try:
        lo, hi = (float(v) for v in limit)
    except (TypeError, ValueError):
        raise f.fail("time_step_limit", "expected a pair [low, high]") from None
    if not 0.0 <= lo < hi:
        raise f.fail("time_step_limit", "expected 0 <= low < high")
    return Mamba2Config(
        d_state=f.int("state_size"),
        d_conv=f.int("conv_kernel"),
        expand=expand,
        headdim=head_dim,
        ngroups=groups,
        chunk_size=f.int("chunk_size"),
        dt_min=f.float("time_step_min", positive=True),
        dt_max=f.float("time_step_max", positive=True),
        dt_init_floor=f.float("time_step_floor", positive=True),
        dt_limit=(lo, hi),
        conv_bias=f.bool("use_conv_bias"),
        bias=f.bool("use_bias"),
        norm_before_gate=False,
        rmsnorm=True,
        D_has_hdim=False,
    )


def config_to_transformers(config: ModelConfig, vocab_rows: int) -> dict[str, Any]:
    """The transformers config.json (as a dict) for a pure Mamba-1 or pure Mamba-2 ``config``.

    ``vocab_rows`` is the embedding's row count (the vocabulary after ssmkit's padding), which is what
    transformers calls ``vocab_size``. Raises ValueError for models transformers has no class for.
    """
    specs = set(config.layer_specs())
    if specs == {("mamba", None)}:
        model_type = "mamba" if config.mamba.mixer_rms_eps is None else "falcon_mamba"
    elif specs == {("mamba2", None)}:
        model_type = "mamba2"
    else:
        raise ValueError(
            f"layer_pattern {config.layer_pattern!r}: only pure Mamba-1 ('M') or pure Mamba-2 ('2') models "
            f"without feed-forward layers can be saved in transformers format (mamba, falcon_mamba, mamba2)"
        )
    out: dict[str, Any] = dict(
        architectures=[ARCHITECTURES[model_type]],
        model_type=model_type,
        vocab_size=vocab_rows,
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layer,
        layer_norm_epsilon=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        residual_in_fp32=config.residual_in_fp32,
        # Always false: transformers 5.x's _init_weights divides out_proj.weight by
        # sqrt(num_hidden_layers) in place when this is true, also for weights it just loaded, so
        # from_pretrained would change the checkpoint (it only steers initialisation otherwise).
        rescale_prenorm_residual=False,
        hidden_act="silu",
        # ssmkit has no special tokens in its config; transformers' defaults (0 or 2) would make
        # generate() stop on an ordinary token.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    out.update(_mamba_to(config, model_type) if model_type != "mamba2" else _mamba2_to(config))
    return out


def _mamba_to(config: ModelConfig, model_type: str) -> dict[str, Any]:
    m = config.mamba
    if m.inner_layernorms:
        raise ValueError("mamba.inner_layernorms = True: transformers' mamba and falcon_mamba have no learned "
                         "dt/B/C norms (Jamba's Mamba layers do)")
    out = dict(
        state_size=m.d_state,
        expand=m.expand,
        intermediate_size=int(m.expand * config.d_model),
        conv_kernel=m.d_conv,
        time_step_rank=math.ceil(config.d_model / 16) if m.dt_rank == "auto" else m.dt_rank,
        time_step_min=m.dt_min,
        time_step_max=m.dt_max,
        time_step_init_scheme=m.dt_init,
        time_step_scale=m.dt_scale,
        time_step_floor=m.dt_init_floor,
        use_conv_bias=m.conv_bias,
        use_bias=m.bias,
    )
    if model_type == "falcon_mamba":
        out["mixer_rms_eps"] = m.mixer_rms_eps
    return out


def _mamba2_to(config: ModelConfig) -> dict[str, Any]:
    m = config.mamba2
    unsupported = {"norm_before_gate": (m.norm_before_gate, False), "rmsnorm": (m.rmsnorm, True),
                   "D_has_hdim": (m.D_has_hdim, False)}
    for name, (value, needed) in unsupported.items():
        if value != needed:
            raise ValueError(f"mamba2.{name} = {value!r}: transformers' Mamba2 only computes {name} = {needed!r}")
    d_inner = int(m.expand * config.d_model)
    return dict(
        state_size=m.d_state,
        expand=m.expand,
        num_heads=d_inner // m.headdim,
        head_dim=m.headdim,
        n_groups=m.ngroups,
        conv_kernel=m.d_conv,
        chunk_size=m.chunk_size,
        time_step_min=m.dt_min,
        time_step_max=m.dt_max,
        time_step_floor=m.dt_init_floor,
        time_step_limit=[float(v) for v in m.dt_limit],
        use_conv_bias=m.conv_bias,
        use_bias=m.bias,
    )
