"""From documents to training rows: packing with ``seq_idx``, or length bucketing with padding.

Every document is encoded as ``[bos] tokens [eos]`` and the documents are laid end to end in one stream.
A row of length ``L`` takes ``L + 1`` consecutive stream tokens: inputs are the first ``L``, targets the
last ``L`` (aligned with the predictions: ``targets[t]`` is the token after ``inputs[t]``). A target is
kept only where it belongs to the same document as its input, so the model never predicts across a
boundary, and ``seq_idx`` (numbered from 0 within each row) makes every op restart its
state and convolution where the document changes: nothing leaks from one document to the next. Every
token except a ``bos`` is a target exactly once; rows overlap by one token for that reason.

Bucketing is the alternative for models or ops without ``seq_idx``: each document is cut into pieces of
at most ``L`` inputs, one piece per row, and rows of similar length are batched together and padded to
the longest. Both report how much of what they compute is padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ssmkit.data.corpus import Document
from ssmkit.data.tokenizer import Tokenizer

IGNORE = -100
"""Target id of positions that are not scored (document boundaries, padding): cross-entropy's
``ignore_index``, the value transformers uses too."""


@dataclass(frozen=True)
class TokenStream:
    """Documents as one token array; document ``d`` is ``tokens[starts[d]:starts[d + 1]]``."""

    tokens: np.ndarray
    """(T,) token ids, each document as ``[bos] ... [eos]``."""
    starts: np.ndarray
    """(D + 1,) int64 offsets of the documents, ``starts[-1] == T``."""
    n_bytes: int
    """Bytes of text the documents hold (the denominator of bits per byte)."""
    pad_id: int
    """Token placed in padded input positions (never scored)."""

    @property
    def n_docs(self) -> int:
        return len(self.starts) - 1

    def doc_of(self, positions: np.ndarray) -> np.ndarray:
        """Index of the document each stream position belongs to."""
        return np.searchsorted(self.starts, positions, side="right") - 1


def encode_documents(docs: list[Document], tokenizer: Tokenizer) -> TokenStream:
    """Encode ``docs`` with ``tokenizer`` into a :class:`TokenStream` (bos/eos around each).

    A tokenizer without bos/eos ids (a foreign checkpoint's own tokenizer) leaves them out.
    """
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    bos = [] if tokenizer.bos_id is None else [np.array([tokenizer.bos_id], dtype=dtype)]
    eos = [] if tokenizer.eos_id is None else [np.array([tokenizer.eos_id], dtype=dtype)]
    parts, lengths = [], []
    for doc in docs:
        ids = tokenizer.encode_array(doc.data).astype(dtype, copy=False)
        parts += [*bos, ids, *eos]
        lengths.append(len(ids) + len(bos) + len(eos))
    starts = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    pad = 0 if tokenizer.pad_id is None else tokenizer.pad_id
    return TokenStream(tokens, starts, sum(len(d.data) for d in docs), pad)


@dataclass
class Batch:
    """One (micro-)batch. ``seq_idx`` is None when every row holds a single document."""

    input_ids: torch.Tensor
    """(b, l) int64."""
    targets: torch.Tensor
    """(b, l) int64 next tokens, aligned with the predictions (``targets[:, t]`` follows
    ``input_ids[:, t]``); ``-100`` where nothing is scored (document boundaries, padding)."""
    seq_idx: torch.Tensor | None
    """(b, l) int32 document index within each row, or None."""
    n_tokens: int
    """Real (non-padding) input positions."""

    @property
    def n_targets(self) -> int:
        """Number of scored positions."""
        return int((self.targets != IGNORE).sum())

    def to(self, device: torch.device | str) -> Batch:
        seq_idx = None if self.seq_idx is None else self.seq_idx.to(device)
        return Batch(self.input_ids.to(device), self.targets.to(device), seq_idx, self.n_tokens)


class PackedRows:
    """Documents packed end to end into rows of ``seq_len`` with ``seq_idx``; the last row is padded."""

    def __init__(self, stream: TokenStream, seq_len: int) -> None:
        self.stream = stream
        self.seq_len = seq_len
        # Scored windows need one token past the inputs; the stream's first token is never a target.
        self.n_rows = math.ceil(max(len(stream.tokens) - 1, 0) / seq_len)
        self.row_lengths = np.full(self.n_rows, seq_len, dtype=np.int64)
        if self.n_rows:
            self.row_lengths[-1] = len(stream.tokens) - 1 - (self.n_rows - 1) * seq_len

    def __len__(self) -> int:
        return self.n_rows

    def batch(self, rows: np.ndarray) -> Batch:
        """The rows ``rows`` stacked, padded to the longest of them."""
        width = int(self.row_lengths[rows].max())
        b = len(rows)
        inputs = np.full((b, width), self.stream.pad_id, dtype=np.int64)
        targets = np.full((b, width), IGNORE, dtype=np.int64)
        seq_idx = np.zeros((b, width), dtype=np.int32)
        for j, r in enumerate(rows):
            start, n = int(r) * self.seq_len, int(self.row_lengths[r])
            pos = np.arange(start, start + n + 1)
            tok = self.stream.tokens[start:start + n + 1].astype(np.int64)
            doc = self.stream.doc_of(pos)
            inputs[j, :n] = tok[:n]
            targets[j, :n] = np.where(doc[1:] == doc[:-1], tok[1:], IGNORE)
            seq_idx[j, :n] = doc[:n] - doc[0]
            # Padding continues the last document's index so it cannot start a spurious document.
            seq_idx[j, n:] = seq_idx[j, n - 1]
        return Batch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(seq_idx),
                     int(self.row_lengths[rows].sum()))

    def padding_waste(self, batch_size: int) -> float:
        """Share of computed positions that are padding: only the last row is short."""
        return waste(self.row_lengths, batch_size, sort=False)


class BucketedRows:
    """One document piece (at most ``seq_len`` inputs) per row; rows of similar length batched together."""

    def __init__(self, stream: TokenStream, seq_len: int) -> None:
        self.stream = stream
        self.seq_len = seq_len
        starts, lengths = [], []
        for d in range(stream.n_docs):
            a, e = int(stream.starts[d]), int(stream.starts[d + 1])
            # Pieces of a document overlap by one token so that every token but bos is a label once.
            for s in range(a, e - 1, seq_len):
                starts.append(s)
                lengths.append(min(seq_len, e - 1 - s))
        self.piece_starts = np.array(starts, dtype=np.int64)
        self.row_lengths = np.array(lengths, dtype=np.int64)
        # Longest first, ties by position: similar lengths sit next to each other.
        self.order = np.lexsort((self.piece_starts, -self.row_lengths))

    def __len__(self) -> int:
        return len(self.row_lengths)

    def batch(self, rows: np.ndarray) -> Batch:
        """The pieces ``rows`` stacked, right-padded to the longest of them."""
        lengths = self.row_lengths[rows]
        width = int(lengths.max())
        b = len(rows)
        inputs = np.full((b, width), self.stream.pad_id, dtype=np.int64)
        targets = np.full((b, width), IGNORE, dtype=np.int64)
        for j, (s, n) in enumerate(zip(self.piece_starts[rows], lengths)):
            tok = self.stream.tokens[s:s + n + 1].astype(np.int64)
            inputs[j, :n] = tok[:n]
            targets[j, :n] = tok[1:]
        return Batch(torch.from_numpy(inputs), torch.from_numpy(targets), None, int(lengths.sum()))

    def units(self, batch_size: int) -> list[np.ndarray]:
        """Batches of ``batch_size`` pieces of similar length, longest first; a short last one kept."""
        return [self.order[i:i + batch_size] for i in range(0, len(self.order), batch_size)]

    def padding_waste(self, batch_size: int) -> float:
        """Share of computed positions that are padding when batching ``batch_size`` pieces by length."""
        return waste(self.row_lengths, batch_size, sort=True)


def waste(row_lengths: np.ndarray, batch_size: int, *, sort: bool) -> float:
    """Padding / computed positions when ``row_lengths`` are batched ``batch_size`` at a time.

    Each batch is padded to its longest row; ``sort`` batches rows longest first (bucketing), otherwise
    in the order given. Returns 0 for no rows.
    """
    lengths = np.sort(row_lengths)[::-1] if sort else np.asarray(row_lengths)
    if len(lengths) == 0:
        return 0.0
    computed = 0
    for i in range(0, len(lengths), batch_size):
        group = lengths[i:i + batch_size]
        computed += int(group.max()) * len(group)
    return 1.0 - int(lengths.sum()) / computed
