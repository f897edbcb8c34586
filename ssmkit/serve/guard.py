"""What every HTTP request passes before a route sees it: Host and Origin, the bearer token, requests under
way, and the body's size and read time.

DNS rebinding: a web page on ``attacker.example`` whose name is made to resolve to 127.0.0.1 can send
requests to a local server with ``Host: attacker.example:8000`` and read the replies (the browser deems
them same-origin). Accepting only Host names that are the server's own (the bound address, localhost
names and what ``--allowed-hosts`` adds) stops it; an IP-literal Host cannot come from a rebinding page,
so on a wildcard bind (0.0.0.0, ::) any IP address is accepted as well. Browsers also send ``Origin`` on
cross-site requests: one whose host is not allowed (nor listed in ``--allowed-origins``) gets a 403.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
from typing import Any
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse

from ssmkit.serve.completions import ApiError
from ssmkit.serve.options import ServeOptions
from ssmkit.serve.schemas import clip, error_body

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD = ("0.0.0.0", "::", "")


def _hostname(value: str) -> str | None:
    """The host name of a Host header or an origin's netloc (lower case, no port, no trailing dot); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or (value[end + 1:] and not value[end + 1:].startswith(":")):
            return None
        return value[1:end]
    name = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    return name.rstrip(".") or None


class HostPolicy:
    """Which Host names and browser origins the server answers (see the module docstring)."""

    def __init__(self, bound: str, hosts: tuple[str, ...] = (), origins: tuple[str, ...] = ()) -> None:
        self.any_host = "*" in hosts
        self.any_origin = "*" in origins
        self.ip_literals = bound in WILDCARD
        self.hosts = {h for h in (_hostname(x) for x in (*LOCAL_NAMES, bound, *hosts) if x != "*") if h}
        self.origins = {o.strip().lower().rstrip("/") for o in origins if o != "*"}

    def host_allowed(self, host: str) -> bool:
        if self.any_host:
            return True
        name = _hostname(host)
        if name is None:
            return False
        if name in self.hosts or name.endswith(".localhost"):  # *.localhost is loopback by definition (RFC 6761)
            return True
        if self.ip_literals:
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False

    def origin_allowed(self, origin: str) -> bool:
        if self.any_origin or origin.strip().lower().rstrip("/") in self.origins:
            return True
        parts = urlsplit(origin.strip())
        return parts.scheme in ("http", "https") and bool(parts.netloc) and self.host_allowed(parts.netloc)


class RequestGuard:
    """ASGI middleware run before any route (``/health`` needs no token and is never refused as busy).

    In order: Host allow-list (400), Origin check (403), bearer token in constant time (401), requests under
    way at most ``max_active`` (503), Content-Length at most ``max_body_bytes`` (413), and while the body is
    read: its size (413) and the time to read it, at most ``body_timeout`` seconds (408).
    """

    def __init__(self, app: Any, options: ServeOptions, max_active: int) -> None:
        self.app = app
        token = options.token
        self.expected = None if token is None else hashlib.sha256(b"Bearer " + token.encode()).digest()
        self.max_body_bytes = options.max_body_bytes
        self.body_timeout = options.body_timeout_s
        self.policy = HostPolicy(options.host, options.allowed_hosts, options.allowed_origins)
        self.max_active = max_active
        self.active = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if scope["path"] == "/health":
            return await self.app(scope, receive, send)
        if self.active >= self.max_active:
            response = JSONResponse(error_body(f"the server is at its limit of {self.max_active} requests under way",
                                               "server_error", code="overloaded"), 503, headers={"Retry-After": "1"})
            return await response(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, self._limited(receive), send)
        finally:
            self.active -= 1

    def _refusal(self, scope: dict) -> JSONResponse | None:
        headers = dict(scope["headers"])
        host = headers.get(b"host")
        if host is not None and not self.policy.host_allowed(host.decode("latin-1")):
            return JSONResponse(error_body(f"Host {clip(host.decode('latin-1'))} is not served here; add it with "
                                           "--allowed-hosts", code="host_not_allowed"), 400)
        origin = headers.get(b"origin")
        if origin is not None and not self.policy.origin_allowed(origin.decode("latin-1")):
            return JSONResponse(error_body(f"requests from origin {clip(origin.decode('latin-1'))} are not allowed; "
                                           "add it with --allowed-origins", "permission_error",
                                           code="origin_not_allowed"), 403)
        if self.expected is not None and scope["path"] != "/health":
            # Hashing first makes the comparison's time independent of the token's length too.
            given = hashlib.sha256(headers.get(b"authorization", b"")).digest()
            if not hmac.compare_digest(given, self.expected):
                return JSONResponse(error_body("missing or wrong bearer token", "authentication_error"), 401,
                                    headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return JSONResponse(error_body(f"request body larger than {self.max_body_bytes} bytes"), 413)
        return None

    def _limited(self, receive: Any) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        received = 0
        body_done = False

        async def limited_receive() -> dict:
            nonlocal received, body_done
            if body_done:  # after the body: only the disconnect message, which may come much later
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                # An HTTPException passes through FastAPI's body parsing as it is (others become a 400).
                raise ApiError(408, f"the request body was not received within {self.body_timeout:g} s",
                               code="body_timeout") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_body_bytes:
                    raise ApiError(413, f"request body larger than {self.max_body_bytes} bytes")
            else:
                body_done = True
            return message

        return limited_receive
