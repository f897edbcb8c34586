"""One call from a :class:`DataConfig` to tokenised train and validation rows, with a summary to print."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssmkit.data.config import DataConfig
from ssmkit.data.corpus import read_documents, split_documents
from ssmkit.data.packing import BucketedRows, PackedRows, TokenStream, encode_documents
from ssmkit.data.tokenizer import Tokenizer, build_tokenizer


@dataclass
class EvalSet:
    """Rows to score for validation or evaluation, and how many bytes of text a scored token stands for."""

    rows: PackedRows | BucketedRows
    index: np.ndarray
    """Rows scored: all of them, or ones evenly spaced over the whole split when a budget caps it."""
    bytes_per_target: float
    """Bytes of text per scored token over the whole split (every token but each document's first is
    scored once), so bits per byte = nats / ln 2 / (scored tokens x bytes_per_target); exact when every
    row is scored."""

    @classmethod
    def build(cls, stream: TokenStream, config: DataConfig, max_tokens: int) -> EvalSet:
        """Rows of ``stream``; with ``max_tokens > 0`` only about that many tokens' worth of rows."""
        rows = make_rows(stream, config)
        n = len(rows)
        wanted = -(-max_tokens // config.seq_len) if max_tokens else n
        index = np.arange(n) if wanted >= n else np.unique(np.linspace(0, n - 1, wanted).round().astype(np.int64))
        targets = len(stream.tokens) - stream.n_docs
        return cls(rows, index, stream.n_bytes / max(targets, 1))


@dataclass
class Datasets:
    """Rows ready for a :class:`~ssmkit.data.loader.BatchLoader`, the validation set, and a summary."""

    tokenizer: Tokenizer
    train: PackedRows | BucketedRows
    val: EvalSet | None
    summary: dict


def make_rows(stream: TokenStream, config: DataConfig) -> PackedRows | BucketedRows:
    """Pack or bucket ``stream`` as ``config.batching`` says."""
    cls = PackedRows if config.batching == "pack" else BucketedRows
    return cls(stream, config.seq_len)


def load_datasets(config: DataConfig, *, batch_size: int, eval_tokens: int, tokenizer: Tokenizer | None = None
                  ) -> Datasets:
    """Read, split, tokenise and cut the corpus ``config`` describes.

    ``eval_tokens`` caps what each validation scores (rows spread evenly over the whole validation
    split; 0 = all of it); ``batch_size`` only feeds the padding-waste figures of the summary.
    """
    config.validate()
    tokenizer = tokenizer or build_tokenizer(config.tokenizer)
    docs = read_documents(config.paths, config.extensions, config.separator)
    train_docs, val_docs = split_documents(docs, config.val_fraction)
    train_stream = encode_documents(train_docs, tokenizer)
    train = make_rows(train_stream, config)
    val = EvalSet.build(encode_documents(val_docs, tokenizer), config, eval_tokens) if val_docs else None

    packed = PackedRows(train_stream, config.seq_len)
    bucketed = BucketedRows(train_stream, config.seq_len)
    summary = {
        "documents": len(docs),
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
        "val_rows": 0 if val is None else len(val.rows),
        "val_rows_scored": 0 if val is None else len(val.index),
        "train_bytes": train_stream.n_bytes,
        "train_tokens": len(train_stream.tokens),
        "train_rows": len(train),
        "padding_waste_pack": packed.padding_waste(batch_size),
        "padding_waste_bucket": bucketed.padding_waste(batch_size),
    }
    return Datasets(tokenizer, train, val, summary)


def describe(summary: dict, config: DataConfig) -> str:
    """A few human lines about the data (sizes, split, padding waste of both batchings)."""
    source = " ".join(config.paths) if config.paths else "the Python standard library (tests left out)"
    return (
        f"data: {source}\n"
        f"  {summary['documents']:,} documents -> {summary['train_documents']:,} train / "
        f"{summary['val_documents']:,} validation (split by document; {summary['val_rows_scored']:,} of "
        f"{summary['val_rows']:,} validation rows scored at each evaluation)\n"
        f"  {summary['train_bytes']:,} bytes -> {summary['train_tokens']:,} tokens -> "
        f"{summary['train_rows']:,} rows of {config.seq_len} ({config.batching})\n"
        f"  padding waste: packing {summary['padding_waste_pack']:.2%}, "
        f"length bucketing {summary['padding_waste_bucket']:.2%}"
    )
