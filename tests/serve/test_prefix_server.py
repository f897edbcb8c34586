"""The prefix cache in a real server: shared documents resume where they diverge; /health and /metrics."""

from __future__ import annotations

import re
import time

import httpx

from ssmkit.cli import build_parser
from ssmkit.serve.options import MIB, options_from_args

from .conftest import ServerProcess, assert_cli_refuses, tiny_model

DOC = "".join(f"Line {i}: the state of an SSM does not grow with the text it has read. " for i in range(12))


def test_shared_document_questions_resume_from_the_document(server, client, reference):
    assert len(DOC) > 600  # past the server's snapshot interval of 512 tokens
    before = httpx.get(f"{server.url}/health").json()["prefix_cache"]
    sampling = {"temperature": 1.0, "top_k": 40, "seed": 11}
    for i, question in enumerate(["\nQ: what grows?", "\nQ: why?", "\nQ: what grows?"]):
        prompt = DOC + question
        body = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, **sampling}).json()
        assert body["choices"][0]["token_ids"] == reference(prompt, 12, **sampling), i
    after = httpx.get(f"{server.url}/health").json()["prefix_cache"]
    assert after["misses"] - before["misses"] >= 1
    assert after["hits"] - before["hits"] == 2
    # Each hit resumed at the snapshot at token 512 or later (the prompt end of an earlier question, or the interval).
    assert after["tokens_saved"] - before["tokens_saved"] >= 2 * 512
    assert after["memory_bytes"] <= after["memory_budget"] and after["entries_in_memory"] >= 2


def test_metrics_are_prometheus_text(server, client):
    client.post("/v1/completions", json={"prompt": "count me", "max_tokens": 2})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = r.text.splitlines()
    samples = {}
    for i, line in enumerate(lines):
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP ssmkit_\w+ .+|TYPE ssmkit_\w+ (counter|gauge))", line), line
            continue
        name, value = line.split(" ")
        assert re.fullmatch(r"ssmkit_[a-z_]+", name) and value.isdigit(), line
        assert lines[i - 2] == f"# HELP {name} " + lines[i - 2].split(" ", 3)[3] and lines[i - 1].startswith(f"# TYPE {name} ")
        if lines[i - 1].endswith("counter"):
            assert name.endswith("_total"), name
        samples[name] = int(value)
    health = httpx.get(f"{server.url}/health").json()
    assert samples["ssmkit_prefix_cache_hits_total"] == health["prefix_cache"]["hits"]
    assert samples["ssmkit_prefix_cache_misses_total"] >= 1 and samples["ssmkit_engine_up"] == 1
    assert samples["ssmkit_sessions"] == health["sessions"]
    assert samples["ssmkit_tokens_generated_total"] >= 2
    assert samples["ssmkit_prefill_rows_total"] >= samples["ssmkit_prefill_forwards_total"] >= 1
    assert httpx.get(f"{server.url}/metrics").status_code == 401  # like every route but /health


def test_prefix_cache_flags():
    parse = build_parser().parse_args
    args = parse(["serve", "--checkpoint", "x", "--prefix-cache-mb", "8", "--prefix-cache-disk-mb", "16",
                  "--prefix-cache-interval", "128"])
    options = options_from_args(args, "m")
    assert (options.prefix_cache, options.prefix_cache_bytes, options.prefix_cache_disk_bytes,
            options.prefix_cache_interval) == (True, 8 * MIB, 16 * MIB, 128)
    assert options_from_args(parse(["serve", "--checkpoint", "x", "--no-prefix-cache"]), "m").prefix_cache is False
    defaults = options_from_args(parse(["serve", "--checkpoint", "x"]), "m")
    assert defaults.prefix_cache and defaults.prefix_cache_disk_bytes == 0


def test_bad_prefix_cache_flags_are_usage_errors(model_dir, capsys):
    for flag, value in (("--prefix-cache-interval", "0"), ("--prefix-cache-mb", "-1"), ("--prefix-cache-disk-mb", "-2")):
        assert_cli_refuses(["serve", "--checkpoint", str(model_dir), flag, value], "prefix_cache", capsys)


def test_disk_snapshots_survive_a_restart(model_dir, tmp_path, reference):
    state_mb = tiny_model().cache_nbytes(1) / MIB
    proc = ServerProcess(model_dir, tmp_path / "sessions", tmp_path / "server.log", "--prefix-cache-mb",
                         str(1.5 * state_mb), "--prefix-cache-disk-mb", "4", "--prefix-cache-interval", "100000")
    prompts = [f"{k} is the document number {k}; " * 3 for k in range(4)]
    try:
        proc.start()
        with proc.client() as c:
            for p in prompts:  # each prompt-end snapshot pushes the one before it out of memory, onto disk
                assert c.post("/v1/completions", json={"prompt": p, "max_tokens": 1}).status_code == 200
            deadline = time.monotonic() + 30
            while httpx.get(f"{proc.url}/health").json()["prefix_cache"]["disk_writes"] < 3:
                assert time.monotonic() < deadline
        proc.stop()
        folder = next((tmp_path / "sessions").iterdir()) / "prefix-cache"
        assert len(list(folder.glob("*.safetensors"))) == 3 and len(list(folder.glob("*.json"))) == 3
        proc.start()
        stats = httpx.get(f"{proc.url}/health").json()["prefix_cache"]
        assert stats["entries_on_disk"] == 3 and stats["disk_bytes"] > 0 and stats["entries_in_memory"] == 0
        sampling = {"temperature": 1.0, "seed": 3}
        with proc.client() as c:
            body = c.post("/v1/completions", json={"prompt": prompts[0] + "and more", "max_tokens": 8, **sampling})
        assert body.json()["choices"][0]["token_ids"] == reference(prompts[0] + "and more", 8, **sampling)
        stats = httpx.get(f"{proc.url}/health").json()["prefix_cache"]
        assert stats["hits"] == 1 and stats["disk_hits"] == 1 and stats["tokens_saved"] == len(prompts[0]) + 1
    finally:
        proc.stop()


def test_a_session_that_reads_a_document_leaves_its_state_for_completions(server, client, reference):
    doc = "A session reads this document once; completions about it resume from its state. " * 3
    session = client.post("/v1/sessions", json={"prompt": doc}).json()
    before = httpx.get(f"{server.url}/health").json()["prefix_cache"]
    prompt = doc + "What resumes?"
    body = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 10, "temperature": 0}).json()
    after = httpx.get(f"{server.url}/health").json()["prefix_cache"]
    assert body["choices"][0]["token_ids"] == reference(prompt, 10, temperature=0)
    # The session read the start token and all of the document but its last byte (kept pending).
    assert after["hits"] == before["hits"] + 1 and after["tokens_saved"] - before["tokens_saved"] == len(doc)
    assert client.delete(f"/v1/sessions/{session['id']}").status_code == 200


def test_questions_sent_together_read_the_document_once(server, reference):
    """The first question leads; the others wait for its reading and resume from its snapshots."""
    import asyncio

    from .conftest import AUTH

    doc = "".join(f"Paragraph {i} of a document that many questions are asked about at once. " for i in range(24))
    questions = [f"\nQ{i}: which paragraph?" for i in range(6)]
    before = httpx.get(f"{server.url}/health").json()["prefix_cache"]

    async def ask_all() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as c:
            replies = [c.post("/v1/completions", json={"prompt": doc + q, "max_tokens": 6, "temperature": 0})
                       for q in questions]
            return [r.json() for r in await asyncio.gather(*replies)]

    bodies = asyncio.run(ask_all())
    after = httpx.get(f"{server.url}/health").json()["prefix_cache"]
    for q, body in zip(questions, bodies):
        assert body["choices"][0]["token_ids"] == reference(doc + q, 6, temperature=0), q
    assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] == len(questions) - 1
    assert after["tokens_saved"] - before["tokens_saved"] >= (len(questions) - 1) * 1024
