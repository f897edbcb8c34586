"""The prefix cache's disk tier: snapshots evicted from memory, as safetensors + JSON, within a byte budget.

Files, in ``<sessions folder of the model>/prefix-cache/``::

    <name>.safetensors   the state (ssmkit.generation.ModelCache.save), written atomically, first
    <name>.json          {"format", "version", "block", "chain", "tail", "position"}, written atomically, last

``name`` is a hash of the chain hash and the tail, so a file's name says which prefix it holds. The
budget is kept as the sessions' quota is: checked before anything is written (the state's bytes plus
64 KiB for header and record), a write is skipped when the file system has less free space than it
needs, and one that fails for lack of space leaves nothing behind. At startup every record is checked
(well-formed JSON of this format, a state file with this model's tensors and the record's token count);
what fails is deleted (it is a cache: nothing is lost that reading the prompt again does not restore),
as are ``*.tmp`` files of interrupted writes. Other files are left alone. Never pickle.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from array import array
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ssmkit.models.cache import ModelCache
from ssmkit.models.config import write_text_atomic
from ssmkit.serve.recovery import peek_state

if TYPE_CHECKING:
    from ssmkit.models.language_model import LanguageModel

log = logging.getLogger("ssmkit.serve")

FORMAT = "ssmkit-prefix-state"
VERSION = 1
_OVERHEAD = 64 * 1024
_NAME = re.compile(r"^[0-9a-f]{32}$")
_MAX_RECORD_BYTES = 4096
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclasses.dataclass
class Record:
    """A snapshot on disk: the prefix it holds (chain hash of its full blocks, exact tail) and its sizes."""

    chain: bytes
    tail: list[int]
    position: int
    nbytes: int
    disk_bytes: int


def record_name(chain: bytes, tail: list[int] | tuple[int, ...]) -> str:
    return hashlib.blake2b(chain + array("q", tail).tobytes(), digest_size=16).hexdigest()


class DiskTier:
    """Reads and writes snapshot files in ``folder``; the caller (the prefix cache) keeps the byte count."""

    def __init__(self, folder: Path, budget: int, model: LanguageModel, block: int) -> None:
        if budget < 1:
            raise ValueError(f"the prefix cache's disk budget must be positive, got {budget}")
        self.folder = folder
        self.budget = budget
        self.model = model
        self.block = block
        self.device = model.embedding.weight.device
        meta = model.allocate_cache(1, device=torch.device("meta"))
        self._keys = {f"layers.{i}.{name}" for i, st in enumerate(meta.states) for name in st.tensors()}
        self._dtypes = [t.dtype for s in meta.states for t in s.tensors().values()]
        folder.mkdir(parents=True, exist_ok=True)

    def need(self, nbytes: int) -> int:
        """Bytes a snapshot of ``nbytes`` state bytes is allowed on disk (for the budget check)."""
        return nbytes + _OVERHEAD

    def scan(self) -> list[Record]:
        """The readable snapshots, least recently used first, within the budget; removes the rest."""
        found: list[tuple[float, Record]] = []
        for path in sorted(self.folder.iterdir()):
            if path.is_file() and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
        for path in sorted(self.folder.glob("*.json")):
            if not _NAME.match(path.stem):
                continue
            try:
                record = self._read(path)
            except Exception as e:  # noqa: BLE001 (whatever is wrong with one file, the others are read)
                log.warning("prefix cache: %s cannot be read (%s); removed", path.name, str(e)[:200])
                self.remove(path.stem)
                continue
            found.append((path.stat().st_mtime, record))
        for path in self.folder.glob("*.safetensors"):  # states whose record was never written or was removed
            if _NAME.match(path.stem) and not (self.folder / f"{path.stem}.json").exists():
                path.unlink(missing_ok=True)
        found.sort(key=lambda x: x[0])
        records, used = [], 0
        for _, record in reversed(found):  # the most recently used are kept within the budget
            if used + record.disk_bytes > self.budget:
                self.remove(record_name(record.chain, record.tail))
                continue
            used += record.disk_bytes
            records.append(record)
        if records:
            log.info("prefix cache: %d snapshots on disk (%.1f MB)", len(records), used / 2**20)
        return records[::-1]

    def _read(self, path: Path) -> Record:
        if path.stat().st_size > _MAX_RECORD_BYTES:
            raise ValueError(f"the record is larger than {_MAX_RECORD_BYTES} bytes")
        meta = json.loads(path.read_bytes())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError("not a prefix snapshot record of this version")
        if meta.get("block") != self.block:
            raise ValueError(f"written for blocks of {meta.get('block')!r} tokens, not {self.block}")
        chain, tail, position = meta.get("chain"), meta.get("tail"), meta.get("position")
        if not isinstance(chain, str) or not re.fullmatch(r"[0-9a-f]{32}", chain):
            raise ValueError("chain is not 32 hex digits")
        vocab = self.model.config.vocab_size
        if (not isinstance(tail, list) or len(tail) >= self.block
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tail)):
            raise ValueError(f"tail must be fewer than {self.block} token ids below {vocab}")
        if not isinstance(position, int) or isinstance(position, bool) or position < 1 or position % self.block != len(tail):
            raise ValueError("position does not match the tail")
        if record_name(bytes.fromhex(chain), tail) != path.stem:
            raise ValueError("the file name does not match the prefix it holds")
        state = self.folder / f"{path.stem}.safetensors"
        offset, nbytes = peek_state(state, self._keys)
        if offset != position:
            raise ValueError(f"the state holds {offset} tokens, the record says {position}")
        return Record(bytes.fromhex(chain), tail, position, nbytes, state.stat().st_size + path.stat().st_size)

    def write(self, name: str, record: Record, cache: ModelCache) -> int:
        """Write one snapshot (state, then record); its bytes on disk, or 0 when there was no room."""
        try:
            if shutil.disk_usage(self.folder).free < self.need(record.nbytes):
                log.warning("prefix cache: the disk is full; a snapshot was not written")
                return 0
        except OSError:
            pass  # the write itself will tell
        state, meta_path = self.folder / f"{name}.safetensors", self.folder / f"{name}.json"
        meta = {"format": FORMAT, "version": VERSION, "block": self.block, "chain": record.chain.hex(),
                "tail": list(record.tail), "position": record.position}
        try:
            cache.save(state)
            write_text_atomic(meta_path, json.dumps(meta) + "\n")
            return state.stat().st_size + meta_path.stat().st_size
        except Exception as e:
            self.remove(name)
            if isinstance(e, OSError) and e.errno in _NO_SPACE or "os error 28" in str(e):
                log.warning("prefix cache: no space left for a snapshot; not written")
                return 0
            raise

    def load(self, name: str, model: LanguageModel) -> ModelCache | None:
        """A snapshot's state on the model's device in its cache dtypes; None (files removed) if unreadable."""
        try:
            cache = ModelCache.load(self.folder / f"{name}.safetensors", self.device)
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 (a bad snapshot is only a miss)
            log.warning("prefix cache: snapshot %s cannot be read (%s); removed", name, type(e).__name__)
            self.remove(name)
            return None
        dtypes = [t.dtype for s in cache.states for t in s.tensors().values()]
        if dtypes != self._dtypes:  # written by a server that ran these weights in another dtype
            cache = model.allocate_cache(1).copy_(cache)
        return cache

    def remove(self, name: str) -> None:
        """Delete a snapshot's files, record first (a state without a record is removed at startup)."""
        for suffix in (".json", ".safetensors"):
            try:
                os.unlink(self.folder / f"{name}{suffix}")
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("prefix cache: could not remove %s%s (%s)", name, suffix, e.strerror)
