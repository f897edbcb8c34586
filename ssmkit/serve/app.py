"""The HTTP API (FastAPI on uvicorn): OpenAI-style completions and stateful sessions.

Routes::

    GET  /health                         liveness, requests in flight, session memory, prefix cache (no auth)
    GET  /metrics                        the same counters in Prometheus' text format
    GET  /v1/models                      the served model
    POST /v1/completions                 {"prompt", "max_tokens", "temperature", ..., "stream"}
    POST /v1/chat/completions            {"messages", ...}: checkpoints with a chat template
    POST /v1/sessions                    new session (optionally reading "prompt")
    GET  /v1/sessions?limit=&after=      a page of sessions (id order; has_more, last_id for the next page)
    GET  /v1/sessions/ID                 tokens seen and state bytes of a session
    POST /v1/sessions/ID/append          {"text"}: read text into the state, no generation
    POST /v1/sessions/ID/complete        as /v1/completions (without "model"); the session goes on after it
    POST /v1/sessions/ID/fork            copy of the session
    DELETE /v1/sessions/ID

Every error is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for bad requests, 503
when busy, 507 when the session disk quota or the disk is full; a 500 never carries the exception's text or
a path (it is logged, with an id the reply gives).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from ssmkit.data.tokenizer import Tokenizer
from ssmkit.serve.chat import chat_response, prompt_ids
from ssmkit.serve.completions import ApiError, Server, internal_error
from ssmkit.serve.guard import RequestGuard
from ssmkit.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ssmkit.serve.metrics import render as render_metrics
from ssmkit.serve.options import ServeOptions
from ssmkit.serve.schemas import (
    MAX_NAME_CHARS,
    ChatRequest,
    CompletionRequest,
    SessionAppendRequest,
    SessionCompleteRequest,
    SessionCreateRequest,
    clip,
    describe_validation_error,
    error_body,
)
from ssmkit.serve.sessions import (
    SessionDiskFull,
    SessionLimit,
    SessionNotFound,
    SessionStateError,
    SessionStore,
)

if TYPE_CHECKING:
    from ssmkit.models.language_model import LanguageModel
    from ssmkit.serve.chat_template import ChatTemplate

log = logging.getLogger("ssmkit.serve")

MAX_PAGE = 1000  # sessions per GET /v1/sessions reply


def create_app(model: LanguageModel, tokenizer: Tokenizer, store: SessionStore, options: ServeOptions,
               chat_template: ChatTemplate | None = None) -> Any:
    """The ASGI application (FastAPI wrapped in :class:`RequestGuard`); the engine runs during its lifespan.

    Requests under way are limited to ``max_requests`` + 64: those beyond the engine's limit that do not
    need it (sessions listed, forked, deleted) still get through, and no more queue for it.
    """
    server = Server(model, tokenizer, store, options, chat_template)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        yield
        server.engine.stop()
        if server.prefix is not None:
            server.prefix.close()

    app = FastAPI(title="ssmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    _install_error_handlers(app)
    _add_routes(app, server)
    return RequestGuard(app, options, max_active=options.max_requests + 64)


def _add_routes(app: FastAPI, server: Server) -> None:
    store = server.store

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = server.engine.alive
        body = {"status": "ok" if alive else "engine stopped", "requests_in_flight": server.engine.in_flight,
                "decode_steps": server.engine.steps, "tokens_generated": server.engine.tokens,
                "decode_rows": server.engine.decoder.rows, "decode_padded_rows": server.engine.decoder.padded_rows,
                "cuda_graph": server.engine.cuda_graph, **store.stats(),
                "prefix_cache": None if server.prefix is None else server.prefix.stats()}
        return JSONResponse(body, 200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(render_metrics(server), headers={"Content-Type": METRICS_CONTENT_TYPE})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": server.options.model_name, "object": "model", "created": server.created,
                "owned_by": "ssmkit", "vocab_size": server.model.config.vocab_size,
                "state_bytes_per_session": server.model.cache_nbytes(1)}
        return {"object": "list", "data": [card]}

    def check_model(name: str | None) -> None:
        if name is not None and name != server.options.model_name:
            raise ApiError(404, f"model {clip(name)} does not exist; this server serves "
                           f"{server.options.model_name!r}", param="model", code="model_not_found")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        check_model(body.model)
        bos = [] if server.tokenizer.bos_id is None else [server.tokenizer.bos_id]
        return await server.respond(body, bos + await server.encode(body.prompt, "prompt"))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest) -> Any:
        check_model(body.model)
        if server.chat_template is None:
            raise ApiError(400, "this model has no chat template (chat_template in its tokenizer_config.json); "
                           "use /v1/completions", param="messages", code="no_chat_template")
        ids = await prompt_ids(server, server.chat_template, body)
        cap = server.options.max_tokens_cap
        body.max_tokens = next((n for n in (body.max_completion_tokens, body.max_tokens) if n is not None), cap)
        return await chat_response(server, body, ids)

    @app.post("/v1/sessions")
    async def create_session(body: SessionCreateRequest | None = None) -> dict[str, Any]:
        ids = await server.encode(body.prompt, "prompt") if body is not None and body.prompt else []
        session = await store.create(server.tokenizer.bos_id)
        if ids:
            try:
                await server.append(session, ids)
            except BaseException:
                # No half-made session is left behind (busy engine, timeout, client gone).
                await store.delete(session)
                raise
        return session.info()

    @app.get("/v1/sessions")
    async def list_sessions(limit: int = 100, after: str | None = None) -> dict[str, Any]:
        if not 1 <= limit <= MAX_PAGE:
            raise ApiError(400, f"limit must be an integer from 1 to {MAX_PAGE}", param="limit")
        if after is not None and len(after) > MAX_NAME_CHARS:
            raise ApiError(400, f"after is longer than {MAX_NAME_CHARS} characters", param="after")
        sessions, more = store.page(limit, after)
        data = [s.info() for s in sessions]
        return {"object": "list", "data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str) -> dict[str, Any]:
        return store.get(session_id).info()

    @app.post("/v1/sessions/{session_id}/append")
    async def append(session_id: str, body: SessionAppendRequest) -> dict[str, Any]:
        session = store.get(session_id)
        await server.append(session, await server.encode(body.text, "text"))
        return session.info()

    @app.post("/v1/sessions/{session_id}/complete")
    async def complete(session_id: str, body: SessionCompleteRequest) -> Any:
        session = store.get(session_id)
        return await server.respond(body, await server.encode(body.prompt, "prompt"), session)

    @app.post("/v1/sessions/{session_id}/fork")
    async def fork(session_id: str) -> dict[str, Any]:
        session = store.get(session_id)
        await server.lock(session)
        try:
            return (await store.fork(session)).info()
        finally:
            session.lock.release()

    @app.delete("/v1/sessions/{session_id}")
    async def delete(session_id: str) -> dict[str, Any]:
        session = store.get(session_id)
        await server.lock(session)
        try:
            await store.delete(session)
        finally:
            session.lock.release()
        return {"id": session_id, "object": "session.deleted", "deleted": True}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(list(exc.errors()))
        return JSONResponse(error_body(message or "invalid request", param=param), 400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc, ApiError):
            return JSONResponse(error_body(exc.detail, exc.kind, exc.param, exc.code), exc.status_code)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), exc.status_code, headers=exc.headers)

    @app.exception_handler(SessionNotFound)
    async def no_session(request: Request, exc: SessionNotFound) -> JSONResponse:
        return JSONResponse(error_body(f"no session {clip(exc.args[0])}", param="session_id",
                                       code="session_not_found"), 404)

    @app.exception_handler(SessionStateError)
    async def broken_state(request: Request, exc: SessionStateError) -> JSONResponse:
        # The detail (file, cause) goes to the log only; the reply says what happened to which session.
        log.error("%s", exc.detail)
        return JSONResponse(error_body(str(exc), "server_error", code="session_state_unreadable"), 500)

    @app.exception_handler(SessionDiskFull)
    async def disk_full(request: Request, exc: SessionDiskFull) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "server_error", code=exc.code), 507)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # Last resort for a bug: JSON with an id to find the traceback in the log, never the exception's text.
        return JSONResponse(error_body(internal_error(exc), "server_error"), 500)

    @app.exception_handler(SessionLimit)
    async def too_many(request: Request, exc: SessionLimit) -> JSONResponse:
        return JSONResponse(error_body(str(exc), code="too_many_sessions"), 429)

