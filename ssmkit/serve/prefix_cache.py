"""Automatic prefix-state cache: a request resumes from the model state of the longest prompt prefix seen before.

An SSM's state after reading a prefix is small (a fixed size) and exact at every token, so the server
keeps **snapshots** of it (every layer's cache: SSM and convolution states, and the KV of attention
layers in a hybrid) while it reads prompts: at each prompt's end, and at every multiple of ``interval``
tokens (at most :data:`MAX_SNAPSHOTS_PER_REQUEST` per request, the deepest ones), and at its **branch
point**: the end of the longest run of whole blocks it shares with a prompt read before (so when 64
questions follow one document, the second question leaves a snapshot where the document ends and the
others resume there). A new prompt starts from the deepest snapshot whose tokens are a prefix of it and
reads only the rest. A prompt read before in full resumes at its very end: its snapshot keeps the
logits of the last token (in memory), so nothing is read again.

**Keys.** A prefix of ``n`` tokens is keyed by a hash chain over its full blocks of
:data:`BLOCK_TOKENS` tokens (``chain[j+1] = blake2b(chain[j] || block j)``) plus its **exact tail**, the
``n mod BLOCK_TOKENS`` tokens after the last full block: a hit can land on any token, not only on a
block boundary. Per chain hash the index holds the snapshots by (tail length, rolling hash of the
tail), and a candidate's tail is compared token by token before it is used. Lookup walks the prompt's
blocks from the deepest down, hashing each block once and each tail token at most once: its cost is
linear in the prompt.

**Exactness.** A snapshot is the state a cold run has after those very tokens, so a resumed request
reads the rest of its prompt from the cold run's state and samples its tokens. Prefill chunks end at
snapshot positions whether the cache hit or not; where a hit lands inside a cold run's chunk, only the
float rounding of the split chunk differs (as between batched and lone requests).

**Cost.** A snapshot point splits the prompt's prefill there, and a prompt with points is read on its own,
not in a batch of new prompts: each extra forward costs the host tens of milliseconds on a GPU (launches),
whatever the tokens. So the default ``interval`` is the engine's default prefill chunk (2,048): interval
points fall where a long prompt's chunks end anyway, and a prompt that shares nothing and fits in a chunk
has no point at all, so it is read exactly as without the cache (in a batch of new prompts, its state
kept at its end without a copy, stored after every first token of its turn is sent, a few a turn while
the decode steps run: :mod:`ssmkit.serve.engine_prompts`). A shorter interval finds hits closer to where
prompts diverge, at that price for every long prompt.

**Requests that arrive together.** A prompt that shares at least ``interval`` more tokens with a prompt
being read right now (its *leader*) than with any snapshot waits (:meth:`PrefixCache.plan` with
``may_wait``; the server polls :meth:`PrefixPlan.leader_done`, within the request's deadline) until the
leader has read its prompt, then resumes from the leader's snapshots: 64 questions sent at once about one
document read it once, not 64 times.

**Budgets.** Snapshots live in memory (on the model's device) up to ``memory_budget`` bytes, least
recently used evicted first; with a disk budget, evicted snapshots are written (safetensors + JSON,
atomically, by a background thread, :mod:`ssmkit.serve.prefix_disk`) and read back on a hit.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import secrets
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ssmkit.models.cache import ModelCache
from ssmkit.serve.prefix_disk import DiskTier, Record, record_name
from ssmkit.serve.prefix_keys import BLOCK_TOKENS, MODULUS, PrefixKeys
from ssmkit.serve.prefix_plan import PrefixPlan

if TYPE_CHECKING:
    from ssmkit.models.language_model import LanguageModel

__all__ = ["BLOCK_TOKENS", "MAX_SNAPSHOTS_PER_REQUEST", "PrefixCache", "PrefixPlan"]

log = logging.getLogger("ssmkit.serve")

MAX_SNAPSHOTS_PER_REQUEST = 16
_WRITE_QUEUE = 8  # evicted snapshots waiting for the disk writer; more are dropped (bounded memory)
MAX_SEEN_BLOCKS = 1 << 18  # chain hashes of prompt blocks remembered to find branch points (~30 MB at most)


@dataclasses.dataclass(eq=False)
class _Entry:
    chain: bytes
    tail: tuple[int, ...]
    tail_hash: int
    position: int
    nbytes: int
    cache: ModelCache | None = None  # in memory
    logits: torch.Tensor | None = None  # (1, V) after the last token, for a prompt end (memory only)
    writing: ModelCache | None = None  # queued for the disk writer (still usable)
    disk_bytes: int = 0  # > 0: on disk

    @property
    def name(self) -> str:
        return record_name(self.chain, self.tail)

    @property
    def usable(self) -> bool:
        return self.cache is not None or self.writing is not None or self.disk_bytes > 0


class PrefixCache:
    """Snapshots of prompt-prefix states within a memory (and optional disk) budget; thread-safe.

    ``plan`` runs on a worker thread (it may read a snapshot from disk), ``store`` on the engine thread.
    """

    def __init__(self, model: LanguageModel, *, memory_budget: int, interval: int = 2048, disk: DiskTier | None = None) -> None:
        if memory_budget < 0 or interval < 1:
            raise ValueError("memory_budget must be >= 0 and interval positive")
        self.model = model
        self.memory_budget = memory_budget
        self.interval = interval
        self.disk = disk
        self._mult = secrets.randbelow(MODULUS - 2) + 2
        self._lock = threading.Lock()
        self._nodes: dict[bytes, dict[tuple[int, int], _Entry]] = {}
        self._lengths: dict[bytes, dict[int, int]] = {}  # per chain hash: tail length -> entries
        self._seen: OrderedDict[bytes, None] = OrderedDict()  # chain hashes of blocks of prompts read (LRU)
        self._readers: weakref.WeakSet[PrefixPlan] = weakref.WeakSet()  # plans whose prompt is being read
        self._memory: OrderedDict[_Entry, None] = OrderedDict()
        self._on_disk: OrderedDict[_Entry, None] = OrderedDict()
        self.memory_bytes = 0
        self.disk_bytes = 0
        self.counts = dict.fromkeys(("hits", "misses", "tokens_saved", "tokens_looked_up", "snapshots", "evictions",
                                     "disk_hits", "disk_writes", "disk_write_failures", "disk_dropped"), 0)
        self._writes: queue.Queue[_Entry | None] = queue.Queue(_WRITE_QUEUE)
        self._writer: threading.Thread | None = None
        if disk is not None:
            for record in disk.scan():
                self._add_disk_record(record)
            self._writer = threading.Thread(target=self._write_loop, name="ssmkit-prefix-writer", daemon=True)
            self._writer.start()

    def close(self) -> None:
        """Stop the disk writer (snapshots still queued are dropped: it is a cache)."""
        if self._writer is not None:
            while True:
                try:
                    self._writes.get_nowait()
                except queue.Empty:
                    break
            self._writes.put(None)
            self._writer.join(10)

    # -- lookup ---------------------------------------------------------------------------------------

    def plan(self, ids: Sequence[int], may_wait: bool = False) -> PrefixPlan:
        """Find the deepest snapshot for ``ids`` (all of them only with the logits after the last) and choose
        where this request snapshots. With ``may_wait``, a prompt that a prompt being read now would take
        further gets a plan with ``leader`` set instead (nothing taken, nothing counted): wait for
        :meth:`PrefixPlan.leader_done`, then plan again. The request must :meth:`PrefixPlan.release` its
        plan once its prompt is read (the engine does; a plan dropped unreleased is released by collection)."""
        keys = PrefixKeys(ids, self._mult)
        entry, logits = self._find(keys, len(keys.ids))
        found = 0 if entry is None else entry.position
        plan = PrefixPlan(keys, found, None, [], self)
        with self._lock:
            leader = self._leader(keys, found + self.interval) if may_wait else None
            if leader is not None:
                plan.leader = weakref.ref(leader)
                return plan
            self._readers.add(plan)
            branch = self._branch_point(keys)
        cache = self._take(entry) if entry is not None else None
        plan.start = start = entry.position if cache is not None else 0
        plan.cache = cache
        with self._lock:
            self.counts["hits" if cache is not None else "misses"] += 1
            self.counts["tokens_saved"] += start
            self.counts["tokens_looked_up"] += len(keys.ids)
        first = start // self.interval + 1
        last = (len(keys.ids) - 1) // self.interval
        points = [k * self.interval for k in range(max(first, last - MAX_SNAPSHOTS_PER_REQUEST + 1), last + 1)]
        if start < branch < len(keys.ids) and branch not in points:
            points = sorted([*points, branch])
        plan.points = points
        plan.logits = logits if start == len(keys.ids) else None
        return plan

    def _leader(self, keys: PrefixKeys, depth: int) -> PrefixPlan | None:
        """A plan being read whose prompt shares at least ``depth`` tokens of whole blocks with ``keys``
        (O(readers x log blocks): equal chain hashes at block j mean equal first j blocks; O(1) for a prompt
        shorter than ``depth``, which is planned under the lock the engine thread stores snapshots with)."""
        best, best_blocks = None, -(-depth // BLOCK_TOKENS)
        if len(keys.chain) <= best_blocks:  # a prompt shorter than that (most of them): no reader can lead it
            return None
        for reader in self._readers:
            other = reader.keys.chain
            if len(other) <= best_blocks:
                continue
            lo, hi = 0, min(len(keys.chain), len(other)) - 1  # chain[0] is shared by all
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if keys.chain[mid] == other[mid]:
                    lo = mid
                else:
                    hi = mid - 1
            if lo >= best_blocks and not reader.released:
                best, best_blocks = reader, lo
        return best

    def release(self, plan: PrefixPlan) -> None:
        with self._lock:
            self._readers.discard(plan)

    def _branch_point(self, keys: PrefixKeys) -> int:
        """Tokens in the longest run of whole blocks this prompt shares with one read before (0: none); then
        remember this prompt's blocks. O(blocks)."""
        depth = 0
        for j in range(len(keys.chain) - 1, 0, -1):
            if keys.chain[j] in self._seen:
                depth = j * BLOCK_TOKENS
                break
        for chain in keys.chain[1:]:
            self._seen[chain] = None
            self._seen.move_to_end(chain)
        while len(self._seen) > MAX_SEEN_BLOCKS:
            self._seen.popitem(last=False)
        return depth

    def _find(self, keys: PrefixKeys, limit: int) -> tuple[_Entry | None, torch.Tensor | None]:
        """The deepest usable snapshot of at most ``limit`` tokens, and its logits (taken under the lock)."""
        if limit < 1:
            return None, None
        with self._lock:
            for j in range(limit // BLOCK_TOKENS, -1, -1):
                node = self._nodes.get(keys.chain[j])
                if node is None:
                    continue
                base = j * BLOCK_TOKENS
                longest = min(BLOCK_TOKENS - 1, limit - base)
                hashes = keys.tail_hashes(j, longest)
                for length in sorted(self._lengths[keys.chain[j]], reverse=True):
                    if length > longest or base + length == 0:
                        continue
                    entry = node.get((length, hashes[length]))
                    if entry is None or (base + length == len(keys.ids) and entry.logits is None):
                        continue  # the whole prompt: usable only with the logits after it
                    if entry.usable and list(entry.tail) == keys.ids[base:base + length]:
                        self._touch(entry)
                        return entry, entry.logits
        return None, None

    def _take(self, entry: _Entry) -> ModelCache | None:
        """A copy of the entry's state for a request to read on (from memory, or read back from disk)."""
        with self._lock:
            held = entry.cache if entry.cache is not None else entry.writing
        if held is not None:
            return held.clone()
        if self.disk is None:
            return None
        cache = self.disk.load(entry.name, self.model)
        with self._lock:
            if cache is None:  # unreadable: the disk tier has removed its files
                self._forget_disk(entry)
                return None
            self.counts["disk_hits"] += 1
            # Kept in memory unless the writer removed its files meanwhile (it is then no longer indexed).
            if entry.cache is None and entry.disk_bytes > 0 and entry.nbytes <= self.memory_budget:
                self._keep(entry, cache)
        return cache.clone()

    # -- store ----------------------------------------------------------------------------------------

    def store(self, keys: PrefixKeys, position: int, cache: ModelCache, logits: torch.Tensor | None = None,
              owned: bool = False) -> None:
        """Keep a copy of ``cache``, the state after the first ``position`` tokens of ``keys.ids`` (and of
        ``logits``, (1, V), those after the last of them); ``cache`` itself when ``owned`` (never changed again)."""
        if position < 1:
            return
        if cache.seqlen_offset != position or cache.batch_size != 1:
            raise ValueError(f"a prefix snapshot of {position} tokens got a cache of batch {cache.batch_size} that "
                             f"has read {cache.seqlen_offset}")
        chain, length, tail_hash = keys.key(position)
        with self._lock:
            existing = self._nodes.get(chain, {}).get((length, tail_hash))
            if existing is not None and existing.usable:
                self._touch(existing)
                if logits is not None and existing.logits is None and existing.cache is not None:
                    existing.logits = logits.clone()
                    existing.nbytes += existing.logits.nbytes
                    self.memory_bytes += existing.logits.nbytes
                return
        nbytes = cache.nbytes + (0 if logits is None else logits.nbytes)
        if nbytes > self.memory_budget:
            return
        snap = cache if owned else cache.clone()
        base = position - length
        entry = _Entry(chain, tuple(keys.ids[base:position]), tail_hash, position, nbytes,
                       logits=None if logits is None else logits.clone())
        with self._lock:
            if (length, tail_hash) in self._nodes.get(chain, {}):
                return  # stored meanwhile (two requests with the same prompt)
            self._index(entry)
            self.counts["snapshots"] += 1
            self._keep(entry, snap)

    def _index(self, entry: _Entry) -> None:
        self._nodes.setdefault(entry.chain, {})[(len(entry.tail), entry.tail_hash)] = entry
        lengths = self._lengths.setdefault(entry.chain, {})
        lengths[len(entry.tail)] = lengths.get(len(entry.tail), 0) + 1

    def _unindex(self, entry: _Entry) -> None:
        node = self._nodes.get(entry.chain)
        if node is None or node.get((len(entry.tail), entry.tail_hash)) is not entry:
            return
        del node[(len(entry.tail), entry.tail_hash)]
        lengths = self._lengths[entry.chain]
        lengths[len(entry.tail)] -= 1
        if not lengths[len(entry.tail)]:
            del lengths[len(entry.tail)]
        if not node:
            del self._nodes[entry.chain], self._lengths[entry.chain]

    def _touch(self, entry: _Entry) -> None:
        if entry in self._memory:
            self._memory.move_to_end(entry)
        if entry in self._on_disk:
            self._on_disk.move_to_end(entry)

    def _keep(self, entry: _Entry, cache: ModelCache) -> None:
        """Put ``cache`` in memory as ``entry``'s state; evict the least recently used beyond the budget."""
        entry.cache = cache
        self._memory[entry] = None
        self.memory_bytes += entry.nbytes
        while self.memory_bytes > self.memory_budget and self._memory:
            old, _ = self._memory.popitem(last=False)
            self.memory_bytes -= old.nbytes
            self.counts["evictions"] += 1
            held, old.cache = old.cache, None
            if old.logits is not None:  # logits are kept in memory only
                old.nbytes -= old.logits.nbytes
                old.logits = None
            if self.disk is not None and old.disk_bytes == 0 and old.writing is None and held is not None:
                try:
                    old.writing = held
                    self._writes.put_nowait(old)
                except queue.Full:
                    old.writing = None
                    self.counts["disk_dropped"] += 1
            if not old.usable:
                self._unindex(old)

    # -- disk -----------------------------------------------------------------------------------------

    def _add_disk_record(self, record: Record) -> None:
        tail_hash = PrefixKeys(record.tail, self._mult).tail_hashes(0, len(record.tail))[-1]
        entry = _Entry(record.chain, tuple(record.tail), tail_hash, record.position, record.nbytes,
                       disk_bytes=record.disk_bytes)
        self._index(entry)
        self._on_disk[entry] = None
        self.disk_bytes += entry.disk_bytes

    def _forget_disk(self, entry: _Entry) -> None:
        self._on_disk.pop(entry, None)
        self.disk_bytes -= entry.disk_bytes
        entry.disk_bytes = 0
        if not entry.usable:
            self._unindex(entry)

    def _write_loop(self) -> None:
        assert self.disk is not None
        while (entry := self._writes.get()) is not None:
            cache = entry.writing
            record = Record(entry.chain, list(entry.tail), entry.position, entry.nbytes, 0)
            need, written = self.disk.need(entry.nbytes), 0
            try:
                with self._lock:
                    # Least recently used snapshots on disk make room for this one (the budget is never passed).
                    while need <= self.disk.budget < self.disk_bytes + need and self._on_disk:
                        old = next(iter(self._on_disk))
                        self.disk.remove(old.name)
                        self._forget_disk(old)
                if cache is not None and self.disk_bytes + need <= self.disk.budget:
                    written = self.disk.write(entry.name, record, cache)
            except Exception:
                log.exception("prefix cache: writing a snapshot failed")
            with self._lock:
                entry.writing = None
                if written:
                    entry.disk_bytes = written
                    self.disk_bytes += written
                    self._on_disk[entry] = None
                    self.counts["disk_writes"] += 1
                elif cache is not None:
                    self.counts["disk_write_failures"] += 1
                if not entry.usable:
                    self._unindex(entry)

    # -- numbers --------------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self.counts, "entries_in_memory": len(self._memory), "memory_bytes": self.memory_bytes,
                    "memory_budget": self.memory_budget, "entries_on_disk": len(self._on_disk),
                    "disk_bytes": self.disk_bytes,
                    "disk_budget": 0 if self.disk is None else self.disk.budget, "interval": self.interval}
