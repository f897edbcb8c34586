"""``POST /v1/chat/completions``: OpenAI's chat shape on top of completions, for checkpoints with a chat template.

The template is the checkpoint's own (``chat_template.jinja``, or ``chat_template`` in
``tokenizer_config.json``, as transformers saves them), rendered as transformers'
``apply_chat_template(..., add_generation_prompt=True)`` renders it: Jinja2 with ``trim_blocks`` and
``lstrip_blocks``, the variables ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, and
``raise_exception``/``strftime_now``. It runs in Jinja2's **immutable sandbox** (no attribute access to
Python internals, no mutation of the messages, ranges bounded), since a checkpoint is not code to trust.
The rendered text is tokenized by the checkpoint's tokenizer (special tokens written in the text, such as
``<|im_start|>``, become their ids); the start-of-document token is put first if the tokenizer has one and
the template did not. A template error (``raise_exception("roles must alternate")``) is a 400 naming it.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from ssmkit.serve.schemas import ChatRequest, clip

if TYPE_CHECKING:
    from ssmkit.serve.completions import Server

log = logging.getLogger("ssmkit.serve")

MAX_TEMPLATE_BYTES = 1 << 20


class ChatTemplate:
    """A compiled chat template and the special-token strings it may use."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.policies["json.dumps_kwargs"] = {"ensure_ascii": False, "sort_keys": False}
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt for ``messages`` with the assistant's turn opened. Raises ValueError for a template error."""
        from jinja2 import TemplateError
        from jinja2.exceptions import SecurityError

        try:
            return self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                        eos_token=self.eos_token)
        except (TemplateError, SecurityError) as e:
            raise ValueError(str(e) or type(e).__name__) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError) as e:
            raise ValueError(f"the chat template failed on these messages ({type(e).__name__})") from None


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def load_chat_template(folder: Path) -> ChatTemplate | None:
    """The checkpoint's chat template, or None if it has none (a broken one is logged and ignored)."""
    config: dict[str, Any] = {}
    path = folder / "tokenizer_config.json"
    source = None
    try:
        if path.is_file() and path.stat().st_size <= 16 * MAX_TEMPLATE_BYTES:
            loaded = json.loads(path.read_text())
            config = loaded if isinstance(loaded, dict) else {}
        jinja = folder / "chat_template.jinja"
        if jinja.is_file() and jinja.stat().st_size <= MAX_TEMPLATE_BYTES:
            source = jinja.read_text()
    except (OSError, ValueError, UnicodeDecodeError) as e:
        log.warning("chat template: %s cannot be read (%s); /v1/chat/completions is off", path.name, type(e).__name__)
        return None
    if source is None:
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        source = template if isinstance(template, str) and len(template) <= MAX_TEMPLATE_BYTES else None
    if source is None:
        return None
    try:
        return ChatTemplate(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))
    except Exception as e:  # noqa: BLE001 (a template that does not compile: serve without chat)
        log.warning("chat template does not compile (%s); /v1/chat/completions is off", clip(str(e), 200))
        return None


def _messages(body: ChatRequest) -> list[dict[str, Any]]:
    """Messages as templates expect them: content as one string (text parts joined)."""
    out = []
    for m in body.messages:
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
        message: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return out


async def prompt_ids(server: Server, template: ChatTemplate, body: ChatRequest) -> list[int]:
    """Token ids of the rendered conversation (length-checked like every prompt)."""
    from ssmkit.serve.completions import ApiError

    try:
        text = await anyio.to_thread.run_sync(template.render, _messages(body))
    except ValueError as e:
        raise ApiError(400, f"the chat template refused these messages: {clip(str(e), 300)}", param="messages",
                       code="chat_template_error") from None
    ids = await server.encode(text, "messages")
    bos = server.tokenizer.bos_id
    return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]


async def chat_chunks(server: Server, body: ChatRequest, ids: list[int]) -> AsyncIterator[dict[str, Any]]:
    """``chat.completion.chunk`` objects: the role, then content deltas, then one with finish_reason and usage."""
    cid = "chatcmpl-" + secrets.token_hex(12)
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": server.options.model_name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    first = True
    async for part in server.complete(body, ids):
        choice = part["choices"][0]
        if first:
            yield chunk({"role": "assistant", "content": ""}, None)
            first = False
        if choice["finish_reason"] is None:
            if choice["text"]:
                yield chunk({"content": choice["text"]}, None)
            continue
        if choice["text"]:
            yield chunk({"content": choice["text"]}, None)
        last = chunk({}, choice["finish_reason"])
        last["usage"] = part["usage"]
        yield last


async def chat_response(server: Server, body: ChatRequest, ids: list[int]) -> Any:
    """One ``chat.completion`` object, or its chunks as server-sent events when ``body.stream``."""
    chunks = chat_chunks(server, body, ids)
    if body.stream:
        return await server.stream(chunks)
    parts = [c async for c in chunks]
    last = parts[-1]
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in parts)
    return {"id": last["id"], "object": "chat.completion", "created": last["created"], "model": last["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": last["choices"][0]["finish_reason"]}],
            "usage": last["usage"]}
