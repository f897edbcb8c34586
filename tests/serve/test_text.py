"""Stop strings: the text ends before the first stop string completed, streamed pieces add up to it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ssmkit.data.tokenizer import ByteTokenizer
from ssmkit.serve.text import StopTextDecoder


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
