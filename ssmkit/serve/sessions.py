"""Stateful sessions: a cache snapshot per session, kept in memory up to a byte budget, always on disk.

A session is the model's state after reading some text, plus its **pending token**: the last token it
has seen but not yet fed to the model (``generate`` never feeds its last sampled token either). Reading
more text feeds the pending token and all new tokens but the last, which becomes the new pending token;
completing feeds the pending token and the prompt, then samples. So appending text in pieces and then
completing gives the tokens that generating from the whole text at once gives.

Files, in ``<folder>/`` (one folder per model, see :func:`model_fingerprint`)::

    <id>.json                        {"id", "created", "pending", "version"}, written atomically
    <id>.<version>.safetensors       the cache (ssmkit.models.ModelCache.save), written atomically

Every change writes the state under a new version, then the JSON that points to it, then removes the old
state: a crash at any moment leaves a consistent session, and a restart finds every acknowledged change.
Memory holds the most recently used states up to ``memory_budget`` bytes; beyond it the least recently
used are dropped from memory (their file is already current) and read back when next needed.

Disk: the files of all sessions stay within ``disk_quota`` bytes, checked before anything is written (a
change that would pass it is refused with :class:`SessionDiskFull`, as is one when the file system has
less free space than the new state needs); a write that fails for lack of space is the same error, and
leaves the session as it was. Startup (:mod:`ssmkit.serve.recovery`) never deletes what it cannot read.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import anyio.to_thread
import torch
from safetensors import SafetensorError

from ssmkit.models.cache import ModelCache
from ssmkit.models.config import write_text_atomic
from ssmkit.serve.recovery import (
    QUARANTINE,
    SESSION_ID,
    quarantine,
    recover,
    state_path,
)

if TYPE_CHECKING:
    from ssmkit.models.language_model import LanguageModel

log = logging.getLogger("ssmkit.serve")

# Besides the tensors: the safetensors header and the JSON record (a generous bound, for the quota check).
_FILE_OVERHEAD = 64 * 1024
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class SessionNotFound(KeyError):
    """No session with this id (or a malformed id)."""


class SessionLimit(RuntimeError):
    """The store holds its maximum number of sessions."""


class SessionStateError(RuntimeError):
    """A session's state could not be read back or saved; the message is for clients, ``detail`` for the log."""

    def __init__(self, message: str, detail: str, code: str = "session_state_unreadable") -> None:
        super().__init__(message)
        self.detail, self.code = detail, code


class SessionDiskFull(RuntimeError):
    """A session change was refused: the sessions' disk quota, or the disk itself, is full."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(eq=False)
class Session:
    """One session's bookkeeping; ``cache`` is None while its state lives only on disk."""

    id: str
    created: int
    pending: int | None
    version: int
    tokens_read: int
    state_bytes: int
    disk_bytes: int = 0
    cache: ModelCache | None = None
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)

    @property
    def tokens(self) -> int:
        """Tokens the session has seen: those read into the state plus the pending one."""
        return self.tokens_read + (self.pending is not None)

    def info(self) -> dict[str, object]:
        return {"id": self.id, "object": "session", "created": self.created, "tokens": self.tokens,
                "state_bytes": self.state_bytes, "in_memory": self.cache is not None}


def model_fingerprint(folder: Path) -> str:
    """16 hex digits of SHA-256 over a checkpoint folder's config and weight files (states belong to one model)."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()[:16]


class SessionStore:
    """Sessions of one model, persisted in ``folder``; used from the server's event loop.

    Example::

        store = SessionStore(Path("sessions"), model, memory_budget=1 << 30)
        session = await store.create(pending=257)
        cache = await store.state(session)
        await store.commit(session, new_cache, pending=42)
    """

    def __init__(self, folder: Path, model: LanguageModel, *, memory_budget: int, max_sessions: int = 100_000,
                 disk_quota: int = 10 << 30) -> None:
        self.folder = folder
        self.model = model
        self.memory_budget = memory_budget
        self.max_sessions = max_sessions
        self.disk_quota = disk_quota
        self.disk_bytes = 0
        self._reserved = 0
        self.device = model.embedding.weight.device
        self._sessions: dict[str, Session] = {}
        self._order: list[str] = []  # every session id, sorted: the order of GET /v1/sessions pages
        self._lru: OrderedDict[str, None] = OrderedDict()
        self.memory_bytes = 0
        folder.mkdir(parents=True, exist_ok=True)
        self._recover()

    def _recover(self) -> None:
        meta_cache = self.model.allocate_cache(1, device=torch.device("meta"))
        keys = {f"layers.{i}.{name}" for i, st in enumerate(meta_cache.states) for name in st.tensors()}
        for saved in recover(self.folder, self.model.config.vocab_size, keys):
            self._sessions[saved.id] = Session(saved.id, saved.created, saved.pending, saved.version,
                                               saved.tokens_read, saved.state_bytes, saved.disk_bytes)
            self.disk_bytes += saved.disk_bytes
        self._order = sorted(self._sessions)
        if self._sessions:
            log.info("restored %d sessions (%.1f MB on disk)", len(self._sessions), self.disk_bytes / 2**20)

    def _state_path(self, sid: str, version: int) -> Path:
        return state_path(self.folder, sid, version)

    def __len__(self) -> int:
        return len(self._sessions)

    def list(self) -> list[Session]:
        """Every session, oldest first (O(n log n): for tools and tests; the API pages with :meth:`page`)."""
        return sorted(self._sessions.values(), key=lambda s: (s.created, s.id))

    def page(self, limit: int, after: str | None = None) -> tuple[list[Session], bool]:
        """Up to ``limit`` sessions in id order, those after ``after`` (any string: a cursor that need not be a
        session still open), and whether more follow. O(log n + limit)."""
        start = 0 if after is None else bisect.bisect_right(self._order, after)
        ids = self._order[start:start + limit + 1]
        return [self._sessions[sid] for sid in ids[:limit]], len(ids) > limit

    def _add(self, session: Session) -> None:
        self._sessions[session.id] = session
        bisect.insort(self._order, session.id)

    def _forget(self, sid: str) -> Session | None:
        session = self._sessions.pop(sid, None)
        if session is not None:
            i = bisect.bisect_left(self._order, sid)
            if i < len(self._order) and self._order[i] == sid:
                del self._order[i]
        return session

    def get(self, sid: str) -> Session:
        """The session ``sid``; :class:`SessionNotFound` if there is none (or the id is malformed)."""
        session = self.get_or_none(sid)
        if session is None:
            raise SessionNotFound(sid)
        return session

    def get_or_none(self, sid: str) -> Session | None:
        return self._sessions.get(sid) if isinstance(sid, str) and SESSION_ID.match(sid) else None

    async def create(self, pending: int | None, cache: ModelCache | None = None) -> Session:
        """A new session holding ``cache`` (default: the zero state) and ``pending``."""
        if len(self._sessions) >= self.max_sessions:
            raise SessionLimit(f"the server holds its limit of {self.max_sessions} sessions; delete some first")
        cache = self.model.allocate_cache(1) if cache is None else cache
        sid = "sess_" + secrets.token_hex(16)
        session = Session(sid, int(time.time()), pending, 0, cache.seqlen_offset, cache.nbytes)
        self._add(session)
        try:
            await self.commit(session, cache, pending)
        except BaseException:
            self._forget(sid)
            raise
        return session

    async def state(self, session: Session) -> ModelCache:
        """The session's state (read from disk if it was spilled). Callers clone it before changing it."""
        if session.cache is None:
            path = self._state_path(session.id, session.version)
            try:
                cache = await anyio.to_thread.run_sync(lambda: self._as_model_cache(ModelCache.load(path, self.device)))
            except (OSError, ValueError, TypeError, SafetensorError) as e:
                await self._quarantine(session)
                raise SessionStateError(f"session {session.id}: its saved state cannot be read; the session was "
                                        "closed and its files kept aside for inspection",
                                        f"session {session.id}: {path.name} cannot be read: {e}; moved to "
                                        f"{QUARANTINE}/") from None
            if session.cache is None:
                self._keep(session, cache)
        self._lru.move_to_end(session.id)
        assert session.cache is not None
        return session.cache

    async def commit(self, session: Session, cache: ModelCache, pending: int | None) -> None:
        """Make ``cache``/``pending`` the session's state: on disk first (new version), then in memory.

        Raises :class:`SessionDiskFull` (nothing written) past the quota or the free space, and on a write
        that fails for lack of space; :class:`SessionStateError` on any other failed write. Either way the
        session stays as it was."""
        version = session.version + 1
        meta = {"id": session.id, "created": session.created, "pending": pending, "version": version}
        old = self._state_path(session.id, session.version)
        new = self._state_path(session.id, version)
        need = cache.nbytes + _FILE_OVERHEAD
        self._check_space(need - session.disk_bytes, need)

        def write() -> int:
            try:
                cache.save(new)
                write_text_atomic(self.folder / f"{session.id}.json", json.dumps(meta) + "\n")
            except BaseException:
                new.unlink(missing_ok=True)
                raise
            old.unlink(missing_ok=True)
            return new.stat().st_size + (self.folder / f"{session.id}.json").stat().st_size

        self._reserved += need
        try:
            written = await anyio.to_thread.run_sync(write)
        except (OSError, SafetensorError) as e:
            raise self._write_error(session, e) from None
        finally:
            self._reserved -= need
        if session.id not in self._sessions:
            # Deleted while the files were being written: remove what was just written.
            self._remove_files(session.id, version)
            return
        self.disk_bytes += written - session.disk_bytes
        session.version, session.pending, session.disk_bytes = version, pending, written
        session.tokens_read, session.state_bytes = cache.seqlen_offset, cache.nbytes
        self._drop(session)
        self._keep(session, cache)

    def _check_space(self, growth: int, need: int) -> None:
        """Refuse a change that would take the sessions past the quota, or the disk below what it needs."""
        if self.disk_bytes + self._reserved + growth > self.disk_quota:
            raise SessionDiskFull(f"the sessions' disk quota of {self.disk_quota / 2**20:.1f} MB is used up "
                                  f"({self.disk_bytes / 2**20:.1f} MB); delete sessions or raise --session-disk-mb",
                                  "session_disk_quota")
        try:
            free = shutil.disk_usage(self.folder).free
        except OSError:
            return  # the write itself will tell
        if free < self._reserved + need:
            raise SessionDiskFull("the disk holding the sessions is full; free some space or delete sessions",
                                  "disk_full")

    def _write_error(self, session: Session, e: BaseException) -> Exception:
        text = str(e)
        if (isinstance(e, OSError) and e.errno in _NO_SPACE) or "StorageFull" in text or "os error 28" in text:
            log.error("session %s: no space to save its state: %s", session.id, e)
            return SessionDiskFull("the disk holding the sessions is full; the session was not changed "
                                   "(free some space or delete sessions)", "disk_full")
        return SessionStateError(f"session {session.id}: its new state could not be saved (the server log has "
                                 "the cause); the session was not changed",
                                 f"session {session.id}: saving its state failed: {e!r}", "session_save_failed")

    async def fork(self, session: Session) -> Session:
        """A new session with a copy of ``session``'s state and pending token."""
        cache = (await self.state(session)).clone()
        return await self.create(session.pending, cache)

    async def _quarantine(self, session: Session) -> None:
        """Close a session whose state cannot be read and move its files to ``quarantine/``, as startup does
        (never deleted; later requests for it are 404s, not a 500 each)."""
        if self._forget(session.id) is not None:
            self.disk_bytes -= session.disk_bytes
        self._drop(session)
        paths = [self.folder / f"{session.id}.json", *self.folder.glob(f"{session.id}.*.safetensors")]
        moved = await anyio.to_thread.run_sync(quarantine, self.folder, paths)
        log.warning("session %s: its state cannot be read; moved to %s/: %s", session.id, QUARANTINE, ", ".join(moved))

    async def delete(self, session: Session) -> None:
        """Forget the session: its JSON goes first, so a crash midway never brings it back."""
        if self._forget(session.id) is not None:
            self.disk_bytes -= session.disk_bytes
        self._drop(session)
        await anyio.to_thread.run_sync(self._remove_files, session.id, session.version)

    def _remove_files(self, sid: str, version: int) -> None:
        (self.folder / f"{sid}.json").unlink(missing_ok=True)
        self._state_path(sid, version).unlink(missing_ok=True)

    def _as_model_cache(self, cache: ModelCache) -> ModelCache:
        """``cache`` in the dtypes of this model's own cache: a state saved by a server that ran the same
        weights in another dtype (``ssmkit serve --dtype``) is cast on the way in, not refused."""
        fresh = self.model.allocate_cache(1)
        if all(a.dtype == b.dtype for s, f in zip(cache.states, fresh.states)
               for a, b in zip(s.tensors().values(), f.tensors().values())):
            return cache
        return fresh.copy_(cache)

    def _keep(self, session: Session, cache: ModelCache) -> None:
        session.cache = cache
        self._lru[session.id] = None
        self._lru.move_to_end(session.id)
        self.memory_bytes += cache.nbytes
        self._spill(keep=session.id)

    def _drop(self, session: Session) -> None:
        if session.cache is not None:
            self.memory_bytes -= session.cache.nbytes
            session.cache = None
        self._lru.pop(session.id, None)

    def _spill(self, keep: str) -> None:
        """Drop least recently used states from memory until the budget holds (never ``keep``, never one in use)."""
        for sid in list(self._lru):
            if self.memory_bytes <= self.memory_budget:
                return
            session = self._sessions.get(sid)
            if sid != keep and session is not None and not session.lock.locked():
                self._drop(session)

    def stats(self) -> dict[str, int]:
        return {"sessions": len(self._sessions), "in_memory": len(self._lru), "memory_bytes": self.memory_bytes,
                "memory_budget": self.memory_budget, "disk_bytes": self.disk_bytes, "disk_quota": self.disk_quota}


def default_sessions_dir() -> Path:
    """``$XDG_STATE_HOME/ssmkit/sessions`` (``~/.local/state/ssmkit/sessions`` without it)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "ssmkit" / "sessions"
