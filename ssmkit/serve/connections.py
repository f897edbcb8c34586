"""Connections that have not sent a request yet cannot starve those that have (slow headers, "slowloris").

uvicorn counts every open connection towards ``limit_concurrency`` before a single header is read and has
no timeout for the headers of a request, so a few hundred sockets that trickle one header line every few
seconds make it answer 503 to everyone (``/health`` included), without ever authenticating.

:func:`guarded_protocol` gives uvicorn an HTTP protocol (its h11 one) under these rules instead:

- a connection is **idle** while it has no request under way: from accept until its request's headers
  are complete, and again after each response (keep-alive);
- an idle connection must complete the next request's headers within ``header_timeout`` seconds (the
  keep-alive timeout, shorter, applies between requests), or it is closed;
- at most ``max_idle`` connections are idle at once: a new one closes the one idle the longest, so a
  client that sends its headers at once (any real client) always gets through, however many slow ones there
  are;
- requests under way are limited by the application (:class:`ssmkit.serve.app.RequestGuard`: auth, body
  timeout, requests in flight), and unauthenticated ones end at once with a 401.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("ssmkit.serve")


class IdleConnections:
    """The idle connections of one server, oldest first, each with its deadline timer."""

    def __init__(self, header_timeout: float, max_idle: int) -> None:
        self.header_timeout = header_timeout
        self.max_idle = max_idle
        self._idle: OrderedDict[Any, asyncio.TimerHandle] = OrderedDict()
        self.closed_slow = 0
        self.closed_evicted = 0

    def __len__(self) -> int:
        return len(self._idle)

    def wait(self, conn: H11Protocol) -> None:
        """``conn`` now waits for a request (new, or done with one); the oldest idle one goes if too many."""
        self.busy(conn)
        self._idle[conn] = conn.loop.call_later(self.header_timeout, self._expire, conn)
        while len(self._idle) > self.max_idle:
            oldest, timer = self._idle.popitem(last=False)
            timer.cancel()
            self.closed_evicted += 1
            _close(oldest)

    def busy(self, conn: H11Protocol) -> None:
        """``conn`` has a request under way (or is gone)."""
        timer = self._idle.pop(conn, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, conn: H11Protocol) -> None:
        if self._idle.pop(conn, None) is not None:
            self.closed_slow += 1
            _close(conn)


def _close(conn: H11Protocol) -> None:
    if not conn.transport.is_closing():
        conn.transport.close()


def guarded_protocol(idle: IdleConnections) -> type[H11Protocol]:
    """uvicorn's h11 protocol, with its connections tracked by ``idle`` (pass as ``uvicorn.run(http=...)``)."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            idle.wait(self)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                idle.busy(self)

        def on_response_complete(self) -> None:
            # Before the parent's call, which may start a pipelined request at once (handle_events marks it busy).
            if not self.transport.is_closing():
                idle.wait(self)
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            idle.busy(self)
            super().connection_lost(exc)

    return GuardedH11Protocol
