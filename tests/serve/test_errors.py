"""Error replies never carry internals (issue 19, item 4), and the Host policy of every kind of bind."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from ssmkit.data.tokenizer import ByteTokenizer
from ssmkit.serve.app import create_app
from ssmkit.serve.guard import HostPolicy
from ssmkit.serve.options import ServeOptions
from ssmkit.serve.sessions import SessionStore

from .conftest import tiny_model


def test_a_bug_is_a_500_with_an_incident_id_and_no_exception_text(tmp_path, caplog):
    model = tiny_model()
    store = SessionStore(tmp_path, model, memory_budget=1 << 20)
    guard = create_app(model, ByteTokenizer(), store, ServeOptions())
    secret = f"{tmp_path}/private/file.bin"

    @guard.app.get("/boom")
    async def boom() -> None:
        raise RuntimeError(f"could not open {secret}")

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=guard, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.get("/boom")

    with caplog.at_level(logging.ERROR, logger="ssmkit.serve"):
        r = asyncio.run(call())
    assert r.status_code == 500
    message = r.json()["error"]["message"]
    assert "RuntimeError" not in r.text and secret not in r.text and str(tmp_path) not in r.text
    incident = message.rsplit(" ", 1)[-1].rstrip(")")
    # The log has the traceback under the id the client was given.
    assert f"internal error {incident}" in caplog.text and secret in caplog.text


@pytest.mark.parametrize("bound,host,allowed", [
    ("127.0.0.1", "127.0.0.1:8000", True), ("127.0.0.1", "localhost", True), ("127.0.0.1", "[::1]:80", True),
    ("127.0.0.1", "x.localhost:1", True), ("127.0.0.1", "10.0.0.5:8000", False),
    ("127.0.0.1", "evil.example", False), ("127.0.0.1", "localhost.evil.example", False),
    ("127.0.0.1", "[::1", False), ("127.0.0.1", "[::1]x", False),
    ("10.0.0.5", "10.0.0.5:8000", True), ("10.0.0.5", "10.0.0.6:8000", False),
    ("0.0.0.0", "10.0.0.6:8000", True), ("0.0.0.0", "[fe80::1]:8000", True), ("0.0.0.0", "evil.example", False),
    ("myhost.lan", "MYHOST.LAN:8000", True),
])
def test_host_policy(bound, host, allowed):
    assert HostPolicy(bound).host_allowed(host) is allowed


def test_host_and_origin_lists_are_configurable():
    policy = HostPolicy("127.0.0.1", hosts=("api.example",), origins=("https://app.example:8443",))
    assert policy.host_allowed("api.example:443") and not policy.host_allowed("app.example")
    assert policy.origin_allowed("https://app.example:8443") and policy.origin_allowed("http://api.example")
    assert not policy.origin_allowed("https://app.example") and not policy.origin_allowed("null")
    anything = HostPolicy("127.0.0.1", hosts=("*",), origins=("*",))
    assert anything.host_allowed("evil.example") and anything.origin_allowed("null")
