"""Documents from files and folders, the default standard-library corpus, and the split by document.

A document is one file (or one piece of a file when a separator is given). The train/validation split is
decided per document from a hash of its content, so a document is never in both sets, identical files land
on the same side, and adding files does not move the others.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Folder names left out of every walk: the standard library's own test suites (the default corpus is
# meant to be library code) and caches or installed third-party packages.
SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"})


@dataclass(frozen=True)
class Document:
    """One document: where it came from and its raw bytes."""

    source: str
    data: bytes


def default_corpus_root() -> Path:
    """The running interpreter's standard-library source folder (always present, no download)."""
    return Path(sysconfig.get_paths()["stdlib"])


def find_files(paths: list[str], extensions: list[str]) -> list[Path]:
    """Files named by ``paths`` (files as given, folders walked), sorted, hidden entries skipped.

    ``extensions`` filters files found inside folders (files named directly are always kept).
    Raises FileNotFoundError naming a path that does not exist, and ValueError when nothing is found.
    """
    found: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(_walk(path, extensions))
        else:
            raise FileNotFoundError(f"data path not found: {p}")
    if not found:
        what = f" ending in {' '.join(extensions)}" if extensions else ""
        raise ValueError(f"no files{what} found under {' '.join(paths)}")
    return found


def _walk(root: Path, extensions: list[str]) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or (extensions and not name.endswith(tuple(extensions))):
                continue
            files.append(Path(dirpath) / name)
    return files


def read_documents(paths: list[str], extensions: list[str], separator: str = "") -> list[Document]:
    """Documents of ``paths``; empty ``paths`` = the standard-library ``.py`` files (tests left out).

    Empty files and, inside folders, binary files (a NUL byte in the first 8 KiB) are skipped.
    """
    if not paths:
        paths, extensions = [str(default_corpus_root())], [".py"]
    named = {Path(p).expanduser() for p in paths}
    docs = []
    for f in find_files(paths, extensions):
        try:
            data = f.read_bytes()
        except OSError as e:
            raise OSError(f"cannot read data file {f}: {e}") from e
        if not data or (f not in named and b"\0" in data[:8192]):
            continue
        pieces = data.split(separator.encode()) if separator else [data]
        docs.extend(Document(str(f), piece) for piece in pieces if piece)
    if not docs:
        raise ValueError(f"no text documents found under {' '.join(paths)} (only empty or binary files)")
    return docs


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, validation) by a hash of each document's content.

    With ``val_fraction > 0`` validation gets at least one document; a corpus of a single document is
    cut in two at ``1 - val_fraction`` of its length (there is nothing else to hold out).
    """
    if val_fraction == 0:
        return list(docs), []
    if len(docs) == 1:
        doc = docs[0]
        cut = max(1, min(len(doc.data) - 1, round(len(doc.data) * (1 - val_fraction))))
        if len(doc.data) < 2:
            raise ValueError(f"{doc.source}: a one-byte corpus cannot be split into train and validation")
        return [Document(doc.source, doc.data[:cut])], [Document(doc.source + " (tail)", doc.data[cut:])]
    keys = [content_hash(d.data) for d in docs]
    train = [d for d, k in zip(docs, keys) if k >= val_fraction]
    val = [d for d, k in zip(docs, keys) if k < val_fraction]
    if not val:
        smallest = min(range(len(docs)), key=keys.__getitem__)
        val = [docs[smallest]]
        train = [d for i, d in enumerate(docs) if i != smallest]
    if not train:
        raise ValueError(f"data.val_fraction={val_fraction} leaves no training documents")
    return train, val


def content_hash(data: bytes) -> float:
    """A number in [0, 1) fixed by the content."""
    return int.from_bytes(hashlib.sha1(data).digest()[:8], "big") / 2.0**64
