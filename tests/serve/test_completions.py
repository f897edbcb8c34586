"""/v1/completions on a real server process: the same tokens as ``generate()``, streamed or not, batched."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from ssmkit.models.presets import BYTE_EOS

from .conftest import AUTH

SAMPLINGS = [
    {"temperature": 0},
    {"temperature": 1.0, "seed": 7},
    {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 123},
    {"temperature": 1.2, "min_p": 0.05, "repetition_penalty": 1.3, "seed": 2**40},
]


def read_stream(response: httpx.Response) -> list[dict | str]:
    """The ``data:`` payloads of a server-sent event stream (``[DONE]`` as the string)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_health_and_models(server, client):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok"
    card = client.get("/v1/models").json()["data"][0]
    assert card["id"] == "tiny-bytes" and card["state_bytes_per_session"] > 0


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_completion_equals_generate(client, reference, sampling):
    prompt = "The state of an SSM is a fixed size."
    body = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 24, **sampling}).json()
    choice = body["choices"][0]
    expected = reference(prompt, 24, **sampling)
    assert choice["token_ids"] == expected
    assert choice["finish_reason"] == ("stop" if expected[-1] == BYTE_EOS else "length")
    assert body["usage"] == {"prompt_tokens": len(prompt) + 1, "completion_tokens": len(expected),
                             "total_tokens": len(prompt) + 1 + len(expected)}


def test_stream_yields_the_same_tokens_and_text(client):
    request = {"prompt": "stream me", "max_tokens": 30, "temperature": 1.0, "seed": 99}
    whole = client.post("/v1/completions", json=request).json()["choices"][0]
    with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_stream(response)
    assert events[-1] == "[DONE]"
    chunks = [e["choices"][0] for e in events[:-1]]
    assert [c["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["finish_reason"] == whole["finish_reason"]
    # One event per token as it comes, then the closing event.
    assert [len(c["token_ids"]) for c in chunks[:-1]] == [1] * len(whole["token_ids"])
    assert [t for c in chunks for t in c["token_ids"]] == whole["token_ids"]
    assert "".join(c["text"] for c in chunks) == whole["text"]


def test_stop_strings_end_the_text_streamed_or_not(client):
    request = {"prompt": "abc", "max_tokens": 40, "temperature": 1.0, "seed": 5}
    full = client.post("/v1/completions", json=request).json()["choices"][0]
    text = full["text"]
    stop = text[10:12]
    cut = text.index(stop)
    body = client.post("/v1/completions", json={**request, "stop": [stop, "\x00never"]}).json()["choices"][0]
    assert body["text"] == text[:cut] and body["finish_reason"] == "stop"
    # Generation stops at the token that completes the stop string.
    assert len(body["token_ids"]) < len(full["token_ids"])
    assert full["token_ids"][:len(body["token_ids"])] == body["token_ids"]
    with client.stream("POST", "/v1/completions", json={**request, "stop": stop, "stream": True}) as response:
        events = read_stream(response)[:-1]
    assert "".join(e["choices"][0]["text"] for e in events) == text[:cut]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_zero_max_tokens_reads_the_prompt_only(client):
    body = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}).json()
    assert body["choices"][0]["token_ids"] == [] and body["choices"][0]["finish_reason"] == "length"


def test_concurrent_requests_are_batched_and_each_equals_generate(server, reference):
    prompts = [f"request number {i} " * (1 + i % 3) for i in range(8)]
    samplings = [SAMPLINGS[i % len(SAMPLINGS)] for i in range(8)]
    before = httpx.get(f"{server.url}/health").json()

    async def run_all() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
            requests = [c.post("/v1/completions", json={"prompt": p, "max_tokens": 40, **s})
                        for p, s in zip(prompts, samplings)]
            return [r.json() for r in await asyncio.gather(*requests)]

    results = asyncio.run(run_all())
    for prompt, sampling, body in zip(prompts, samplings, results):
        assert body["choices"][0]["token_ids"] == reference(prompt, 40, **sampling), prompt
    after = httpx.get(f"{server.url}/health").json()
    tokens = after["tokens_generated"] - before["tokens_generated"]
    steps = after["decode_steps"] - before["decode_steps"]
    assert tokens == sum(len(b["choices"][0]["token_ids"]) for b in results)
    # Alone, every token after a request's first costs one step; batched, steps are shared.
    assert steps < (tokens - len(prompts)) / 2, (steps, tokens)
