"""The layout of a training run folder, which training writes and everything that loads a model reads::

    <run>/run.json                   the model, train and data configs the run started with
    <run>/metrics.jsonl, loss.png    what it reported
    <run>/checkpoints/step_NNNNNNN/  resumable checkpoints (see :mod:`ssmkit.train.checkpoint`); each
                                     also loads as an ssmkit model folder. trainer_state.json in it holds
                                     the size and SHA-256 of every other file, written last.
    <run>/model/                     the final model (config.json, model.safetensors, tokenizer)

A checkpoint is *verified* when every file matches its recorded fingerprint; a corrupt newest one is
skipped (with a warning) for the one before it.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path
from typing import Any

from ssmkit.io.files import read_json_object, shown

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(root: Path, step: int) -> Path:
    """The folder of the checkpoint of ``step`` under ``root`` (a run's ``checkpoints/``)."""
    return root / f"step_{step:07d}"


class CorruptCheckpoint(ValueError):
    """A checkpoint folder whose files are missing, truncated or do not match their recorded hashes."""


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, newest (highest step) first; temporary leftovers ignored."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def verify(folder: Path) -> dict[str, Any]:
    """The trainer state of ``folder`` after checking every file's size and hash; CorruptCheckpoint if not."""
    try:
        state = read_json_object(folder / STATE_FILE, "record")
        files = state["files"]
        if not isinstance(files, dict):
            raise TypeError(f"'files' is a {type(files).__name__}, not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"{shown(folder / STATE_FILE)}: missing or unreadable ({e})") from None
    for name, expected in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise CorruptCheckpoint(f"{shown(folder / STATE_FILE)}: lists {name!r}, which is not a file of this folder")
        path = folder / name
        if not path.is_file():
            raise CorruptCheckpoint(f"{path}: missing")
        if fingerprint(path) != expected:
            raise CorruptCheckpoint(f"{path}: size or SHA-256 differs from the one recorded when it was saved")
    return state


def find_resumable(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint under ``root`` that verifies, warning about each newer one that does not."""
    for folder in list_checkpoints(root):
        try:
            return folder, verify(folder)
        except CorruptCheckpoint as e:
            warnings.warn(f"checkpoint {folder.name} is corrupt, falling back to the previous one: {e}",
                          stacklevel=2)
    return None


def fingerprint(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a file, as trainer_state.json records them."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
