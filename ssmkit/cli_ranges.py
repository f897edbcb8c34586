"""Ranges of the CLI's numeric options: every int and float option of every ``ssmkit`` command is checked
by argparse, so an out-of-range value is a usage error naming the option (``--port 70000``, ``--top-p 0``,
``--time 0``) instead of a traceback, or a silent misreading, later."""

from __future__ import annotations

import argparse
import math

# Counts and sizes beyond this are mistakes (and overflow int32 kernels and C APIs such as bind()).
MAX_CLI_INT = 2**31 - 1


class Number:
    """An argparse ``type``: a finite int or float in a range; anything else is a usage error naming the
    option (``argument --port: must be an integer from 0 to 65535, got '70000'``), not a traceback later."""

    def __init__(self, kind: type, low: float = 0, high: float | None = None, *, above: bool = False,
                 hint: str = "") -> None:
        self.kind, self.low, self.high, self.above, self.hint = kind, low, high, above, hint
        if kind is int and high is None:
            self.high = MAX_CLI_INT
        self.__name__ = "integer" if kind is int else "number"  # argparse's "invalid ... value" wording

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        low, high = (f"{v}" if self.kind is int else f"{v:g}" for v in (self.low, self.high or 0))
        if self.high is None:
            return f"{what} {'>' if self.above else '>='} {low}"
        return f"{what} > {low} and <= {high}" if self.above else f"{what} from {low} to {high}"

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        if (not math.isfinite(value) or value < self.low or (self.above and value == self.low)
                or (self.high is not None and value > self.high)):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}{self.hint}")
        return value


# Ranges of the numeric options whose valid values are not simply ">= 0" (see bound_numbers).
RANGES: dict[str, dict[str, Number]] = {
    "train": {"steps": Number(int, 1),
              "time": Number(float, 0, above=True, hint="; to train for a number of steps, give --steps N")},
    "generate": {"top_p": Number(float, 0, 1, above=True), "seed": Number(int, 0, 2**63 - 1)},
    "serve": {"port": Number(int, 0, 65535), "max_sessions": Number(int, 1),
              "max_body_mb": Number(float, 0, above=True), "max_prompt_tokens": Number(int, 1),
              "max_tokens_cap": Number(int, 1), "request_timeout": Number(float, 0, above=True),
              "max_batch": Number(int, 1), "max_requests": Number(int, 1), "threads": Number(int, 1),
              "prefill_chunk": Number(int, 1), "prefill_budget": Number(int, 1)},
}


def bound_numbers(parser: argparse.ArgumentParser, command: str = "") -> None:
    """Give every int and float option of every command a range: those of :data:`RANGES`, else finite and
    ``>= 0`` (ints at most :data:`MAX_CLI_INT`); options whose default is negative keep their sign."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                bound_numbers(sub, command or name)
        elif action.type in (int, float):
            default = action.default if isinstance(action.default, (int, float)) else 0
            low = min(0, default)
            action.type = RANGES.get(command, {}).get(action.dest) or Number(action.type, low)
