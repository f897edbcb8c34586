"""Reading and writing checkpoint folders: config.json, safetensors (single or sharded), guarded .bin.

Every failure names the file it comes from. Nothing here unpickles arbitrary objects: a
``pytorch_model.bin`` is read with ``torch.load(weights_only=True)`` only, and refused if that fails.
Writes go to a temporary name in the destination's folder and are renamed into place, so a crash never
leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ssmkit.io import files
from ssmkit.io.files import shown

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint file that exists but cannot be used (corrupt, truncated, foreign or inconsistent)."""


def _decode_floats(obj: Any) -> Any:
    """transformers >= 5 writes non-finite floats as ``{"__float__": "Infinity"}``; older ones as ``Infinity``."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        return {k: _decode_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_floats(v) for v in obj]
    return obj


def read_json(path: Path, kind: str = "config") -> dict[str, Any]:
    """Parse a JSON object from ``path`` (size-checked before reading, see :mod:`ssmkit.io.files`); errors
    name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{shown(path)}: no such file")
    try:
        data = files.read_json(path, kind)
    except files.FileTooLargeError as e:
        raise CheckpointError(str(e)) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{shown(path)}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{shown(path)}: expected a JSON object, got {type(data).__name__}")
    return _decode_floats(data)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from e


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for unsafe or bad files
        raise CheckpointError(
            f"{path}: refused: it cannot be read with torch.load(weights_only=True), so it holds more than "
            f"plain tensors or is damaged; ssmkit never unpickles arbitrary objects. Convert it to "
            f"safetensors with a tool you trust. ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: expected a mapping of tensor names to tensors")
    return dict(data)


def _link_roots(folder: Path) -> list[Path]:
    """Where a checkpoint's files may lead: the folder itself and, for a snapshot of the Hugging Face hub
    cache (``models--org--name/snapshots/<rev>/``, whose files are links to ``../../blobs/``), that
    repository's ``blobs`` folder."""
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        roots.append((folder.parent.parent / "blobs").resolve())
    return roots


def _shard_path(index_path: Path, shard_name: Any) -> Path:
    """The file a ``weight_map`` value names, which must be a plain file name or relative path that stays
    inside the checkpoint folder (no ``..``, no absolute path, no symlink leading out)."""
    folder = index_path.parent
    where = f"{shown(index_path)}: weight_map names shard {shard_name!r}"
    if not isinstance(shard_name, str) or not shard_name or "\0" in shard_name:
        raise CheckpointError(f"{where}: expected a file name")
    relative = PurePosixPath(shard_name)
    if relative.is_absolute() or PureWindowsPath(shard_name).is_absolute() or ".." in relative.parts \
            or "\\" in shard_name:
        raise CheckpointError(f"{where}: shards must be files inside the checkpoint folder (no absolute path, "
                              "no '..')")
    shard = folder / relative
    try:
        target = shard.resolve()
        inside = any(target.is_relative_to(root) for root in _link_roots(folder))
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise CheckpointError(f"{where}: cannot be resolved ({e})") from None
    if not inside:
        raise CheckpointError(f"{where}: it is a link that leads outside the checkpoint folder")
    return shard


def _read_sharded(index_path: Path, read: Callable[[Path], dict[str, torch.Tensor]],
                  max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    index = read_json(index_path, "index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{shown(index_path)}: missing or empty 'weight_map'")
    shards: dict[str, Path] = {}
    for shard_name in weight_map.values():
        shards[shard_name] = _shard_path(index_path, shard_name)  # checks the type before hashing it
    check_total_size(list(shards.values()), max_bytes, index_path)
    tensors: dict[str, torch.Tensor] = {}
    for shard_name in sorted(shards):
        shard = shards[shard_name]
        if not shard.is_file():
            raise FileNotFoundError(f"{shard}: shard named in {index_path.name} does not exist")
        for name, t in read(shard).items():
            if weight_map.get(name) != shard_name:
                raise CheckpointError(f"{shard}: holds tensor {name!r}, which {index_path.name} does not map to it")
            tensors[name] = t
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(f"{index_path}: tensors listed but found in no shard: {missing}")
    return tensors


def read_weights(folder: Path, max_bytes: int | None = None) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of a transformers-style folder and the file (or index) they came from.

    Looks for, in order: ``model.safetensors``, ``model.safetensors.index.json`` (sharded),
    ``pytorch_model.bin``, ``pytorch_model.bin.index.json`` (the last two with ``weights_only=True``).
    ``max_bytes``: the most the weight files may hold together (see
    :func:`ssmkit.models.size.weights_limit`), checked before any is read.
    """
    candidates: list[tuple[str, Callable[[Path], dict[str, torch.Tensor]]]] = [
        (SAFE_WEIGHTS_NAME, _read_safetensors),
        (SAFE_INDEX_NAME, lambda p: _read_sharded(p, _read_safetensors, max_bytes)),
        (BIN_WEIGHTS_NAME, _read_bin),
        (BIN_INDEX_NAME, lambda p: _read_sharded(p, _read_bin, max_bytes)),
    ]
    for name, read in candidates:
        path = folder / name
        if path.is_file():
            if not name.endswith(".json"):
                check_total_size([path], max_bytes, path)
            return read(path), path
    raise FileNotFoundError(f"{folder}: no weights found (expected one of {[n for n, _ in candidates]})")


def check_total_size(paths: list[Path], max_bytes: int | None, source: Path) -> None:
    """Refuse weight files that hold more than ``max_bytes`` together: more than their config implies."""
    if max_bytes is None:
        return
    total = sum(p.stat().st_size for p in paths if p.is_file())
    if total > max_bytes:
        raise CheckpointError(f"{shown(source)}: the weights take {total:,} bytes, more than the config's parameters "
                              f"can fill ({max_bytes:,} bytes at float64); the weights do not belong to this config")


def _json_text(data: Mapping[str, Any]) -> str:
    # Non-finite floats are written as bare Infinity/NaN, which Python's json (so every transformers
    # version) reads; the {"__float__": ...} form of transformers 5 is not understood by 4.x.
    for value in data.values():
        if isinstance(value, float) and math.isnan(value):
            raise ValueError("config values must not be NaN")
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_folder(path: str | os.PathLike, config: Mapping[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` under ``path`` without a half-written state.

    A new folder is built under a temporary name beside it and renamed into place. Into an existing
    folder each file is written to a temporary name there and renamed over the old one; other files in
    the folder are left alone.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path}: exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (staging / CONFIG_NAME).write_text(_json_text(config), encoding="utf-8")
        save_file(tensors, str(staging / SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
        if not path.exists():
            os.replace(staging, path)
            return path
        for name in (SAFE_WEIGHTS_NAME, CONFIG_NAME):
            os.replace(staging / name, path / name)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path
