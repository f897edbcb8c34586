"""Low-level file I/O: bounded reads of the small files ssmkit loads (configs, shard indexes, tokenizers,
run records), atomic writes, and safetensors files read and written with errors that name the file.

Every such file is read through :func:`read_text` or :func:`read_json_object`, which check its size
*before* reading it, so a hostile or mistaken file (a 10 GB "config.json", a deeply nested JSON) ends in
a clear error naming the file instead of an out-of-memory kill or a raw traceback. The limits are far
above any real file of each kind; ``SSMKIT_MAX_FILE_BYTES`` (bytes, suffixes K/M/G accepted) raises
or lowers all of them at once.

Atomic writes go through a temporary file in the same folder, fsynced, then renamed, so a crash never
leaves a half-written file under the final name. Tensors are only ever read through safetensors (no
pickle). This module imports nothing of ssmkit, so every floor may use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MIB = 1 << 20
# Largest size of each kind of file (bytes). Real ones: a config is ~2 KB, a shard index of a 400B model
# ~2 MB, the largest common tokenizer.json ~30 MB.
LIMITS: dict[str, int] = {"config": 16 * MIB, "index": 64 * MIB, "tokenizer": 256 * MIB, "record": 64 * MIB,
                          "secret": 64 * 1024}
LIMIT_ENV = "SSMKIT_MAX_FILE_BYTES"


class FileTooLargeError(ValueError):
    """A file larger than the limit for its kind; the message names the file and how to raise the limit."""


def parse_bytes(text: str, what: str) -> int:
    """``"1024"``, ``"64K"``, ``"16M"``, ``"2G"``, ``"1T"`` (powers of 1024) -> bytes; ValueError naming ``what``."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if s and s[-1] in "KMGT":
        scale = 1 << (10 * ("KMGT".index(s[-1]) + 1))
        s = s[:-1]
    try:
        value = float(s)
    except ValueError:
        raise ValueError(f"{what}={text!r}: expected a size in bytes such as 1000000, 512M or 16G") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{what}={text!r}: expected a finite size >= 0")
    return int(value * scale)


def limit_for(kind: str) -> int:
    """The size limit of files of ``kind`` (a key of :data:`LIMITS`), or ``SSMKIT_MAX_FILE_BYTES`` if set."""
    override = os.environ.get(LIMIT_ENV)
    return parse_bytes(override, LIMIT_ENV) if override else LIMITS[kind]


def shown(path: str | os.PathLike) -> str:
    """``path`` as an error message shows it: relative to the working directory when inside it."""
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    try:
        return str(p.relative_to(Path.cwd()))
    except (ValueError, OSError):
        return str(p)


def read_bytes(path: str | os.PathLike, kind: str) -> bytes:
    """The bytes of ``path``, refused before reading when it exceeds the limit of ``kind``.

    Raises FileNotFoundError (missing, or not a file), FileTooLargeError, or OSError naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{shown(p)}: no such file")
    limit = limit_for(kind)
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise FileTooLargeError(
                f"{shown(p)}: {size:,} bytes, larger than the {limit:,} bytes a {kind} file may have; if it is "
                f"genuine, raise the limit with {LIMIT_ENV}=<bytes>")
        # Read one byte past the limit: a file that grows after the stat is still bounded.
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FileTooLargeError(f"{shown(p)}: grew beyond {limit:,} bytes while being read")
    return data


def read_text(path: str | os.PathLike, kind: str) -> str:
    """The UTF-8 text of ``path`` with :func:`read_bytes`' size check; ValueError naming the file if not UTF-8."""
    data = read_bytes(path, kind)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{shown(path)}: not UTF-8 text ({e})") from None


def read_json(path: str | os.PathLike, kind: str) -> Any:
    """The parsed JSON value of ``path``; every failure is an OSError or ValueError naming the file."""
    text = read_text(path, kind)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{shown(path)}: not valid JSON (truncated or corrupt?): {e}") from None
    except RecursionError:
        raise ValueError(f"{shown(path)}: JSON nested too deeply to read") from None


def read_json_object(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """:func:`read_json` that also requires a JSON object at the top."""
    data = read_json(path, kind)
    if not isinstance(data, dict):
        raise ValueError(f"{shown(path)}: expected a JSON object, got {type(data).__name__}")  # noqa: TRY004
    return data


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


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path,
                            metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` (safetensors) through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_safetensors(path: Path, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file; clear errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a safetensors file)")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type and OSError for bad files
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    return tensors, metadata
