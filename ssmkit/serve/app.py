"""The HTTP API (FastAPI on uvicorn): OpenAI-style completions and stateful sessions.

Routes::

    GET  /health                         liveness, requests in flight, session memory (no auth)
    GET  /v1/models                      the served model
    POST /v1/completions                 {"prompt", "max_tokens", "temperature", ..., "stream"}
    POST /v1/sessions                    new session (optionally reading "prompt")
    GET  /v1/sessions, /v1/sessions/ID   tokens seen and state bytes of each session
    POST /v1/sessions/ID/append          {"text"}: read text into the state, no generation
    POST /v1/sessions/ID/complete        as /v1/completions (without "model"); the session goes on after it
    POST /v1/sessions/ID/fork            copy of the session
    DELETE /v1/sessions/ID

Every error is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for bad requests.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ssmkit.data.tokenizer import Tokenizer
from ssmkit.serve.completions import ApiError, Server
from ssmkit.serve.options import ServeOptions
from ssmkit.serve.schemas import (
    CompletionRequest,
    SessionAppendRequest,
    SessionCompleteRequest,
    SessionCreateRequest,
    describe_validation_error,
    error_body,
)
from ssmkit.serve.sessions import (
    SessionLimit,
    SessionNotFound,
    SessionStateError,
    SessionStore,
)

if TYPE_CHECKING:
    from ssmkit.models.language_model import LanguageModel

log = logging.getLogger("ssmkit.serve")


class RequestGuard:
    """ASGI middleware: bearer-token auth (constant time; /health is open) and the request body limit."""

    def __init__(self, app: Any, token: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.expected = None if token is None else hashlib.sha256(b"Bearer " + token.encode()).digest()
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"] != "/health":
            # Hashing first makes the comparison's time independent of the token's length too.
            given = hashlib.sha256(headers.get(b"authorization", b"")).digest()
            if not hmac.compare_digest(given, self.expected):
                response = JSONResponse(error_body("missing or wrong bearer token", "authentication_error"), 401,
                                        headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            response = JSONResponse(error_body(f"request body larger than {self.max_body_bytes} bytes"), 413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                # An HTTPException passes through FastAPI's body parsing as it is (others become a 400).
                raise ApiError(413, f"request body larger than {self.max_body_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


def create_app(model: LanguageModel, tokenizer: Tokenizer, store: SessionStore, options: ServeOptions) -> Any:
    """The ASGI application (FastAPI wrapped in :class:`RequestGuard`); the engine runs during its lifespan."""
    server = Server(model, tokenizer, store, options)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(title="ssmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    _install_error_handlers(app)
    _add_routes(app, server)
    return RequestGuard(app, options.token, options.max_body_bytes)


def _add_routes(app: FastAPI, server: Server) -> None:
    store = server.store

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = server.engine.alive
        body = {"status": "ok" if alive else "engine stopped", "requests_in_flight": server.engine.in_flight,
                "decode_steps": server.engine.steps, "tokens_generated": server.engine.tokens, **store.stats()}
        return JSONResponse(body, 200 if alive else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": server.options.model_name, "object": "model", "created": server.created,
                "owned_by": "ssmkit", "vocab_size": server.model.config.vocab_size,
                "state_bytes_per_session": server.model.cache_nbytes(1)}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        if body.model is not None and body.model != server.options.model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves "
                           f"{server.options.model_name!r}", param="model", code="model_not_found")
        bos = [] if server.tokenizer.bos_id is None else [server.tokenizer.bos_id]
        return await server.respond(body, bos + server.encode(body.prompt, "prompt"))

    @app.post("/v1/sessions")
    async def create_session(body: SessionCreateRequest | None = None) -> dict[str, Any]:
        ids = server.encode(body.prompt, "prompt") if body is not None and body.prompt else []
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
    async def list_sessions() -> dict[str, Any]:
        return {"object": "list", "data": [s.info() for s in store.list()]}

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str) -> dict[str, Any]:
        return store.get(session_id).info()

    @app.post("/v1/sessions/{session_id}/append")
    async def append(session_id: str, body: SessionAppendRequest) -> dict[str, Any]:
        session = store.get(session_id)
        await server.append(session, server.encode(body.text, "text"))
        return session.info()

    @app.post("/v1/sessions/{session_id}/complete")
    async def complete(session_id: str, body: SessionCompleteRequest) -> Any:
        session = store.get(session_id)
        return await server.respond(body, server.encode(body.prompt, "prompt"), session)

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
        return JSONResponse(error_body(f"no session {exc.args[0]!r}", param="session_id",
                                       code="session_not_found"), 404)

    @app.exception_handler(SessionStateError)
    async def broken_state(request: Request, exc: SessionStateError) -> JSONResponse:
        log.error("%s", exc)
        return JSONResponse(error_body(str(exc), "server_error", code="session_state_unreadable"), 500)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # Last resort for a bug: still JSON (uvicorn then closes the connection and logs the traceback).
        return JSONResponse(error_body(f"internal server error: {exc!r}", "server_error"), 500)

    @app.exception_handler(SessionLimit)
    async def too_many(request: Request, exc: SessionLimit) -> JSONResponse:
        return JSONResponse(error_body(str(exc), code="too_many_sessions"), 429)
