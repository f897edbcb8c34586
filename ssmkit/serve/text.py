"""Token ids to text for a completion, ending at stop strings.

A stop string may be split over several tokens, so text that could still turn out to be the start of a
stop string is held back until the next token decides it: streamed pieces never contain a stop string,
and their concatenation is exactly the non-streamed text.
"""

from __future__ import annotations

from collections.abc import Sequence

from ssmkit.data.tokenizer import Tokenizer


class StopTextDecoder:
    """Feed token ids with :meth:`push`; get the text they release and whether a stop string ended it.

    Example::

        dec = StopTextDecoder(ByteTokenizer(), stop=["\\n\\n"])
        dec.push(104)   # ("h", False)
        dec.push(10)    # ("", False): may be the start of "\\n\\n"
        dec.push(10)    # ("", True): the text ends before the stop string
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self._decoder = tokenizer.stream_decoder()
        self._stop = [s for s in stop if s]
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
        held = self._held + new
        hits = [i for i in (held.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return held[: min(hits)], True
        keep = max((k for s in self._stop for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
        self._held = held[len(held) - keep:] if keep else ""
        return held[: len(held) - keep], False
