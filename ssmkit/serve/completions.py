"""Completions on top of the engine: tokens to text and OpenAI-style chunks, sessions read and advanced.

A session completion holds the session's lock from start to end; the session's new state (prompt and
generated tokens read, the last one pending) is committed only when the generation finishes normally, so a
cancelled or failed request leaves the session as it was.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from ssmkit.data.tokenizer import Tokenizer
from ssmkit.generation.sampling import SamplingParams
from ssmkit.models.cache import ModelCache
from ssmkit.serve.batching import Engine, EngineBusy, EngineStopped
from ssmkit.serve.request import GenerationRequest
from ssmkit.serve.options import ServeOptions
from ssmkit.serve.prefix_cache import BLOCK_TOKENS, PrefixCache, PrefixPlan
from ssmkit.serve.prefix_disk import DiskTier
from ssmkit.serve.schemas import SamplingFields, error_body
from ssmkit.serve.sessions import (
    Session,
    SessionDiskFull,
    SessionNotFound,
    SessionStateError,
    SessionStore,
)
from ssmkit.serve.text import StopTextDecoder

if TYPE_CHECKING:
    from ssmkit.models.language_model import LanguageModel
    from ssmkit.serve.chat_template import ChatTemplate


log = logging.getLogger("ssmkit.serve")

# Text longer than this is tokenized on a worker thread, not on the event loop (which must stay responsive).
_ENCODE_INLINE_CHARS = 4096
_LEADER_POLL_S = 0.02  # how often a prompt waiting for another one's reading looks again


def internal_error(exc: BaseException) -> str:
    """Log ``exc`` with its traceback under a new id; the message for the client names only the id."""
    incident = secrets.token_hex(4)
    log.error("internal error %s", incident, exc_info=(type(exc), exc, exc.__traceback__))
    return f"internal server error (logged as {incident})"


class ApiError(HTTPException):
    """An error answered as OpenAI's error JSON with this status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(status, message)
        self.kind, self.param, self.code = kind, param, code


class _Completion:
    """One engine request seen from the event loop: tokens and text arrive on an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple] = asyncio.Queue()
        self.decoder = StopTextDecoder(tokenizer, stop)

    def on_token(self, token: int) -> bool:
        text, stopped = self.decoder.push(token)
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ("token", token, text))
        return stopped

    def on_done(self, reason: str, cache: ModelCache | None) -> None:
        tail = self.decoder.flush() if reason in ("stop", "length") else ""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ("done", reason, tail, cache))


class Server:
    """Model, tokenizer, engine and sessions behind the routes."""

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer, store: SessionStore,
                 options: ServeOptions, chat_template: ChatTemplate | None = None) -> None:
        self.model, self.tokenizer, self.store, self.options = model, tokenizer, store, options
        self.chat_template = chat_template
        self.engine = Engine(model, max_batch=options.max_batch, max_requests=options.max_requests,
                             prefill_chunk_size=options.prefill_chunk_size, prefill_budget=options.prefill_budget,
                             cuda_graph=options.cuda_graph)
        self.eos_ids = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
        self.created = int(time.time())
        self.prefix: PrefixCache | None = None
        if options.prefix_cache:
            disk = (DiskTier(store.folder / "prefix-cache", options.prefix_cache_disk_bytes, model, BLOCK_TOKENS)
                    if options.prefix_cache_disk_bytes > 0 else None)
            self.prefix = PrefixCache(model, memory_budget=options.prefix_cache_bytes,
                                      interval=options.prefix_cache_interval, disk=disk)

    async def encode(self, text: str, field: str) -> list[int]:
        ids = (self.tokenizer.encode(text) if len(text) <= _ENCODE_INLINE_CHARS
               else await anyio.to_thread.run_sync(self.tokenizer.encode, text))
        if len(ids) > self.options.max_prompt_tokens:
            raise ApiError(400, f"{field} has {len(ids)} tokens; this server reads at most "
                           f"{self.options.max_prompt_tokens} per request", param=field, code="prompt_too_long")
        return ids

    def check_sampling(self, body: SamplingFields) -> SamplingParams:
        if body.max_tokens > self.options.max_tokens_cap:
            raise ApiError(400, f"max_tokens is {body.max_tokens}; this server allows at most "
                           f"{self.options.max_tokens_cap}", param="max_tokens")
        return SamplingParams(body.temperature, body.top_k, body.top_p, body.min_p, body.repetition_penalty)

    def deadline(self) -> float:
        """The monotonic time by which a request starting now must be done (``--request-timeout``)."""
        return time.monotonic() + self.options.request_timeout_s

    async def lock(self, session: Session, deadline: float | None = None) -> None:
        wait = self.options.request_timeout_s if deadline is None else max(deadline - time.monotonic(), 0)
        try:
            await asyncio.wait_for(session.lock.acquire(), wait)
        except TimeoutError:
            raise ApiError(409, f"session {session.id} stayed busy with another request", code="session_busy") from None
        if self.store.get_or_none(session.id) is not session:
            # Deleted while this request waited for it.
            session.lock.release()
            raise SessionNotFound(session.id)

    async def run(self, ids: list[int], body: SamplingFields, params: SamplingParams, deadline: float, *,
                  cache: ModelCache | None = None, keep_state: bool = False) -> AsyncIterator[tuple]:
        """Submit a request and yield its events: ("token", id, text) ..., then ("done", reason, tail, cache).

        ``deadline`` covers the whole request (waiting for a session, reading, generating), not each token."""
        completion = _Completion(asyncio.get_running_loop(), self.tokenizer, body.stop_strings())
        seed = body.seed if body.seed is not None else secrets.randbits(62)
        # From the zero state, the prompt may resume from a snapshot of its longest cached prefix.
        plan = None if cache is not None or self.prefix is None else await self._plan(ids, deadline)
        request = GenerationRequest(ids=ids, max_new_tokens=body.max_tokens, params=params, seed=seed,
                                    on_token=completion.on_token, on_done=completion.on_done,
                                    eos_ids=self.eos_ids, cache=cache, keep_state=keep_state, prefix=plan)
        try:
            self.engine.submit(request)
        except (EngineBusy, EngineStopped) as e:
            if plan is not None:
                plan.release()  # prompts waiting for this one must not wait in vain
            raise ApiError(503, str(e), "server_error", code="overloaded" if isinstance(e, EngineBusy) else None) from None
        try:
            while True:
                try:
                    event = await asyncio.wait_for(completion.queue.get(), max(deadline - time.monotonic(), 0))
                except TimeoutError:
                    raise ApiError(504, f"the request took longer than {self.options.request_timeout_s} s",
                                   "server_error", code="timeout") from None
                if event[0] == "done" and event[1].startswith("error"):
                    # The engine logged the cause with its traceback; the client learns no internals.
                    raise ApiError(500, "generation failed (the server log has the cause)", "server_error",
                                   code="generation_failed")
                yield event
                if event[0] == "done":
                    return
        finally:
            request.cancel()

    async def _plan(self, ids: list[int], deadline: float) -> PrefixPlan:
        """The prefix-cache plan of a prompt read from the zero state. A prompt that a prompt being read now
        takes further waits (polling, at most until ``deadline``) for that one to finish reading, then
        resumes from its snapshots instead of reading the same document beside it."""
        prefix = self.prefix
        assert prefix is not None
        # A short prompt is planned on the event loop (a few hashes and at most a copy of a state in memory):
        # a worker thread per request would let a burst of requests reach the engine one by one instead of
        # together (whose prefill is batched). Long prompts and snapshots that may come from disk: a thread.
        inline = len(ids) <= _ENCODE_INLINE_CHARS and prefix.disk is None

        async def plan_for(may_wait: bool) -> PrefixPlan:
            return prefix.plan(ids, may_wait) if inline else await anyio.to_thread.run_sync(prefix.plan, ids, may_wait)

        plan = await plan_for(True)
        while plan.leader is not None and time.monotonic() < deadline:
            while not plan.leader_done() and time.monotonic() < deadline:
                await asyncio.sleep(_LEADER_POLL_S)
            plan = await plan_for(time.monotonic() < deadline)
        if plan.leader is not None:  # out of time: read it all, the deadline will say the rest
            plan = await plan_for(False)
        return plan

    async def complete(self, body: SamplingFields, prompt_ids: list[int],
                       session: Session | None = None) -> AsyncIterator[dict[str, Any]]:
        """OpenAI completion chunks (the last carries finish_reason and usage); a session goes on afterwards."""
        params = self.check_sampling(body)
        deadline = self.deadline()
        cid = "cmpl-" + secrets.token_hex(12)
        cache, ids = None, prompt_ids
        if session is not None:
            await self.lock(session, deadline)
        try:
            if session is not None:
                ids = ([] if session.pending is None else [session.pending]) + prompt_ids
                if not ids:
                    raise ApiError(400, "the session is empty: give a prompt or append text first", param="prompt")
                cache = await self._session_cache(session)
            if not ids:
                raise ApiError(400, "the prompt is empty and this model's tokenizer has no start token",
                               param="prompt")
            if session is not None and body.max_tokens == 0:
                await self._read_into(session, cache, ids, deadline)
                yield self._chunk(cid, "", [], "length", len(ids), 0, session)
                return
            tokens: list[int] = []
            async for event in self.run(ids, body, params, deadline, cache=cache, keep_state=session is not None):
                if event[0] == "token":
                    tokens.append(event[1])
                    yield self._chunk(cid, event[2], [event[1]], None)
                    continue
                _, reason, tail, final = event
                if session is not None and final is not None:
                    await self.store.commit(session, final, tokens[-1] if tokens else None)
                yield self._chunk(cid, tail, [], reason, len(ids), len(tokens), session)
        finally:
            if session is not None:
                session.lock.release()

    async def _session_cache(self, session: Session) -> ModelCache | None:
        """A copy of the session's state to read on; None for a session that has read nothing (the zero state),
        so that its reading goes through the prefix cache."""
        if self.prefix is not None and session.tokens_read == 0:
            return None
        return (await self.store.state(session)).clone()

    async def _read_into(self, session: Session, cache: ModelCache | None, ids: list[int], deadline: float) -> None:
        """Feed all of ``ids`` but the last into ``cache`` (None: the zero state) and commit it, the last one
        pending."""
        if len(ids) > 1:
            body = SamplingFields(max_tokens=0, temperature=0)
            async for event in self.run(ids[:-1], body, SamplingParams(temperature=0), deadline, cache=cache,
                                        keep_state=True):
                cache = event[3]
        if cache is None:
            cache = (await self.store.state(session)).clone()
        await self.store.commit(session, cache, ids[-1])

    async def append(self, session: Session, ids: list[int]) -> None:
        """Read ``ids`` (already length-checked by :meth:`encode`) into the session's state."""
        deadline = self.deadline()
        await self.lock(session, deadline)
        try:
            pending = [] if session.pending is None else [session.pending]
            await self._read_into(session, await self._session_cache(session), pending + ids, deadline)
        finally:
            session.lock.release()

    def _chunk(self, cid: str, text: str, token_ids: list[int], finish: str | None, prompt_tokens: int = 0,
               completion_tokens: int = 0, session: Session | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": cid, "object": "text_completion", "created": int(time.time()), "model": self.options.model_name,
            "choices": [{"index": 0, "text": text, "token_ids": token_ids, "logprobs": None,
                         "finish_reason": finish}],
        }
        if finish is not None:
            chunk["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}
            if session is not None:
                chunk["session"] = session.info()
        return chunk

    async def respond(self, body: SamplingFields, prompt_ids: list[int], session: Session | None = None) -> Any:
        """A JSON completion, or server-sent events when ``body.stream``."""
        chunks = self.complete(body, prompt_ids, session)
        if not body.stream:
            parts = [c async for c in chunks]
            merged = parts[-1]
            merged["choices"][0]["text"] = "".join(c["choices"][0]["text"] for c in parts)
            merged["choices"][0]["token_ids"] = [t for c in parts for t in c["choices"][0]["token_ids"]]
            return merged
        return await self.stream(chunks)

    async def stream(self, chunks: AsyncIterator[dict[str, Any]]) -> Any:
        """Server-sent events of ``chunks``, then ``[DONE]``; an error after the first chunk is an error event."""
        # The first chunk is awaited here, so that errors before it (busy, timeout) keep their status code.
        first = await chunks.__anext__()

        async def events() -> AsyncIterator[dict[str, str]]:
            try:
                yield {"data": json.dumps(first)}
                async for chunk in chunks:
                    yield {"data": json.dumps(chunk)}
            except ApiError as e:
                yield {"data": json.dumps(error_body(e.detail, e.kind, e.param, e.code))}
            except (SessionDiskFull, SessionStateError) as e:  # the session's new state could not be saved
                log.error("%s", getattr(e, "detail", e))
                yield {"data": json.dumps(error_body(str(e), "server_error", code=e.code))}
            except Exception as e:  # noqa: BLE001 (a bug: the client still learns that the stream failed)
                yield {"data": json.dumps(error_body(internal_error(e), "server_error"))}
            finally:
                await chunks.aclose()
            yield {"data": "[DONE]"}

        return EventSourceResponse(events(), sep="\n", ping=15)
