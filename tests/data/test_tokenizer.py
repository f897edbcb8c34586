import json

import pytest

from ssmkit.data import ByteTokenizer, TokenizersTokenizer, load_tokenizer
from ssmkit.data.tokenizer import MissingTokenizerError
from ssmkit.models.presets import BYTE_BOS, BYTE_EOS, BYTE_PAD, BYTE_VOCAB_SIZE


def _word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "state": 3, "space": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def test_byte_tokenizer_matches_the_byte_preset_and_round_trips():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (BYTE_PAD, BYTE_BOS, BYTE_EOS, BYTE_VOCAB_SIZE)
    text = "state space — ok ✓"
    ids = tok.encode(text)
    assert ids == list(text.encode())
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
    assert tok.encode_array(text.encode()).tolist() == ids


def test_stream_decoder_holds_back_partial_utf8():
    tok = ByteTokenizer()
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in "é✓".encode()]
    assert pieces == ["", "é", "", "", "✓"]
    assert dec.push(tok.eos_id) == "" and dec.flush() == ""


def test_tokenizers_file_gets_specials_after_its_vocabulary(tmp_path):
    tok = TokenizersTokenizer(_word_tokenizer(tmp_path / "tokenizer.json"))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (5, 6, 7, 8)
    ids = tok.encode("hello state space")
    assert ids == [1, 3, 4]
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == "hello state space"
    dec = tok.stream_decoder()
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "hello state space"


def test_save_and_load_round_trip(tmp_path):
    src = _word_tokenizer(tmp_path / "src.json")
    folder = tmp_path / "ckpt"
    TokenizersTokenizer(src).save(folder)
    loaded = load_tokenizer(folder)
    assert isinstance(loaded, TokenizersTokenizer) and loaded.eos_id == 7
    ByteTokenizer().save(tmp_path / "bytes")
    assert isinstance(load_tokenizer(tmp_path / "bytes"), ByteTokenizer)
    # No tokenizer file: an error (issue 27), not bytes, unless the folder is an ssmkit byte-vocabulary model.
    (tmp_path / "nothing_here").mkdir()
    with pytest.raises(MissingTokenizerError, match="no tokenizer"):
        load_tokenizer(tmp_path / "nothing_here")


def test_foreign_tokenizer_json_is_used_without_ssmkit_specials(tmp_path):
    _word_tokenizer(tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id is None and tok.pad_id is None and tok.vocab_size == 5


def test_bad_files_raise_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        TokenizersTokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        TokenizersTokenizer(bad)
    (tmp_path / "ssmkit_tokenizer.json").write_text(json.dumps({"kind": "sentencepiece"}))
    with pytest.raises(ValueError, match="unknown tokenizer kind 'sentencepiece'"):
        load_tokenizer(tmp_path)
