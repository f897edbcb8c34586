"""Settings of the data pipeline: which files, how they are cut into training rows."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class DataConfig:
    """Where the text comes from and how it becomes ``(input_ids, targets, seq_idx)`` rows.

    Example::

        DataConfig(paths=["notes/"], extensions=[".md"], seq_len=1024, batching="pack")
    """

    paths: list[str] = field(default_factory=list)
    """Files or folders to train on; empty = the running Python's standard-library source (no tests)."""

    extensions: list[str] = field(default_factory=list)
    """Inside folders keep only files ending in one of these (e.g. .py .md); empty = every text file."""

    separator: str = ""
    """Split each file into several documents at this string (e.g. '<|endoftext|>'); empty = one per file."""

    tokenizer: str = ""
    """Path to a tokenizer.json (Hugging Face tokenizers) for a token model; empty = raw bytes."""

    seq_len: int = 256
    """Tokens per training row."""

    batching: str = "pack"
    """'pack': documents packed end to end into full rows, with seq_idx so state restarts at each
    document; 'bucket': one document (piece) per row, rows of similar length batched and padded."""

    val_fraction: float = 0.05
    """Share of documents (by content hash, so stable when files are added) kept for validation."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if self.batching not in ("pack", "bucket"):
            raise ValueError(f"data.batching must be 'pack' or 'bucket', got {self.batching!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
