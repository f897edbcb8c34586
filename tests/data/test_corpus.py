from pathlib import Path

import pytest

from ssmkit.data import Document, default_corpus_root, read_documents, split_documents
from ssmkit.data.corpus import SKIPPED_DIRS, find_files


def _tree(root: Path) -> None:
    (root / "pkg" / "tests").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.py").write_text("print('a')\n")
    (root / "notes.md").write_text("# notes\n")
    (root / "pkg" / "b.py").write_text("x = 1\n")
    (root / "pkg" / "tests" / "test_b.py").write_text("assert True\n")
    (root / ".hidden" / "c.py").write_text("secret\n")
    (root / "blob.bin").write_bytes(b"\x00\x01\x02" * 10)
    (root / "empty.txt").write_text("")


def test_folders_are_walked_skipping_tests_hidden_binary_and_empty(tmp_path):
    _tree(tmp_path)
    docs = read_documents([str(tmp_path)], [])
    names = sorted(Path(d.source).name for d in docs)
    assert names == ["a.py", "b.py", "notes.md"]


def test_extensions_filter_folders_but_not_named_files(tmp_path):
    _tree(tmp_path)
    docs = read_documents([str(tmp_path), str(tmp_path / "blob.bin")], [".py"])
    assert sorted(Path(d.source).name for d in docs) == ["a.py", "b.py", "blob.bin"]


def test_separator_splits_files_into_documents(tmp_path):
    f = tmp_path / "many.txt"
    f.write_text("one<|sep|>two<|sep|><|sep|>three")
    docs = read_documents([str(f)], [], separator="<|sep|>")
    assert [d.data for d in docs] == [b"one", b"two", b"three"]


def test_missing_path_and_nothing_found_raise_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_documents([str(tmp_path / "nope")], [])
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"no files ending in \.rs"):
        find_files([str(tmp_path)], [".rs"])


def test_default_corpus_is_stdlib_source_without_test_folders():
    docs = read_documents([], [])
    root = default_corpus_root()
    assert len(docs) > 300
    assert sum(len(d.data) for d in docs) > 5_000_000
    for d in docs:
        rel = Path(d.source).relative_to(root)
        assert rel.suffix == ".py"
        assert not SKIPPED_DIRS & set(rel.parts[:-1]), rel
    assert any(Path(d.source).name == "argparse.py" for d in docs)


def test_split_is_by_document_deterministic_and_stable():
    docs = [Document(f"d{i}", f"document number {i}\n".encode() * (i + 1)) for i in range(400)]
    train, val = split_documents(docs, 0.1)
    assert {d.source for d in train}.isdisjoint(d.source for d in val)
    assert sorted(d.source for d in train + val) == sorted(d.source for d in docs)
    assert 20 <= len(val) <= 60
    assert split_documents(docs, 0.1) == (train, val)
    # Adding documents does not move the existing ones between the sides.
    more = docs + [Document(f"new{i}", f"new {i}".encode()) for i in range(50)]
    train2, val2 = split_documents(more, 0.1)
    assert {d.source for d in val} <= {d.source for d in val2}
    assert {d.source for d in train} <= {d.source for d in train2}


def test_split_edge_cases():
    docs = [Document("a", b"aaaa"), Document("b", b"bbbb")]
    train, val = split_documents(docs, 0.01)
    assert len(train) == 1 and len(val) == 1
    assert split_documents(docs, 0.0) == (docs, [])
    (train,), (val,) = split_documents([Document("only", b"0123456789")], 0.2)
    assert (train.data, val.data) == (b"01234567", b"89")
