"""Reading a sessions folder back at startup: every intact session, and nothing lost that cannot be read.

A session is restored when its JSON is a well-formed record (``id`` matching the file name, integer
``created`` and ``version``, ``pending`` null or a token id of this model) and the state file it names has
a readable header with this model's state tensors. Whatever fails these checks is **moved** to
``<folder>/quarantine/`` with every state file of that session, and logged by name (relative to the
folder): a damaged JSON never costs its intact state, and one bad file never stops the server from
starting. Deleted at startup are only files that are provably debris of an interrupted change:

- ``*.tmp``: an atomic write that did not finish (the file it would have replaced is intact);
- a state file of a restored session with another version than its JSON's (superseded, or written just
  before a crash and never acknowledged);
- a JSON-less state file of version 1: a ``create`` interrupted before its JSON, never acknowledged.

Any other JSON-less state file goes to quarantine too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

log = logging.getLogger("ssmkit.serve")

SESSION_ID = re.compile(r"^sess_[0-9a-f]{32}$")
STATE_FILE = re.compile(r"^(sess_[0-9a-f]{32})\.([0-9]{1,18})\.safetensors$")
QUARANTINE = "quarantine"
MAX_META_BYTES = 4096
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class SavedSession:
    """What a session's files say: its JSON record and its state's header."""

    id: str
    created: int
    pending: int | None
    version: int
    tokens_read: int
    state_bytes: int
    disk_bytes: int


def state_path(folder: Path, sid: str, version: int) -> Path:
    return folder / f"{sid}.{version}.safetensors"


def recover(folder: Path, vocab_size: int, state_keys: set[str]) -> list[SavedSession]:
    """The sessions in ``folder`` that can be read (see the module docstring); quarantines the rest."""
    restored: dict[str, SavedSession] = {}
    for meta_path in sorted(folder.glob("sess_*.json")):
        try:
            saved = read_session(folder, meta_path, vocab_size, state_keys)
        except Exception as e:  # noqa: BLE001 (one bad file, whatever is wrong with it, must not stop the others)
            moved = quarantine(folder, [meta_path, *folder.glob(f"{meta_path.stem}.*.safetensors")])
            log.warning("session file %s cannot be read (%s); moved to %s/: %s", meta_path.name, _reason(e),
                        QUARANTINE, ", ".join(moved))
            continue
        restored[saved.id] = saved
    orphans = []
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
            continue
        match = STATE_FILE.match(path.name)
        if match is None:
            continue
        sid, version = match.group(1), int(match.group(2))
        if sid in restored:
            if version != restored[sid].version:
                path.unlink(missing_ok=True)
        elif version == 1:
            path.unlink(missing_ok=True)
        else:
            orphans.append(path)
    if orphans:
        moved = quarantine(folder, orphans)
        log.warning("state files without a session record moved to %s/: %s", QUARANTINE, ", ".join(moved))
    return list(restored.values())


def read_session(folder: Path, meta_path: Path, vocab_size: int, state_keys: set[str]) -> SavedSession:
    """One session's record and state header, checked; ValueError saying what is wrong otherwise."""
    if meta_path.stat().st_size > MAX_META_BYTES:
        raise ValueError(f"the record is larger than {MAX_META_BYTES} bytes")
    try:
        meta = json.loads(meta_path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise TypeError("the record is not a JSON object")
    missing = [k for k in ("id", "created", "pending", "version") if k not in meta]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    sid, created, pending, version = meta["id"], meta["created"], meta["pending"], meta["version"]
    if not isinstance(sid, str) or not SESSION_ID.match(sid) or sid != meta_path.stem:
        raise ValueError("its id does not match the file name")
    if not _is_int(created) or not 0 <= created < 2**53:
        raise ValueError(f"created must be an integer time in seconds, got {_short(created)}")
    if not _is_int(version) or not 1 <= version < 10**18:
        raise ValueError(f"version must be a positive integer, got {_short(version)}")
    if pending is not None and (not _is_int(pending) or not 0 <= pending < vocab_size):
        raise ValueError(f"pending must be null or a token id below {vocab_size}, got {_short(pending)}")
    state = state_path(folder, sid, version)
    tokens_read, state_bytes = peek_state(state, state_keys)
    disk_bytes = state.stat().st_size + meta_path.stat().st_size
    return SavedSession(sid, created, pending, version, tokens_read, state_bytes, disk_bytes)


def peek_state(path: Path, state_keys: set[str]) -> tuple[int, int]:
    """(tokens read, state bytes) of a saved cache from its header alone (the tensors stay on disk)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            offset = int((f.metadata() or {})["seqlen_offset"])
            keys = set(f.keys())
            nbytes = sum(math.prod(f.get_slice(k).get_shape()) * _DTYPE_BYTES[f.get_slice(k).get_dtype()]
                         for k in keys)
    except FileNotFoundError:
        raise ValueError(f"its state file {path.name} is missing") from None
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"its state file {path.name} is unreadable ({_reason(e)})") from None
    if keys != state_keys:
        raise ValueError(f"its state file {path.name} holds other tensors than this model's state")
    if offset < 0:
        raise ValueError(f"its state file {path.name} has a negative token count")
    return offset, nbytes


def quarantine(folder: Path, paths: list[Path]) -> list[str]:
    """Move ``paths`` into ``folder/quarantine/`` (never overwriting); their names, for the log."""
    target = folder / QUARANTINE
    target.mkdir(exist_ok=True)
    moved = []
    for path in dict.fromkeys(paths):
        dest, n = target / path.name, 0
        while dest.exists():
            n += 1
            dest = target / f"{path.name}.{n}"
        try:
            os.replace(path, dest)
            moved.append(path.name)
        except OSError as e:
            log.error("could not move %s to %s/ (%s); left in place", path.name, QUARANTINE, e.strerror or e)
    return moved


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + "..."


def _reason(e: BaseException) -> str:
    """An exception's message without absolute paths (they name places outside the sessions folder)."""
    return re.sub(r"(/[^\s:'\"]+)+/", "", str(e))[:200] or type(e).__name__
