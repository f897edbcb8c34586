"""Request bodies of the HTTP API (pydantic models) and the JSON shape of errors.

Bodies are validated strictly: unknown fields, wrong types (``"0.5"`` for a number, ``1.0`` or ``true``
for an integer), NaN/inf and out-of-range values are rejected with a message naming the field.
Field names and meanings follow OpenAI's completions API where it has them. Every field's size is
bounded here (strings, lists, integers), and text must be valid Unicode: a lone surrogate (``"\\ud800"``,
which JSON allows) is a 400 naming the field, not a failure deep in the tokenizer.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 1024  # per stop string: text held back and matched per token is bounded by it
MAX_TEXT_CHARS = 1 << 24  # prompt / text (the body limit and --max-prompt-tokens usually bind first)
MAX_NAME_CHARS = 256
INT_LIMIT = 2**31  # integer fields other than seed (max_tokens, top_k) are below it
SEED_LIMIT = 2**62
_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_unicode(text: str) -> str:
    found = _SURROGATE.search(text)
    if found is not None:
        raise ValueError(f"contains a lone surrogate (U+{ord(found.group()):04X} at character {found.start()}); "
                         "text must be valid Unicode")
    return text


def _text(max_chars: int, min_chars: int = 0) -> Any:
    return Annotated[str, Field(min_length=min_chars, max_length=max_chars), AfterValidator(_valid_unicode)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


StopField = Annotated[
    _text(MAX_STOP_CHARS) | Annotated[list[_text(MAX_STOP_CHARS, 1)], Field(max_length=MAX_STOP_STRINGS)] | None,
    Field(description=f"a string or up to {MAX_STOP_STRINGS} strings; the text ends before the first one"),
]


class SamplingFields(_Strict):
    """Sampling fields shared by ``/v1/completions`` and ``/v1/sessions/{id}/complete``."""

    max_tokens: Annotated[int, Field(ge=0, lt=INT_LIMIT)] = 16
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0, lt=INT_LIMIT)] = 0
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] = 1.0
    stop: StopField = None
    seed: Annotated[int, Field(ge=0, lt=SEED_LIMIT)] | None = None
    stream: bool = False

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: the prompt is read after the start-of-document token."""

    model: _text(MAX_NAME_CHARS) | None = None
    prompt: _text(MAX_TEXT_CHARS)


class SessionCreateRequest(_Strict):
    """``POST /v1/sessions``: optionally read some text at once."""

    prompt: _text(MAX_TEXT_CHARS) | None = None


class SessionAppendRequest(_Strict):
    """``POST /v1/sessions/{id}/append``: text to read into the session's state."""

    text: _text(MAX_TEXT_CHARS, 1)


class SessionCompleteRequest(SamplingFields):
    """``POST /v1/sessions/{id}/complete``: read ``prompt`` (may be empty), then generate."""

    prompt: _text(MAX_TEXT_CHARS) = ""


MAX_MESSAGES = 1024
MAX_CONTENT_PARTS = 256
MAX_ROLE_CHARS = 64


class TextPart(_Strict):
    """A text part of a message's content (``{"type": "text", "text": ...}``)."""

    type: Literal["text"]
    text: _text(MAX_TEXT_CHARS)


class ChatMessage(_Strict):
    """One message of a conversation: a role and its text (a string or text parts)."""

    role: _text(MAX_ROLE_CHARS, 1)
    content: _text(MAX_TEXT_CHARS) | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: _text(MAX_NAME_CHARS) | None = None


class StreamOptions(_Strict):
    include_usage: bool = True  # accepted for OpenAI clients: usage is always on the last chunk


class ChatRequest(SamplingFields):
    """``POST /v1/chat/completions``: ``messages`` rendered with the checkpoint's chat template.

    ``max_completion_tokens`` (OpenAI's newer name) or ``max_tokens``; without either, up to the server's cap."""

    model: _text(MAX_NAME_CHARS) | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(ge=0, lt=INT_LIMIT)] | None = None  # type: ignore[assignment]
    max_completion_tokens: Annotated[int, Field(ge=0, lt=INT_LIMIT)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    stream_options: StreamOptions | None = None


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``.

    The message is made valid UTF-8 (a lone surrogate echoed from a request would make the reply unencodable)
    and cut to :data:`MAX_ERROR_CHARS`, so no request can make an error reply fail or grow.
    """
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(message) > MAX_ERROR_CHARS:
        message = message[: MAX_ERROR_CHARS - 3] + "..."
    if param is not None:
        param = param[:64].encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


MAX_ERROR_CHARS = 1000


def clip(value: object, limit: int = 64) -> str:
    """``repr(value)`` for a message, at most ``limit`` characters (surrogates and control characters escaped)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


# Fields whose type is a union: one message instead of one per member of the union.
_FIELD_HINTS = {"stop": f"must be a string or a list of 1 to {MAX_STOP_STRINGS} non-empty strings, each at most "
                        f"{MAX_STOP_CHARS} characters of valid Unicode",
                "seed": "must be an integer in [0, 2**62) or null",
                "content": f"must be a string, a list of at most {MAX_CONTENT_PARTS} text parts "
                           '({"type": "text", "text": ...}) or null'}


def describe_validation_error(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable line for pydantic/FastAPI validation errors, and the first field at fault."""
    parts, first = [], None
    for err in errors:
        kind = err.get("type")
        if kind == "json_invalid":
            where = err.get("loc", ("body", "?"))[-1]
            parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')} at "
                         f"character {where})")
            continue
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path")]
        field = ".".join(loc)[:64] or None
        first = first or (loc[0] if loc else None)
        if loc and loc[0] in _FIELD_HINTS and kind not in ("extra_forbidden", "missing", "string_unicode"):
            parts.append(f"{loc[0]} {_FIELD_HINTS[loc[0]]}")
        elif kind == "extra_forbidden":
            parts.append(f"unknown field {clip(field)}")
        elif kind == "missing":
            parts.append(f"missing field {clip(field)}" if field else "the body is empty: send a JSON object")
        elif kind == "string_unicode":  # FastAPI's JSON parsing meets a lone surrogate escape
            parts.append(f"{field or 'the body'} contains a lone surrogate; text must be valid Unicode")
        elif kind == "model_attributes_type":
            parts.append("the body must be a JSON object (and the Content-Type application/json)")
        else:
            parts.append(f"{field}: {err.get('msg')}" if field else str(err.get("msg")))
        if len(parts) > 20:  # a list of a million bad items: a few messages say enough
            break
    return "; ".join(list(dict.fromkeys(parts))[:5]), first
