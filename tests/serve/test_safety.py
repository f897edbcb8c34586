"""Auth, limits and bad input: every bad request gets a 4xx with a clear message and the server lives on."""

from __future__ import annotations

import httpx
import pytest

from ssmkit.serve.options import ServeOptions

from .conftest import TOKEN

GOOD = {"prompt": "hi", "max_tokens": 2}

# (body as raw bytes or JSON, status, words the error message must contain)
BAD_COMPLETIONS = [
    (b'{"prompt": "hi", "max_tokens": ', 400, "not valid JSON"),
    (b"", 400, "empty"),
    (b"[1, 2]", 400, "JSON object"),
    (b'"just a string"', 400, "JSON object"),
    ({"max_tokens": 3}, 400, "missing field 'prompt'"),
    ({**GOOD, "frequency_penalty": 0.5}, 400, "unknown field 'frequency_penalty'"),
    ({**GOOD, "max_tokens": "3"}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": 2.0}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": True}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": -1}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": 201}, 400, "at most 200"),
    ({**GOOD, "max_tokens": 10**30}, 400, "max_tokens"),
    ({**GOOD, "temperature": -0.1}, 400, "temperature"),
    ({**GOOD, "temperature": "hot"}, 400, "temperature"),
    (b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    (b'{"prompt": "hi", "temperature": Infinity}', 400, "temperature"),
    ({**GOOD, "top_p": 0}, 400, "top_p"),
    ({**GOOD, "top_p": 1.5}, 400, "top_p"),
    ({**GOOD, "top_k": -3}, 400, "top_k"),
    ({**GOOD, "min_p": 2}, 400, "min_p"),
    ({**GOOD, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({**GOOD, "seed": -1}, 400, "seed"),
    ({**GOOD, "seed": 2**62}, 400, "seed"),
    ({**GOOD, "seed": "1"}, 400, "seed"),
    ({**GOOD, "stop": 7}, 400, "stop must be a string or a list"),
    ({**GOOD, "stop": ["a", ""]}, 400, "stop must be"),
    ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop must be"),
    ({**GOOD, "stream": "yes"}, 400, "stream"),
    ({**GOOD, "prompt": 42}, 400, "prompt"),
    ({**GOOD, "prompt": ["a", "b"]}, 400, "prompt"),
    ({**GOOD, "model": "gpt-4"}, 404, "does not exist"),
    ({"prompt": "é" * 2001}, 400, "at most 4000"),
]


@pytest.mark.parametrize("body,status,needle", BAD_COMPLETIONS, ids=range(len(BAD_COMPLETIONS)))
def test_bad_completion_requests_get_a_clear_4xx(client, body, status, needle):
    if isinstance(body, bytes):
        r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"], error
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("method,path,body,status", [
    ("POST", "/v1/sessions/sess_00000000000000000000000000000000/append", {"text": "x"}, 404),
    ("POST", "/v1/sessions/..%2F..%2Fetc/append", {"text": "x"}, 404),
    ("POST", "/v1/sessions/not-an-id/complete", {"max_tokens": 1}, 404),
    ("DELETE", "/v1/sessions/sess_zz", None, 404),
    ("GET", "/v1/nothing-here", None, 404),
    ("PUT", "/v1/completions", None, 405),
    ("POST", "/v1/sessions", {"prompt": 3}, 400),
    ("POST", "/v1/sessions", {"text": "x"}, 400),
])
def test_bad_routes_and_session_bodies(client, method, path, body, status):
    r = client.request(method, path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


def test_bad_session_bodies(client):
    sid = client.post("/v1/sessions").json()["id"]
    for body, needle in [({"text": ""}, "text"), ({}, "missing field 'text'"), ({"text": "a", "x": 1}, "unknown"),
                         ({"text": "ab" * 2001}, "at most 4000")]:
        r = client.post(f"/v1/sessions/{sid}/append", json=body)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    r = client.post(f"/v1/sessions/{sid}/complete", json={"max_tokens": 1, "model": "x"})
    assert r.status_code == 400 and "unknown field 'model'" in r.json()["error"]["message"]
    assert client.get(f"/v1/sessions/{sid}").json()["tokens"] == 1


def test_bearer_token_is_required_except_for_health(server):
    with server.client(auth=False) as anonymous:
        assert anonymous.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Basic {TOKEN}"}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/sessions")):
                r = anonymous.request(method, path, json=GOOD, headers=headers)
                assert r.status_code == 401, (headers, path)
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json()["error"]["type"] == "authentication_error"
        ok = anonymous.post("/v1/completions", json=GOOD, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200


def test_request_body_limit(client):
    big = {"prompt": "a" * 20_000}
    r = client.post("/v1/completions", json=big)
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is counted while reading
        for _ in range(20):
            yield b"a" * 1024

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text


def test_the_server_lives_on_after_the_battery(server, client):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["requests_in_flight"] == 0
    assert client.post("/v1/completions", json=GOOD).status_code == 200


def test_binds_loopback_by_default(server):
    assert ServeOptions().host == "127.0.0.1"
    assert "Uvicorn running on http://127.0.0.1:" in server.log.read_text()
