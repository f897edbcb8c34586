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

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio.to_thread

from ssmkit.serve.chat_template import ChatTemplate
from ssmkit.serve.completions import ApiError, Server
from ssmkit.serve.schemas import ChatRequest, clip


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
