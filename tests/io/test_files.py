"""Bounded reads of configs, indexes, tokenizers and run records (issue 19: every file checked before reading)."""

import json

import pytest

from ssmkit.io import files
from ssmkit.data.tokenizer import TokenizersTokenizer, load_tokenizer
from ssmkit.models import LanguageModel
from ssmkit.models.config import ModelConfig


def test_a_file_over_its_limit_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"pad": "x" * 2000}))
    monkeypatch.setenv(files.LIMIT_ENV, "1K")
    with pytest.raises(files.FileTooLargeError, match=r"config\.json: 2,01\d bytes, larger than the 1,024 bytes.*"
                                                      + files.LIMIT_ENV):
        files.read_json(path, "config")
    monkeypatch.setenv(files.LIMIT_ENV, "1M")
    assert files.read_json(path, "config")["pad"] == "x" * 2000


@pytest.mark.parametrize("content, message", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply|not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"a": ', "not valid JSON"),
    (b"[1, 2]", "expected a JSON object, got list"),
])
def test_bad_json_files_give_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "run.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        files.read_json_object(path, "record")
    assert "run.json" in str(e.value)


def test_paths_inside_the_working_directory_are_shown_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert files.shown(tmp_path / "a" / "config.json") == "a/config.json"
    assert files.shown("/elsewhere/config.json") == "/elsewhere/config.json"


def test_every_loader_checks_the_size(tmp_path, monkeypatch):
    monkeypatch.setenv(files.LIMIT_ENV, "100")
    big = json.dumps({"format": "ssmkit", "pad": "x" * 200})
    (tmp_path / "config.json").write_text(big)
    (tmp_path / "tokenizer.json").write_text(big)
    with pytest.raises(files.FileTooLargeError, match="config.json"):
        LanguageModel.from_pretrained(tmp_path)
    with pytest.raises(files.FileTooLargeError, match="config.json"):
        ModelConfig.load(tmp_path / "config.json")
    with pytest.raises(files.FileTooLargeError, match="tokenizer.json"):
        TokenizersTokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "ssmkit_tokenizer.json").write_text(big)
    with pytest.raises(files.FileTooLargeError, match="ssmkit_tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("name", ["../tokenizer.json", "/etc/passwd", "sub/tokenizer.json", "..", ""])
def test_a_tokenizer_spec_cannot_point_outside_its_folder(tmp_path, name):
    (tmp_path / "ssmkit_tokenizer.json").write_text(json.dumps({"kind": "tokenizers", "file": name}))
    with pytest.raises(ValueError, match="must name a file in the same folder"):
        load_tokenizer(tmp_path)
