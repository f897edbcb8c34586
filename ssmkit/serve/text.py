"""Token ids to text for a completion, ending at stop strings.

A stop string may be split over several tokens, so text that could still turn out to be the start of a
stop string is held back until the next token decides it: streamed pieces never contain a stop string,
and their concatenation is exactly the non-streamed text.

This runs on the engine thread for every token, so its cost is bounded: each stop string is matched by a
Knuth-Morris-Pratt automaton fed one character at a time (amortised O(1) per character and stop string,
built in O(length) once per request), the text held back is never longer than the longest stop string,
and a subword tokenizer decodes a window of at most :data:`MAX_DECODE_WINDOW` recent tokens per token
(``StreamDecoder`` decodes the whole completion every token, quadratic in its length).
"""

from __future__ import annotations

from collections.abc import Sequence

from ssmkit.data.tokenizer import ByteTokenizer, Tokenizer

MAX_DECODE_WINDOW = 16


class WindowDecoder:
    """Token ids to text one at a time, decoding only the last few tokens (vLLM's and TGI's scheme).

    Each token decodes ``ids[prefix:]`` and ``ids[prefix:read]``, where ``read`` is where the text emitted so
    far ends and ``prefix`` where the token before it began: the difference is the new text, with the spacing
    the tokenizer derives from the preceding token. Text ending in U+FFFD (half a UTF-8 character of a
    byte-level vocabulary) is held until completed, for at most :data:`MAX_DECODE_WINDOW` tokens.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = self._read = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        complete = len(text) > len(before) and not text.endswith("\ufffd")
        if not complete and len(self._ids) - self._prefix <= MAX_DECODE_WINDOW:
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before):] if text.startswith(before) else ""

    def flush(self) -> str:
        before = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(before):] if text.startswith(before) else ""


class _StopMatcher:
    """Length of the longest prefix of ``word`` that is a suffix of the text fed so far (KMP)."""

    def __init__(self, word: str) -> None:
        self.word = word
        fail = [0] * len(word)  # fail[i]: longest proper border of word[: i + 1]
        k = 0
        for i in range(1, len(word)):
            while k and word[i] != word[k]:
                k = fail[k - 1]
            if word[i] == word[k]:
                k += 1
            fail[i] = k
        self.fail = fail
        self.matched = 0

    def feed(self, char: str) -> bool:
        """Advance by one character; True when the whole word has just been matched."""
        word, k = self.word, self.matched
        if k == len(word):
            k = self.fail[k - 1]
        while k and char != word[k]:
            k = self.fail[k - 1]
        if char == word[k]:
            k += 1
        self.matched = k
        return k == len(word)


class StopTextDecoder:
    """Feed token ids with :meth:`push`; get the text they release and whether a stop string ended it.

    The text ends before the stop string completed first (the earliest end; the longest, i.e. earliest
    starting, one on a tie), whatever the tokens' boundaries.

    Example::

        dec = StopTextDecoder(ByteTokenizer(), stop=["\\n\\n"])
        dec.push(104)   # ("h", False)
        dec.push(10)    # ("", False): may be the start of "\\n\\n"
        dec.push(10)    # ("", True): the text ends before the stop string
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self._decoder = (tokenizer.stream_decoder() if isinstance(tokenizer, ByteTokenizer)
                         else WindowDecoder(tokenizer))
        self._matchers = [_StopMatcher(s) for s in dict.fromkeys(stop) if s]
        self._held = ""
        self.stopped = False

    def push(self, token_id: int) -> tuple[str, bool]:
        """Text released by one more token, and True when a stop string has just been completed."""
        if self.stopped:
            return "", True
        return self._release(self._decoder.push(token_id))

    def flush(self) -> str:
        """The text still held back once generation has ended without a stop string."""
        if self.stopped:
            return ""
        text, _ = self._release(self._decoder.flush())
        rest, self._held = self._held, ""
        return text + rest

    def _release(self, new: str) -> tuple[str, bool]:
        if not self._matchers:
            return new, False
        held = self._held + new
        base = len(self._held)
        for i, char in enumerate(new):
            done = [m for m in self._matchers if m.feed(char)]
            if done:
                self.stopped = True
                self._held = ""
                return held[: base + i + 1 - max(len(m.word) for m in done)], True
        # Hold back the longest suffix that may still grow into a stop string (at most the longest one - 1).
        keep = max(m.matched for m in self._matchers)
        self._held = held[len(held) - keep:] if keep else ""
        return held[: len(held) - keep], False
