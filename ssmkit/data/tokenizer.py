"""Tokenizers: raw UTF-8 bytes (vocabulary 256 + 3 specials) or a local Hugging Face ``tokenizer.json``.

Both add the same three specials after the base vocabulary, in the order of the byte vocabulary
(:data:`BYTE_PAD`, :data:`BYTE_BOS`, :data:`BYTE_EOS`; the ``byte-small`` preset is sized for it):
``pad_id`` fills padded input positions (never scored), ``bos_id`` starts every document (the first real
token is predicted from it, so no byte goes unscored) and ``eos_id`` ends it (so a model learns where
documents stop and generation can end there). A checkpoint folder stores its tokenizer as
``ssmkit_tokenizer.json`` (plus the ``tokenizer.json`` it came from), read back by :func:`load_tokenizer`.
"""

from __future__ import annotations

import codecs
import json
import os
import shutil
from pathlib import Path

import numpy as np

from ssmkit.io import files
from ssmkit.io.files import shown
from ssmkit.io.hub import resolve_checkpoint

BYTE_PAD, BYTE_BOS, BYTE_EOS = 256, 257, 258
"""The byte vocabulary's specials, after the 256 byte values."""
BYTE_VOCAB_SIZE = 259

SPEC_FILE = "ssmkit_tokenizer.json"
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then ``pad_id = 256``, ``bos_id = 257`` and ``eos_id = 258``.

    Example::

        tok = ByteTokenizer()
        tok.encode("hé")        # [104, 195, 169]
        tok.decode([104, 195, 169, 258])  # "hé" (specials are dropped)
    """

    kind = "bytes"

    def __init__(self) -> None:
        self.pad_id = BYTE_PAD
        self.bos_id = BYTE_BOS
        self.eos_id = BYTE_EOS
        self.vocab_size = BYTE_VOCAB_SIZE

    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of ``text`` (str is UTF-8 encoded), without specials."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        return list(data)

    def encode_array(self, data: bytes) -> np.ndarray:
        """``encode`` as a uint16 array, fast for whole files."""
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; specials dropped, invalid UTF-8 replaced by U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        """A decoder that turns ids into text one at a time, holding back incomplete UTF-8 sequences."""
        return StreamDecoder(self)

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``ssmkit_tokenizer.json`` into ``folder``."""
        _write_spec(Path(folder), {"kind": self.kind})


class TokenizersTokenizer:
    """A local ``tokenizer.json`` read with the ``tokenizers`` library, plus pad/bos/eos after its vocabulary.

    Example::

        tok = TokenizersTokenizer("tokenizer.json")
        tok.decode(tok.encode("hello world"))  # "hello world"
    """

    kind = "tokenizers"

    def __init__(self, path: str | os.PathLike, *, add_specials: bool = True) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {shown(path)}")
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError("data.tokenizer needs the 'tokenizers' package: pip install 'ssmkit[tokens]'") from e
        text = files.read_text(path, "tokenizer")  # size-checked before reading
        try:
            self._tok = Tokenizer.from_str(text)
        except Exception as e:
            raise ValueError(f"{shown(path)} is not a valid tokenizers tokenizer.json: {e}") from e
        self.path = path
        base = self._tok.get_vocab_size(with_added_tokens=True)
        if add_specials:
            self.pad_id: int | None = base
            self.bos_id: int | None = base + 1
            self.eos_id: int | None = base + 2
            self.vocab_size = base + 3
        else:
            # A foreign checkpoint's own tokenizer: no ssmkit specials; end of text is its own token if any.
            self.pad_id = self.bos_id = None
            self.eos_id = next((i for name in _EOS_NAMES if (i := self._tok.token_to_id(name)) is not None), None)
            self.vocab_size = base

    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of ``text`` without specials."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, data: bytes) -> np.ndarray:
        """``encode`` as a uint32 array."""
        return np.asarray(self.encode(data), dtype=np.uint32)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; the three ssmkit specials are dropped."""
        return self._tok.decode([i for i in ids if self.pad_id is None or i < self.pad_id])

    def stream_decoder(self) -> StreamDecoder:
        """A decoder that turns ids into text one at a time."""
        return StreamDecoder(self)

    def save(self, folder: str | os.PathLike) -> None:
        """Copy ``tokenizer.json`` into ``folder`` and write ``ssmkit_tokenizer.json`` beside it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.path.resolve() != (folder / "tokenizer.json").resolve():
            shutil.copyfile(self.path, folder / "tokenizer.json")
        _write_spec(folder, {"kind": self.kind, "file": "tokenizer.json"})


Tokenizer = ByteTokenizer | TokenizersTokenizer


class StreamDecoder:
    """Incremental decoding for streaming generation: ``push(id)`` returns the new printable text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._printed = ""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one token id; return the text it completes (may be empty)."""
        if isinstance(self._tok, ByteTokenizer):
            return self._utf8.decode(bytes([token_id])) if token_id < 256 else ""
        # Subword decoders may merge or strip spaces across tokens: decode the whole tail and emit the
        # difference, holding back a trailing replacement char that is probably half a character.
        self._ids.append(token_id)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        new = text[len(self._printed):] if text.startswith(self._printed) else text
        self._printed = text
        return new

    def flush(self) -> str:
        """Text still held back at the end of the stream."""
        if isinstance(self._tok, ByteTokenizer):
            return self._utf8.decode(b"", final=True)
        text = self._tok.decode(self._ids)
        return text[len(self._printed):] if text.startswith(self._printed) else ""


def build_tokenizer(tokenizer_path: str) -> Tokenizer:
    """The tokenizer a data config asks for: bytes when ``tokenizer_path`` is empty."""
    return TokenizersTokenizer(tokenizer_path) if tokenizer_path else ByteTokenizer()


class MissingTokenizerError(FileNotFoundError):
    """A checkpoint without a tokenizer whose token ids cannot be taken for bytes."""


def load_tokenizer(folder: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                   revision: str | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint folder or Hugging Face Hub id (at ``revision``; see
    :func:`ssmkit.io.hub.resolve_checkpoint`), or ``tokenizer`` (a ``tokenizer.json``, or a folder with one)
    when given.

    ``ssmkit_tokenizer.json`` says what the folder's tokenizer is; without it a ``tokenizer.json`` (a
    transformers checkpoint, as the state-spaces models' GPT-NeoX tokenizer) is used as it is, without
    ssmkit specials. A folder with neither is a byte model only if it is an ssmkit checkpoint of the byte
    vocabulary (259 tokens); otherwise :class:`MissingTokenizerError`, since reading its ids as bytes
    would print gibberish: pass a tokenizer, or work in token ids (``ssmkit generate --ids``).

    Raises ValueError naming the file when ``ssmkit_tokenizer.json`` is unreadable or of unknown kind.
    """
    if tokenizer is not None:
        given = Path(tokenizer)
        return TokenizersTokenizer(given / "tokenizer.json" if given.is_dir() else given, add_specials=False)
    folder = resolve_checkpoint(folder, revision)
    spec_path = Path(folder) / SPEC_FILE
    if not spec_path.exists():
        foreign = Path(folder) / "tokenizer.json"
        if foreign.is_file():
            return TokenizersTokenizer(foreign, add_specials=False)
        if _is_byte_checkpoint(Path(folder)):
            return ByteTokenizer()
        raise MissingTokenizerError(
            f"{shown(folder)}: no tokenizer (tokenizer.json or {SPEC_FILE}) beside this checkpoint, so its token "
            "ids cannot be turned into text; give one (--tokenizer FILE, or load_tokenizer(..., tokenizer=FILE)), "
            "or work in token ids (ssmkit generate --ids)")
    try:
        spec = files.read_json_object(spec_path, "config")
        kind = spec["kind"]
    except files.FileTooLargeError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{shown(spec_path)}: unreadable tokenizer spec ({e})") from e
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "tokenizers":
        name = spec.get("file", "tokenizer.json")
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise ValueError(f"{shown(spec_path)}: \"file\" must name a file in the same folder, got {name!r}")
        return TokenizersTokenizer(Path(folder) / name)
    raise ValueError(f"{spec_path}: unknown tokenizer kind {kind!r} (expected 'bytes' or 'tokenizers')")


def _is_byte_checkpoint(folder: Path) -> bool:
    """An ssmkit checkpoint whose vocabulary is the byte tokenizer's (saved before tokenizer specs were)."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    data = files.read_json_object(config, "config")
    inner = data.get("config")
    return data.get("format") == "ssmkit" and isinstance(inner, dict) and inner.get("vocab_size") == BYTE_VOCAB_SIZE


def _write_spec(folder: Path, spec: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (SPEC_FILE + ".tmp")
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    os.replace(tmp, folder / SPEC_FILE)
