"""Loading a model to run it: from a model folder in any format ssmkit reads (ssmkit, transformers' mamba,
mamba2, falcon_mamba, jamba, bamba, nemotron_h and granitemoehybrid) or from a training run folder, with its tokenizer.

The CLI (generate, eval, info, convert, serve), the evals and the server load through here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ssmkit.data.tokenizer import Tokenizer, load_tokenizer
from ssmkit.io.hub import resolve_checkpoint
from ssmkit.layers.quantized import Int8Linear
from ssmkit.models.language_model import LanguageModel
from ssmkit.models.run_folder import CHECKPOINTS, MODEL_DIR, find_resumable

DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
"""int8: float32 with weight-only int8 mixer projections and head (:meth:`LanguageModel.quantize`)."""


def resolve_model_dir(path: str | Path, revision: str | None = None) -> Path:
    """A folder with config.json: the folder itself, a run's ``model/``, a run's newest checkpoint that
    verifies (see :mod:`ssmkit.models.run_folder`), or the hub cache's snapshot of a Hugging Face Hub id
    ``org/name`` (at ``revision``; :func:`ssmkit.io.hub.resolve_checkpoint`)."""
    folder = resolve_checkpoint(path, revision)
    if folder.is_file() and folder.suffix == ".gguf":  # a llama.cpp file: LanguageModel.from_pretrained reads it
        return folder
    if (folder / "config.json").is_file():
        return folder
    if (folder / MODEL_DIR / "config.json").is_file():
        return folder / MODEL_DIR
    found = find_resumable(folder / CHECKPOINTS)
    if found is not None:
        return found[0]
    raise FileNotFoundError(f"no model in {folder}: expected config.json (a model folder) or a training run "
                            f"folder with {MODEL_DIR}/ or {CHECKPOINTS}/")


def resolve_device(device: str) -> str:
    """``auto`` = cuda when available, else cpu; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """One of :data:`DTYPES`; ``auto`` = bfloat16 on a GPU, float32 elsewhere."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return getattr(torch, "float32" if dtype == "int8" else dtype)


def load_model(path: str | Path, device: str = "cpu", dtype: str = "float32", *, revision: str | None = None,
               tokenizer: str | None = None, need_tokenizer: bool = True
               ) -> tuple[LanguageModel, Tokenizer | None, Path]:
    """``(model in eval mode, its tokenizer, the model folder)`` of a checkpoint named by ``path`` (see
    :func:`resolve_model_dir`).

    ``device`` and ``dtype`` as :func:`resolve_device` and :func:`resolve_dtype` take them. The tokenizer is
    the folder's own, or the file ``tokenizer`` names; None when not ``need_tokenizer``. A tokenizer with
    more tokens than the model is refused (it does not belong to this model).
    """
    folder = resolve_model_dir(path, revision)
    device = resolve_device(device)
    model = LanguageModel.from_pretrained(folder, device=device, dtype=resolve_dtype(dtype, device)).eval()
    if dtype == "int8" and not any(isinstance(m, Int8Linear) for m in model.modules()):
        model.quantize("int8")  # weight-only int8 of the mixer projections and the head
    if folder.is_file() and need_tokenizer and not tokenizer:
        raise ValueError(f"{folder.name}: ssmkit does not read the tokenizer inside a GGUF file; pass a "
                         "tokenizer.json (--tokenizer FILE) or work in token ids (generate --ids)")
    tok = load_tokenizer(folder, tokenizer=tokenizer) if need_tokenizer or tokenizer else None
    if tok is not None and tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {tok.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}; this tokenizer does not belong to this model")
    return model, tok, folder
