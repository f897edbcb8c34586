"""Property: whatever JSON a client sends to any route (bodies of the schema's shape and beyond it), a real
server answers 2xx or 4xx with a JSON error body, never a 5xx or a dropped connection, and stays alive."""

from __future__ import annotations

import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from .conftest import ServerProcess

ODD_TEXT = st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u202e", "é" * 3, "\n\n", "x" * 1100, "🙂"])
TEXT = st.one_of(st.text(max_size=12), ODD_TEXT)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-3, 300),
                   st.floats(allow_nan=True, allow_infinity=True), TEXT)
JSON = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(TEXT, inner, max_size=4)), max_leaves=10)


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly values of the right kind (some out of range), sometimes anything at all."""
    return st.one_of(valid, valid, JSON)


SAMPLING = {
    "max_tokens": field(st.integers(-2, 6)),
    "temperature": field(st.floats(-1, 3)),
    "top_p": field(st.floats(-0.5, 1.5)),
    "top_k": field(st.integers(-2, 300)),
    "min_p": field(st.floats(-0.5, 1.5)),
    "repetition_penalty": field(st.floats(-1, 12)),
    "stop": field(st.one_of(TEXT, st.lists(TEXT, max_size=6))),
    "seed": field(st.integers(-5, 2**63)),
    "stream": field(st.booleans()),
}
# Values the schema accepts, so that many requests get through and generate (text may still be odd).
VALID_SAMPLING = {
    "max_tokens": st.integers(0, 4), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 300), "min_p": st.floats(0, 1), "repetition_penalty": st.floats(0.1, 10),
    "stop": st.one_of(st.text(min_size=1, max_size=5), st.lists(st.text(min_size=1, max_size=5), max_size=4)),
    "seed": st.integers(0, 2**62 - 1), "stream": st.booleans(),
}
VALID = {
    "/v1/completions": {**VALID_SAMPLING, "prompt": st.text(max_size=20)},
    "/v1/sessions": {"prompt": st.text(max_size=20)},
    "/v1/sessions/{sid}/append": {"text": st.text(min_size=1, max_size=20)},
    "/v1/sessions/{sid}/complete": {**VALID_SAMPLING, "prompt": st.text(max_size=20)},
    "/v1/sessions/{sid}/fork": {},
}
ROUTES = {
    "/v1/completions": {**SAMPLING, "prompt": field(TEXT), "model": field(st.sampled_from(["ssmkit", "tiny-bytes"]))},
    "/v1/sessions": {"prompt": field(TEXT)},
    "/v1/sessions/{sid}/append": {"text": field(TEXT)},
    "/v1/sessions/{sid}/complete": {**SAMPLING, "prompt": field(TEXT)},
    "/v1/sessions/{sid}/fork": {},
}


@st.composite
def requests(draw) -> tuple[str, bytes]:
    route = draw(st.sampled_from(sorted(ROUTES)))
    fields = ROUTES[route]
    kind = draw(st.sampled_from(["valid", "valid", "schema", "schema", "extra", "any json", "bytes"]))
    if kind == "valid":
        # max_tokens always: its default (16) is above this server's cap.
        required = {k: VALID[route][k] for k in ("prompt", "text", "max_tokens")
                    if k in VALID[route] and (k != "prompt" or route == "/v1/completions")}
        optional = {k: v for k, v in VALID[route].items() if k not in required}
        body = draw(st.fixed_dictionaries(required, optional=optional))
        return route, json.dumps(body).encode()
    if kind == "bytes":
        return route, draw(st.binary(max_size=40))
    if kind == "any json":
        body = draw(JSON)
    else:
        body = draw(st.fixed_dictionaries({}, optional=fields))
        if kind == "extra":
            body.update(draw(st.dictionaries(TEXT, JSON, min_size=1, max_size=2)))
    # Python's json writes NaN/Infinity (invalid JSON, which the server must refuse) and escapes surrogates.
    return route, json.dumps(body).encode()


@pytest.fixture(scope="module")
def fuzz_server(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    proc = ServerProcess(model_dir, folder / "sessions", folder / "server.log", "--max-tokens-cap", "4",
                         "--max-prompt-tokens", "300", "--request-timeout", "20")
    proc.start()
    with proc.client(auth=False) as c:
        proc.session = c.post("/v1/sessions", json={"prompt": "base"}).json()["id"]
    yield proc
    proc.stop()


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=requests())
def test_any_body_gets_2xx_or_4xx_with_json_and_the_server_lives(fuzz_server, request):
    route, body = request
    path = route.format(sid=fuzz_server.session)
    with httpx.Client(base_url=fuzz_server.url, timeout=30) as client:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        event(f"{route}: {r.status_code}")
        assert r.status_code < 500, (path, body, r.status_code, r.text)
        if r.status_code >= 400:
            error = r.json()["error"]
            assert isinstance(error["message"], str) and error["message"] and error["type"], r.text
            assert error["param"] is None or not error["param"].startswith("'"), r.text
        elif r.headers["content-type"].startswith("text/event-stream"):
            events = [line for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events), r.text
        else:
            reply = r.json()
            assert isinstance(reply, dict) and "error" not in reply
            if "usage" in reply:
                assert not any(isinstance(v, float) and not math.isfinite(v) for v in reply["usage"].values())
        assert client.get("/health").status_code == 200
