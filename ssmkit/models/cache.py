"""The model cache: one recurrent state per layer, a value you can clone, save and load.

For an SSM-only model every state has a fixed size, so :attr:`ModelCache.nbytes` is the same after
one token and after a million: that is what makes "read a document once, answer many questions from
its saved state" cheap.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ssmkit.io.files import load_safetensors, save_safetensors_atomic
from ssmkit.layers.state import STATE_TYPES, LayerState

CACHE_FORMAT = "ssmkit-cache"
CACHE_FORMAT_VERSION = 1


class ModelCache:
    """Per-layer states of a model plus the number of positions read (``seqlen_offset``).

    Made by :meth:`ssmkit.models.LanguageModel.allocate_cache`; a forward with ``cache=`` reads and
    updates it in place.

    Example::

        cache = model.allocate_cache(1)
        model(document_ids, cache=cache)         # read a document once
        cache.save("doc.cache.safetensors")
        fork = ModelCache.load("doc.cache.safetensors")
        model.generate(question_ids, 20, cache=fork)
    """

    def __init__(self, states: list[LayerState], seqlen_offset: int = 0) -> None:
        if not states:
            raise ValueError("ModelCache needs at least one layer state")
        batches = {s.batch_size for s in states}
        if len(batches) != 1:
            raise ValueError(f"layer states disagree on the batch size: {sorted(batches)}")
        self.states = list(states)
        self.seqlen_offset = seqlen_offset

    @property
    def batch_size(self) -> int:
        return self.states[0].batch_size

    @property
    def nbytes(self) -> int:
        """Bytes held by every state tensor."""
        return sum(s.nbytes for s in self.states)

    def clone(self) -> ModelCache:
        """An independent copy: updating one leaves the other unchanged."""
        return ModelCache([s.clone() for s in self.states], self.seqlen_offset)

    def copy_(self, other: ModelCache) -> ModelCache:
        """Overwrite this cache in place with ``other``'s states (same layers and shapes)."""
        if len(other.states) != len(self.states):
            raise ValueError(f"cannot copy a cache of {len(other.states)} layers into one of {len(self.states)}")
        for mine, theirs in zip(self.states, other.states):
            mine.copy_(theirs)
        self.seqlen_offset = other.seqlen_offset
        return self

    def reset_(self, rows: torch.Tensor | None = None) -> ModelCache:
        """Zero every state in place (all rows, or the rows where the bool (b,) mask ``rows`` is True).

        ``seqlen_offset`` is reset only when all rows are.
        """
        for s in self.states:
            s.zero_(rows)
        if rows is None:
            self.seqlen_offset = 0
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write the cache to a safetensors file, atomically (temporary file, then rename)."""
        tensors = {f"layers.{i}.{name}": t for i, s in enumerate(self.states) for name, t in s.tensors().items()}
        metadata = {
            "format": CACHE_FORMAT,
            "format_version": str(CACHE_FORMAT_VERSION),
            "kinds": json.dumps([s.kind for s in self.states]),
            "seqlen_offset": str(self.seqlen_offset),
        }
        save_safetensors_atomic(tensors, Path(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> ModelCache:
        """Read a cache written by :meth:`save` onto ``device``; bad files raise errors naming the file."""
        path = Path(path)
        tensors, metadata = load_safetensors(path, device=device)
        if metadata.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path}: not an ssmkit cache file (metadata format {metadata.get('format')!r})")
        if metadata.get("format_version") != str(CACHE_FORMAT_VERSION):
            raise ValueError(f"{path}: cache format_version {metadata.get('format_version')!r} is not readable "
                             f"(this ssmkit reads {CACHE_FORMAT_VERSION})")
        try:
            kinds = json.loads(metadata["kinds"])
            seqlen_offset = int(metadata["seqlen_offset"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: cache metadata is incomplete or malformed ({e})") from None
        states = []
        for i, kind in enumerate(kinds):
            if kind not in STATE_TYPES:
                raise ValueError(f"{path}: layer {i} has state kind {kind!r}; known kinds: {', '.join(STATE_TYPES)}")
            state_type = STATE_TYPES[kind]
            names = [f"layers.{i}.{f.name}" for f in dataclasses.fields(state_type)]
            missing = [n for n in names if n not in tensors]
            if missing:
                raise ValueError(f"{path}: missing tensors {', '.join(missing)}")
            states.append(state_type(**{n.rsplit(".", 1)[1]: tensors.pop(n) for n in names}))
        if tensors:
            raise ValueError(f"{path}: unexpected tensors {', '.join(sorted(tensors))}")
        try:
            return cls(states, seqlen_offset)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def __repr__(self) -> str:
        kinds = [s.kind for s in self.states]
        return (f"ModelCache(layers={len(kinds)}, kinds={sorted(set(kinds))}, batch_size={self.batch_size}, "
                f"seqlen_offset={self.seqlen_offset}, nbytes={self.nbytes})")
