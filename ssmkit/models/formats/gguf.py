"""GGUF files (llama.cpp's format) of Mamba and Mamba-2 language models, in and out.

Written exactly as llama.cpp's own converter (``convert_hf_to_gguf.py``, classes ``MambaModel`` and
``Mamba2Model``) writes a transformers folder, so llama.cpp loads either file the same way:

- architecture ``mamba`` / ``mamba2``; keys ``{arch}.context_length`` (2**20), ``embedding_length``,
  ``feed_forward_length`` (0), ``attention.head_count`` (0), ``block_count``, ``ssm.conv_kernel``,
  ``ssm.inner_size``, ``ssm.state_size``, ``ssm.time_step_rank`` (Mamba: dt_rank; Mamba-2: the head
  count), ``ssm.group_count`` (Mamba-2), ``ssm.dt_b_c_rms`` (Mamba), ``attention.layer_norm_rms_epsilon``,
  ``general.file_type``, ``general.quantization_version``;
- tensors ``token_embd``, ``blk.{i}.attn_norm``, ``ssm_in``, ``ssm_conv1d`` (squeezed to (I, w)),
  ``ssm_x``, ``ssm_dt`` (Mamba-2: only its bias, the dt_bias), ``ssm_a`` = -exp(A_log) (Mamba-2:
  (nheads, 1)), ``ssm_d`` (Mamba-2: (nheads, 1)), ``ssm_norm`` (Mamba-2: (ngroups, I / ngroups)),
  ``ssm_out``, ``output_norm`` and ``output`` (omitted when tied);
- the same tensors kept F32 at every file type (1-D tensors, norms, ``ssm_conv1d``, names without a
  ``.weight`` suffix); Q8_0 falls back to F16 for rows not a multiple of 32, as the converter does.

Reading (:func:`load_gguf`) accepts F32, F16, BF16 and Q8_0 tensors (dequantised to float32). The
metadata GGUF lacks gets the transformers defaults (Mamba-2 ``chunk_size`` 256, ``dt_limit`` (0, inf),
initialisation ranges), which do not change the function the weights compute.

Needs the ``gguf`` package (``pip install 'ssmkit[gguf]'``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ssmkit.models.formats.files import CheckpointError
from ssmkit.models.formats.hybrid_common import falcon_h1_settings
from ssmkit.models.formats.transformers_config import config_from_transformers

if TYPE_CHECKING:
    from ssmkit.models import LanguageModel, ModelConfig

FILE_TYPES = ("f32", "f16", "bf16", "q8_0")
ARCHITECTURES = ("mamba", "mamba2")
# Mixer parameter name -> llama.cpp tensor name (per block); A_log and the conv weight are transformed.
_MIXER_NAMES = {
    "in_proj.weight": "ssm_in.weight", "in_proj.bias": "ssm_in.bias",
    "conv1d.weight": "ssm_conv1d.weight", "conv1d.bias": "ssm_conv1d.bias",
    "x_proj.weight": "ssm_x.weight", "dt_proj.weight": "ssm_dt.weight", "dt_proj.bias": "ssm_dt.bias",
    "dt_bias": "ssm_dt.bias", "A_log": "ssm_a", "D": "ssm_d", "norm.weight": "ssm_norm.weight",
    "out_proj.weight": "ssm_out.weight", "out_proj.bias": "ssm_out.bias",
}
_GLOBAL_NAMES = {"embedding.weight": "token_embd.weight", "norm_f.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"GGUF files need the gguf package: pip install 'ssmkit[gguf]' ({e})") from None
    return gguf


def _architecture(config: ModelConfig) -> str:
    specs = set(config.layer_specs())
    if specs == {("mamba", None)} and not config.mamba.inner_layernorms:
        return "mamba"
    if specs == {("mamba2", None)}:
        m = config.mamba2
        if m.rmsnorm and not m.norm_before_gate and not m.D_has_hdim:
            return "mamba2"
    raise ValueError(f"layer_pattern {config.layer_pattern!r}: GGUF export covers pure Mamba-1 ('M') and pure "
                     "Mamba-2 ('2', gated RMSNorm after the gate, D per head) models without feed-forwards, as "
                     "llama.cpp's mamba and mamba2 architectures compute them")


# ---------------------------------------------------------------------------------------------------- writing


def gguf_tensors(model: LanguageModel) -> dict[str, torch.Tensor]:
    """The model's tensors under llama.cpp's names and layouts, float32 (see the module docstring)."""
    arch = _architecture(model.config)
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach().to(torch.float32).cpu()
        if name in _GLOBAL_NAMES:
            out[_GLOBAL_NAMES[name]] = t
            continue
        _, i, part, rest = name.split(".", 3)
        if part == "norm":
            out[f"blk.{i}.attn_norm.weight"] = t
            continue
        if rest not in _MIXER_NAMES:
            raise ValueError(f"{name}: no GGUF tensor for this parameter")
        if rest == "A_log":
            t = -torch.exp(t)
        if rest == "conv1d.weight":
            t = t.squeeze(1)
        if arch == "mamba2":
            if rest in ("A_log", "D"):
                t = t.reshape(-1, 1)
            elif rest == "norm.weight":
                t = t.reshape(model.config.mamba2.ngroups, -1)
        out[f"blk.{i}.{_MIXER_NAMES[rest]}"] = t
    return out


def _tensor_type(gguf: Any, name: str, ndim: int, file_type: str) -> Any:
    """The converter's choice of storage type for a tensor (``prepare_tensors`` in convert_hf_to_gguf)."""
    q = gguf.GGMLQuantizationType
    if ndim <= 1 or name.endswith("_norm.weight") or ".ssm_conv1d." in name or not name.endswith(".weight"):
        return q.F32
    return {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0}[file_type]


def write_gguf(model: LanguageModel, path: str | os.PathLike, file_type: str = "f32", *,
               tokenizer: str | os.PathLike | None = None, name: str | None = None) -> Path:
    """Write ``model`` to the GGUF file ``path`` (atomically) with 2-D weights stored as ``file_type``.

    ``tokenizer``: a tokenizer.json (byte-level BPE, written as llama.cpp's ``gpt2`` tokenizer) or a
    GGUF file whose tokenizer metadata is copied (e.g. llama.cpp's ``models/ggml-vocab-gpt-neox.gguf``, what
    its converter uses for folders without a tokenizer); without one the file has no vocabulary
    (``tokenizer.ggml.model = "none"``: llama.cpp then runs on token ids only).
    """
    gguf = _gguf()
    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type must be one of {', '.join(FILE_TYPES)}, got {file_type!r}")
    config = model.config
    arch = _architecture(config)
    extra = falcon_h1_settings(config)
    if extra:
        raise ValueError(f"{', '.join(extra)}: llama.cpp's {arch} architecture has no such settings")
    if arch == "mamba" and config.mamba.mixer_rms_eps not in (None, config.norm_eps):
        raise ValueError(f"mamba.mixer_rms_eps = {config.mamba.mixer_rms_eps}: llama.cpp's dt/B/C norms use the "
                         f"model's norm eps ({config.norm_eps})")
    path = Path(path)
    tmp = Path(tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")[1])
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or path.stem)
        _add_hparams(gguf, w, config, arch)
        ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type]
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(gguf, w, tokenizer, model.embedding.weight.shape[0])
        for tname, t in gguf_tensors(model).items():
            data = t.numpy()
            qtype = _tensor_type(gguf, tname, data.ndim, file_type)
            try:
                packed = gguf.quants.quantize(data, qtype)
            except gguf.QuantError:  # rows not a multiple of the block size: the converter's F16 fallback
                qtype = gguf.GGMLQuantizationType.F16
                packed = gguf.quants.quantize(data, qtype)
            w.add_tensor(tname, packed, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _add_hparams(gguf: Any, w: Any, config: ModelConfig, arch: str) -> None:
    d = config.d_model
    w.add_context_length(2**20)
    w.add_embedding_length(d)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_block_count(config.n_layer)
    if arch == "mamba":
        m = config.mamba
        w.add_ssm_conv_kernel(m.d_conv)
        w.add_ssm_inner_size(int(m.expand * d))
        w.add_ssm_state_size(m.d_state)
        w.add_ssm_time_step_rank(math.ceil(d / 16) if m.dt_rank == "auto" else m.dt_rank)
        w.add_layer_norm_rms_eps(config.norm_eps)
        w.add_ssm_dt_b_c_rms(m.mixer_rms_eps is not None)
    else:
        m = config.mamba2
        inner = int(m.expand * d)
        w.add_ssm_conv_kernel(m.d_conv)
        w.add_ssm_inner_size(inner)
        w.add_ssm_state_size(m.d_state)
        w.add_ssm_time_step_rank(inner // m.headdim)
        w.add_ssm_group_count(m.ngroups)
        w.add_layer_norm_rms_eps(config.norm_eps)


def _add_tokenizer(gguf: Any, w: Any, tokenizer: str | os.PathLike | None, rows: int) -> None:
    if tokenizer is None:
        w.add_tokenizer_model("none")
        return
    tokenizer = Path(tokenizer)
    if tokenizer.suffix == ".gguf":
        reader = gguf.GGUFReader(tokenizer, "r")
        for field in reader.fields.values():
            if field.name.startswith("tokenizer."):
                value = field.contents()
                if field.name in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
                    value = value[:rows]
                w.add_key_value(field.name, value, field.types[0], sub_type=field.types[-1]
                                if field.types[0] == gguf.GGUFValueType.ARRAY else None)
        return
    spec = json.loads(tokenizer.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{tokenizer}: GGUF export writes byte-level BPE tokenizers (model.type BPE), got "
                         f"{model.get('type')!r}")
    vocab: dict[str, int] = dict(model["vocab"])
    special = {}
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        special[added["id"]] = bool(added.get("special"))
    reverse = {i: tok for tok, i in vocab.items()}
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(max(rows, max(reverse) + 1)):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        else:
            tokens.append(reverse[i])
            types.append(T.NORMAL if i not in special else T.CONTROL if special[i] else T.USER_DEFINED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_token_merges(merges)


# ---------------------------------------------------------------------------------------------------- reading


def _field(reader: Any, key: str, source: Path, default: Any = None) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is None:
            raise CheckpointError(f"{source}: GGUF metadata {key!r} is missing")
        return default
    return field.contents()


def read_gguf_config(path: str | os.PathLike) -> tuple[ModelConfig, Any]:
    """``(ModelConfig, gguf.GGUFReader)`` of a Mamba or Mamba-2 GGUF file; nothing is dequantised yet."""
    gguf = _gguf()
    source = Path(path)
    try:
        reader = gguf.GGUFReader(source, "r")
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise CheckpointError(f"{source}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = _field(reader, "general.architecture", source)
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{source}: GGUF architecture {arch!r}; ssmkit reads {', '.join(ARCHITECTURES)}")
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{source}: tensor 'token_embd.weight' is missing")
    d = int(_field(reader, f"{arch}.embedding_length", source))
    inner = int(_field(reader, f"{arch}.ssm.inner_size", source))
    rank = int(_field(reader, f"{arch}.ssm.time_step_rank", source))
    if d < 1 or inner < 1 or rank < 1 or inner % d:
        raise CheckpointError(f"{source}: ssm.inner_size {inner} must be a positive multiple of embedding_length {d}")
    raw: dict[str, Any] = {
        "model_type": arch, "vocab_size": int(names["token_embd.weight"].shape[-1]), "hidden_size": d,
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count", source)),
        "layer_norm_epsilon": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", source)),
        "tie_word_embeddings": "output.weight" not in names, "residual_in_fp32": True,
        "state_size": int(_field(reader, f"{arch}.ssm.state_size", source)),
        "conv_kernel": int(_field(reader, f"{arch}.ssm.conv_kernel", source)), "expand": inner // d,
        "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 1e-4,
        "use_conv_bias": "blk.0.ssm_conv1d.bias" in names, "use_bias": "blk.0.ssm_in.bias" in names,
    }
    if arch == "mamba":
        raw.update(time_step_rank=rank, time_step_init_scheme="random", time_step_scale=1.0)
        if _field(reader, "mamba.ssm.dt_b_c_rms", source, default=False):
            raw.update(model_type="falcon_mamba", mixer_rms_eps=raw["layer_norm_epsilon"])
    else:
        if inner % rank:
            raise CheckpointError(f"{source}: ssm.inner_size {inner} is not a multiple of the head count {rank}")
        raw.update(num_heads=rank, head_dim=inner // rank, n_groups=int(_field(reader, "mamba2.ssm.group_count", source)),
                   chunk_size=256, time_step_limit=[0.0, math.inf])
    return config_from_transformers(raw, source), reader


def load_gguf(path: str | os.PathLike, reader: Any = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """``(ModelConfig, state_dict with LanguageModel names, float32)`` of a Mamba / Mamba-2 GGUF file."""
    gguf = _gguf()
    source = Path(path)
    config, reader = read_gguf_config(source) if reader is None else (read_gguf_config(source)[0], reader)
    mamba2 = set(config.layer_specs()) == {("mamba2", None)}
    to_ssmkit = {v: k for k, v in _GLOBAL_NAMES.items()}
    mixer = {v: k for k, v in _MIXER_NAMES.items() if k != ("dt_proj.bias" if mamba2 else "dt_bias")}
    readable = {gguf.GGMLQuantizationType[n] for n in ("F32", "F16", "BF16", "Q8_0")}
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.tensor_type not in readable:
            raise CheckpointError(f"{source}: tensor {t.name!r} is {t.tensor_type.name}; ssmkit reads F32, F16, "
                                  "BF16 and Q8_0")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        data = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        value = torch.from_numpy(data.copy())
        if t.name in to_ssmkit:
            state[to_ssmkit[t.name]] = value
            continue
        parts = t.name.split(".", 2)
        if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdecimal():
            raise CheckpointError(f"{source}: unexpected tensor {t.name!r}")
        i, rest = parts[1], parts[2]
        if rest == "attn_norm.weight":
            state[f"layers.{i}.norm.weight"] = value
            continue
        if rest not in mixer:
            raise CheckpointError(f"{source}: unexpected tensor {t.name!r}")
        ours = mixer[rest]
        if ours == "A_log":
            if bool((value >= 0).any()):
                raise CheckpointError(f"{source}: {t.name} must be negative (it is -exp(A_log))")
            value = torch.log(-value.double()).float()
        if mamba2 and ours in ("A_log", "D", "norm.weight"):
            value = value.flatten()
        if ours == "conv1d.weight":
            value = value.unsqueeze(1)
        state[f"layers.{i}.mixer.{ours}"] = value
    return config, state


def load_gguf_model(path: str | os.PathLike, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None, max_bytes: int | None = None) -> LanguageModel:
    """A :class:`LanguageModel` from a GGUF file (``LanguageModel.from_pretrained`` of a ``.gguf`` path):
    the config's size is checked before any tensor is dequantised."""
    from ssmkit.io.files import shown
    from ssmkit.models import LanguageModel
    from ssmkit.models.formats.native import load_state_dict_checked
    from ssmkit.models.size import check_model_size

    source = Path(path)
    config, reader = read_gguf_config(source)
    check_model_size(config, device=device, dtype=dtype, max_bytes=max_bytes, source=shown(source))
    config, state_dict = load_gguf(source, reader)
    model = LanguageModel(config, device=device, dtype=dtype, max_bytes=max_bytes)
    load_state_dict_checked(model, state_dict, source)
    return model


def convert_to_gguf(src: Path, dst: Path, file_type: str) -> int:
    """``ssmkit convert SRC DST --to gguf``: the model folder ``src`` (its tokenizer.json, when it has one,
    becomes the file's vocabulary) to the new GGUF file ``dst``."""
    from ssmkit.models import LanguageModel

    if dst.exists():
        raise FileExistsError(f"{dst} exists; choose a new file name")
    model = LanguageModel.from_pretrained(src)
    tokenizer = src / "tokenizer.json" if (src / "tokenizer.json").is_file() else None
    write_gguf(model, dst, file_type, tokenizer=tokenizer, name=src.name)
    print(f"wrote {dst} (GGUF, {file_type})")
    return 0
