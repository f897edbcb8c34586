"""What the transformers readers and writers of hybrid models (Jamba, Bamba, Nemotron-H) share: checked
config.json fields, the tensor-set check, the decoder-layer tensor names of Jamba and Bamba, and the
folder read / write around a format's own config and name mapping."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ssmkit.layers import registry
from ssmkit.models.config import MAX_CONFIG_INT, MAX_LAYERS
from ssmkit.models.formats.files import (
    CONFIG_NAME,
    CheckpointError,
    read_json,
    read_weights,
    write_folder,
)
from ssmkit.models.formats.native import model_tensor_shapes
from ssmkit.models.size import weights_limit

if TYPE_CHECKING:
    from ssmkit.models.config import ModelConfig

# transformers name -> (shape, ssmkit name) for every tensor of a model
Expected = dict[str, tuple[tuple[int, ...], str]]


def field_error(source: Path, name: str, value: Any, want: str) -> CheckpointError:
    """The error for config field ``name``; the value shown is cut short (a hostile one may be megabytes)."""
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return CheckpointError(f"{source}: field {name!r} = {shown}: {want}")


def config_field(values: dict[str, Any], source: Path, name: str, kind: type = int, minimum: int = 1) -> Any:
    """values[name] checked as a positive number (float), a bool, or an int >= minimum."""
    v = values[name]
    if kind is float:
        want = "a positive number"
        try:  # an integer too large for a float is refused, not an OverflowError
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < float(v) < math.inf
        except OverflowError:
            ok = False
    elif kind is bool:
        ok, want = isinstance(v, bool), "true or false"
    else:
        top = MAX_LAYERS if name == "num_hidden_layers" else MAX_CONFIG_INT
        ok = isinstance(v, int) and not isinstance(v, bool) and minimum <= v <= top
        want = f"an integer from {minimum} to {top:,}"
    if not ok:
        raise field_error(source, name, v, f"expected {want}")
    return float(v) if kind is float else v


def config_values(raw: dict[str, Any], defaults: dict[str, Any], model_type: str, source: Path) -> dict[str, Any]:
    """``raw``'s fields over the format's defaults (a null field keeps its default), after checking that
    ``raw`` is a config of ``model_type``."""
    if raw.get("model_type") != model_type:
        raise CheckpointError(f"{source}: model_type {raw.get('model_type')!r} is not {model_type!r}")
    values = dict(defaults)
    values.update({k: v for k, v in raw.items() if v is not None})
    return values


def refuse_quantized(raw: dict[str, Any], source: Path) -> None:
    if raw.get("quantization_config") is not None:
        raise CheckpointError(f"{source}: field 'quantization_config': quantized checkpoints are not supported")


def time_step_limit(values: dict[str, Any], source: Path) -> tuple[float, float]:
    """``time_step_limit`` as a (low, high) pair with 0 <= low < high."""
    limit = values["time_step_limit"]
    try:
        lo, hi = (float(v) for v in limit)
    except (TypeError, ValueError, OverflowError):
        raise field_error(source, "time_step_limit", limit, "expected a pair [low, high]") from None
    if not 0.0 <= lo < hi:
        raise field_error(source, "time_step_limit", limit, "expected 0 <= low < high")
    return lo, hi


def falcon_h1_settings(config: ModelConfig) -> list[str]:
    """The settings of ``config`` that only Falcon-H1 checkpoints express (µP multipliers, Mamba-2's own width
    and out-projection bias), where they differ from their neutral defaults in the layers the pattern uses:
    a writer of another format refuses them rather than dropping them."""
    specs = config.layer_specs()
    found = [name for name in ("embedding_multiplier", "logits_multiplier") if getattr(config, name) != 1.0]
    if any(s.mixer == "mamba2" for s in specs):
        m = config.mamba2
        found += [f"mamba2.{n}" for n, neutral in (("d_inner", None), ("in_proj_multipliers", (1.0,) * 5))
                  if getattr(m, n) != neutral]
        if m.out_proj_bias not in (None, m.bias):
            found.append("mamba2.out_proj_bias")
    if any(s.ff == "mlp" for s in specs):
        found += [f"mlp.{n}" for n in ("gate_multiplier", "down_multiplier") if getattr(config.mlp, n) != 1.0]
    return found


def decoder_layer_name(name: str, specs: list, model_type: str) -> str:
    """The transformers name of ssmkit tensor ``name`` in Jamba's and Bamba's layout (``model.layers.{i}``
    with ``input_layernorm``, ``pre_ff_layernorm`` and the mixer and feed-forward modules)."""
    top = {"embedding.weight": "model.embed_tokens.weight", "norm_f.weight": "model.final_layernorm.weight",
           "lm_head.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    i, part, rest = re.fullmatch(r"layers\.(\d+)\.(norm|ff_norm|mixer|ff)\.(.+)", name).groups()
    if part in ("mixer", "ff"):  # the registry names each kind's module in the format's decoder layers
        sub = registry.by_name(getattr(specs[int(i)], part)).transformers[model_type]
    else:
        sub = {"norm": "input_layernorm", "ff_norm": "pre_ff_layernorm"}[part]
    return f"model.layers.{i}.{sub}.{rest}"


def decoder_layer_expected(config: ModelConfig, model_type: str) -> Expected:
    """transformers name -> (shape, ssmkit name) for every tensor of ``config``'s model, named by
    :func:`decoder_layer_name`."""
    specs = config.layer_specs()
    return {decoder_layer_name(n, specs, model_type): (shape, n) for n, shape in model_tensor_shapes(config).items()}


def check_tensors(tensors: dict[str, torch.Tensor], expected: Expected, source: Path) -> None:
    """CheckpointError unless ``tensors`` holds exactly the expected names, shapes and floating dtypes."""
    missing = [n for n in expected if n not in tensors]
    unexpected = sorted(n for n in tensors if n not in expected)
    for names, what in ((missing, "missing tensors"), (unexpected, "unexpected tensors")):
        if names:
            more = " ..." if len(names) > 8 else ""
            raise CheckpointError(f"{source}: {what} {names[:8]}{more} ({len(names)} in all) for the config")
    for name, (shape, _) in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(t.shape)}, the config implies {shape}")
        if not t.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name} has dtype {t.dtype}, expected a floating-point dtype")


def read_folder(path: str | os.PathLike, config_from_transformers: Callable[[dict[str, Any], Path], ModelConfig],
                ) -> tuple[ModelConfig, dict[str, torch.Tensor], Path]:
    """(config, tensors, the weights' source) of a transformers folder; FileNotFoundError for a missing
    folder or file. The weights are read within the size the config implies."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a checkpoint folder")
    config = config_from_transformers(read_json(folder / CONFIG_NAME), folder / CONFIG_NAME)
    tensors, source = read_weights(folder, max_bytes=weights_limit(config))
    return config, tensors, source


def select_state(tensors: dict[str, torch.Tensor], expected: Expected, source: Path) -> dict[str, torch.Tensor]:
    """The state dict with ssmkit names, after :func:`check_tensors`."""
    check_tensors(tensors, expected, source)
    return {ssm_name: tensors[name] for name, (_, ssm_name) in expected.items()}


def write_transformers_folder(path: str | os.PathLike, raw: dict[str, Any], state: dict[str, torch.Tensor],
                              name_of: Callable[[str], str]) -> Path:
    """Write config ``raw`` (with the embedding's dtype) and ``state`` renamed by ``name_of`` as one
    model.safetensors; returns the folder's path."""
    raw["dtype"] = str(state["embedding.weight"].dtype).removeprefix("torch.")
    tensors = {name_of(n): t.detach().to("cpu").contiguous().clone() for n, t in state.items()}
    return write_folder(path, raw, tensors)
