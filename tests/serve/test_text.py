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
