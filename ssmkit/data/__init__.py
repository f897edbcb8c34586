"""Data: byte or token documents from files and folders, split by document, packed or bucketed into rows.

    from ssmkit.data import DataConfig, load_datasets, BatchLoader
    data = load_datasets(DataConfig(seq_len=512), batch_size=16, eval_tokens=65536)  # stdlib corpus
    loader = BatchLoader(data.train, batch_size=16, seed=0)
    (batch,) = loader.next()   # batch.input_ids, batch.targets, batch.seq_idx: (16, 512)
"""

from ssmkit.data.config import DataConfig
from ssmkit.data.corpus import Document, default_corpus_root, read_documents, split_documents
from ssmkit.data.datasets import Datasets, EvalSet, describe, load_datasets, make_rows
from ssmkit.data.loader import BatchLoader, eval_batches
from ssmkit.data.packing import IGNORE, Batch, BucketedRows, PackedRows, TokenStream, encode_documents, waste
from ssmkit.data.tokenizer import (
    ByteTokenizer,
    MissingTokenizerError,
    TokenizersTokenizer,
    build_tokenizer,
    load_tokenizer,
)

__all__ = [
    "IGNORE",
    "Batch",
    "BatchLoader",
    "BucketedRows",
    "ByteTokenizer",
    "DataConfig",
    "Datasets",
    "Document",
    "EvalSet",
    "MissingTokenizerError",
    "PackedRows",
    "TokenStream",
    "TokenizersTokenizer",
    "build_tokenizer",
    "default_corpus_root",
    "describe",
    "encode_documents",
    "eval_batches",
    "load_datasets",
    "load_tokenizer",
    "make_rows",
    "read_documents",
    "split_documents",
    "waste",
]
