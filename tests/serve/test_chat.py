"""/v1/chat/completions on a real server: the checkpoint's template and tokenizer, OpenAI's shapes, limits."""

from __future__ import annotations

import json

import httpx
import pytest

from ssmkit.data.tokenizer import load_tokenizer
from ssmkit.generation import generate
from ssmkit.models import LanguageModel
from ssmkit.serve.chat_template import load_chat_template

from .test_completions import read_stream

pytest.importorskip("jinja2", reason="chat templates need jinja2 (the serve extra)")
pytest.importorskip("tokenizers", reason="the chat test model has a tokenizers tokenizer (the tokens extra)")

CONVERSATION = [{"role": "system", "content": "read a document once"},
                {"role": "user", "content": [{"type": "text", "text": "the state of "}, {"type": "text", "text": "a model"}]}]


@pytest.fixture(scope="module")
def chat_reference(token_model_dir):
    model = LanguageModel.from_pretrained(token_model_dir).eval()
    tokenizer = load_tokenizer(token_model_dir)
    template = load_chat_template(token_model_dir)

    def run(messages, n, **sampling):
        flat = [{**m, "content": m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])}
                for m in messages]
        ids = tokenizer.encode(template.render(flat))
        return ids, generate(model, [ids], n, eos_token_id=tokenizer.eos_id, **sampling)[0], tokenizer

    return run


def test_the_template_is_rendered_and_special_tokens_become_their_ids(token_model_dir, chat_reference):
    text = load_chat_template(token_model_dir).render([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids, _, tokenizer = chat_reference([{"role": "user", "content": "hi"}], 1)
    assert ids[0] == tokenizer._tok.token_to_id("<|im_start|>") and tokenizer.eos_id == tokenizer._tok.token_to_id("<|endoftext|>")


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 4}])
def test_chat_completion_equals_generate_on_the_rendered_prompt(chat_server, chat_reference, sampling):
    ids, expected, tokenizer = chat_reference(CONVERSATION, 20, **sampling)
    with chat_server.client() as c:
        body = c.post("/v1/chat/completions", json={"messages": CONVERSATION, "max_tokens": 20, **sampling}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": tokenizer.decode(expected)}
    assert choice["finish_reason"] == ("stop" if expected[-1] == tokenizer.eos_id else "length")
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(expected),
                             "total_tokens": len(ids) + len(expected)}


def test_streamed_chat_chunks(chat_server):
    request = {"messages": CONVERSATION, "max_completion_tokens": 12, "temperature": 1.0, "seed": 8}
    with chat_server.client() as c:
        whole = c.post("/v1/chat/completions", json=request).json()
        with c.stream("POST", "/v1/chat/completions",
                      json={**request, "stream": True, "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = read_stream(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == chunks[0]["id"] for e in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["finish_reason"] for e in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": whole["choices"][0]["finish_reason"]}
    assert chunks[-1]["usage"] == whole["usage"]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in chunks)
    assert text == whole["choices"][0]["message"]["content"]


def test_a_conversation_that_goes_on_resumes_from_the_cached_prompt(chat_server, chat_reference):
    """Turn two's prompt extends turn one's: it resumes from the state at turn one's prompt end (token model)."""
    with chat_server.client() as c:
        first = c.post("/v1/chat/completions", json={"messages": CONVERSATION, "max_tokens": 6, "temperature": 0}).json()
        before = httpx.get(f"{chat_server.url}/health").json()["prefix_cache"]
        turn = [*CONVERSATION, first["choices"][0]["message"], {"role": "user", "content": "and then?"}]
        second = c.post("/v1/chat/completions", json={"messages": turn, "max_tokens": 10, "temperature": 0}).json()
        after = httpx.get(f"{chat_server.url}/health").json()["prefix_cache"]
    assert after["hits"] == before["hits"] + 1
    assert after["tokens_saved"] - before["tokens_saved"] >= first["usage"]["prompt_tokens"] - 1
    ids, expected, tokenizer = chat_reference(turn, 10, temperature=0)
    assert second["usage"]["prompt_tokens"] == len(ids)
    assert second["choices"][0]["message"]["content"] == tokenizer.decode(expected)


def test_chat_errors_are_clear_400s(chat_server, client):
    with chat_server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}], "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["code"] == "chat_template_error"
        assert "unknown role robot" in r.json()["error"]["message"]
        for bad, param in (({"messages": []}, "messages"),
                           ({"messages": [{"role": "user", "content": "x"}] * 1025}, "messages"),
                           ({"messages": [{"role": "user", "content": 5}]}, "messages"),
                           ({"messages": [{"role": "u" * 65, "content": "x"}]}, "messages"),
                           ({"messages": [{"role": "user", "content": "x\ud800"}]}, "messages"),
                           ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages"),
                           ({"messages": CONVERSATION, "n": 2}, "n"),
                           ({"messages": CONVERSATION, "max_tokens": 65}, "max_tokens")):
            r = c.post("/v1/chat/completions", content=json.dumps(bad), headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text[:300])
    # A byte model without a template.
    r = client.post("/v1/chat/completions", json={"messages": CONVERSATION, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
