"""Stop strings: the text ends before the first stop string completed, streamed pieces add up to it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.data.tokenizer import ByteTokenizer
from ssmkit.serve.text import MAX_DECODE_WINDOW, StopTextDecoder, WindowDecoder


def run(text: str, stop: list[str]) -> tuple[list[str], bool]:
    dec = StopTextDecoder(ByteTokenizer(), stop)
    pieces, stopped = [], False
    for b in text.encode():
        piece, stopped = dec.push(b)
        pieces.append(piece)
        if stopped:
            break
    pieces.append(dec.flush())
    return pieces, stopped


def expected(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut at the stop string that is completed first (the earliest end; the earliest start on a tie)."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stop if s and text[:end].endswith(s)]
        if starts:
            return text[: min(starts)], True
    return text, False


def test_examples():
    assert run("hello\n\nworld", ["\n\n"]) == (["h", "e", "l", "l", "o", "", "", ""], True)
    assert "".join(run("say STOP now", ["STOP"])[0]) == "say "
    # A partial match is released as soon as it stops matching.
    pieces, stopped = run("abxab", ["abc"])
    assert pieces == ["", "", "abx", "", "", "ab"] and not stopped
    # Multi-byte characters are held until complete, then released.
    assert run("é!", []) == (["", "é", "!", ""], False)


@given(st.text(alphabet="abc", max_size=30), st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=4))
def test_streamed_text_is_the_text_cut_at_the_first_completed_stop(text, stop):
    pieces, stopped = run(text, stop)
    assert ("".join(pieces), stopped) == expected(text, stop)
    for s in stop:
        assert all(s not in p for p in pieces)


def test_matching_cost_is_linear_in_the_text():
    """Issue 19, item 1: matching used to cost O(len(stop)**2) per token on the engine thread. The longest
    allowed stop strings, built against naive matching, over 30,000 generated characters take well under a
    second (the quadratic matcher needed minutes)."""
    import time

    from ssmkit.serve.schemas import MAX_STOP_CHARS

    stop = ["a" * (MAX_STOP_CHARS - 1) + c for c in "bcde"]
    dec = StopTextDecoder(ByteTokenizer(), stop)
    start = time.process_time()
    released = "".join(dec.push(ord("a"))[0] for _ in range(30_000))
    assert time.process_time() - start < 3
    assert len(released) == 30_000 - (MAX_STOP_CHARS - 1)  # exactly the text that can no longer match
    assert dec.push(ord("b")) == ("", True)  # the held-back run of "a"s was the start of the first stop string


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A small byte-level BPE (GPT-2 style: half characters decode to U+FFFD), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ssmkit.data.tokenizer import TokenizersTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["state space models read text", "héllo wörld ✓ ok", "the state of the art"] * 5, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return TokenizersTokenizer(path)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abc éö✓🙂\n", max_size=60))
def test_window_decoding_equals_decoding_everything(bpe, text):
    ids = bpe.encode(text)
    dec = WindowDecoder(bpe)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == bpe.decode(ids) == text


def test_window_decoding_cost_does_not_grow_with_the_completion(bpe):
    """Every token decodes at most MAX_DECODE_WINDOW + 1 tokens, however long the completion."""
    sizes = []
    real = bpe.decode
    bpe.decode = lambda ids: sizes.append(len(ids)) or real(ids)
    try:
        dec = WindowDecoder(bpe)
        for i in bpe.encode("state space " * 300) + [bpe.pad_id] * 100:  # pads decode to nothing
            dec.push(i)
    finally:
        del bpe.decode
    assert max(sizes) <= MAX_DECODE_WINDOW + 1


def test_stop_strings_with_a_subword_tokenizer(bpe):
    dec = StopTextDecoder(bpe, ["wörld"])
    out, stopped = "", False
    for i in bpe.encode("héllo wörld ✓"):
        piece, stopped = dec.push(i)
        out += piece
        if stopped:
            break
    assert (out, stopped) == ("héllo ", True)
