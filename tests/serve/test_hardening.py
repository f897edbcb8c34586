"""Issue 19 on a real server process: each test reproduces one attack that used to work."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from ssmkit.serve.schemas import MAX_STOP_CHARS

from .conftest import state_file_mb


def post_raw(client: httpx.Client, path: str, body: object) -> httpx.Response:
    """POST ``body`` as JSON with every non-ASCII character escaped (lone surrogates included)."""
    return client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


@pytest.fixture
def open_client(open_server):
    with open_server.client(auth=False) as c:
        yield c


def test_huge_stop_strings_are_refused_and_long_ones_do_not_stall_others(open_server, open_client):
    """Item 1: 4 stop strings of 500,000 characters froze the engine thread for everyone for ~45 s."""
    r = open_client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "stop": ["x" * 500_000] * 4})
    assert r.status_code == 400 and "stop" in r.json()["error"]["message"]
    # The longest allowed stop strings, built to defeat naive matching, while another request runs beside them.
    worst = ["a" * (MAX_STOP_CHARS - 1) + b for b in "bcde"]
    slow_done = []

    def long_request():
        with open_server.client(auth=False) as c:
            slow_done.append(c.post("/v1/completions", json={"prompt": "a", "max_tokens": 400, "stop": worst,
                                                             "temperature": 0}).status_code)

    thread = threading.Thread(target=long_request)
    thread.start()
    try:
        time.sleep(0.3)
        start = time.monotonic()
        r = open_client.post("/v1/completions", json={"prompt": "b", "max_tokens": 2})
        assert r.status_code == 200
        assert time.monotonic() - start < 10, "a request beside one with long stop strings waited too long"
    finally:
        thread.join(120)
    assert slow_done == [200]


def test_slow_header_sockets_do_not_take_the_server_down(open_server, open_client):
    """Item 2: 340 sockets sending one header line every 2 s made /health answer 503 to everyone."""
    port = int(open_server.url.rsplit(":", 1)[1])
    sockets = []
    for _ in range(340):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sockets.append(s)
    stop = threading.Event()

    def trickle():
        while not stop.wait(1.0):
            for s in sockets:
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        for _ in range(5):
            r = httpx.get(f"{open_server.url}/health", timeout=5)
            assert r.status_code == 200, r.text
            assert open_client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
            time.sleep(0.5)
        # Past the header timeout (3 s) every slow socket has been closed by the server.
        time.sleep(3.5)
        closed = 0
        for s in sockets:
            s.settimeout(2)
            try:
                closed += s.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == len(sockets)
    finally:
        stop.set()
        thread.join()
        for s in sockets:
            s.close()


def test_a_body_sent_too_slowly_gets_a_408(open_server):
    """Item 2 (bodies): a request that trickles its body holds nothing past --body-timeout (2 s here)."""
    port = int(open_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        s.settimeout(10)
        start = time.monotonic()
        reply = b""
        while b"}}" not in reply and (chunk := s.recv(4096)):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408"), reply
        assert b"body_timeout" in reply and time.monotonic() - start < 8


@pytest.mark.parametrize("method,path", [("GET", "/v1/sessions"), ("DELETE", "/v1/sessions/sess_" + "0" * 32),
                                         ("POST", "/v1/completions"), ("GET", "/health")])
def test_dns_rebinding_hosts_and_foreign_origins_are_refused(open_server, open_client, method, path):
    """Item 3: with no token, any Host was accepted, so a page on a rebound name could list and delete sessions."""
    port = open_server.url.rsplit(":", 1)[1]
    body = {"prompt": "x", "max_tokens": 1} if method == "POST" else None
    for host in (f"attacker.example:{port}", "attacker.example", "127.0.0.1.attacker.example", "[::2]", ""):
        r = open_client.request(method, path, json=body, headers={"Host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed", (host, r.text)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"LOCALHOST.:{port}", f"[::1]:{port}",
                 f"api.example:{port}", f"app.localhost:{port}"):
        r = open_client.request(method, path, json=body, headers={"Host": host})
        assert r.status_code in (200, 404), (host, r.text)
    for origin in ("http://attacker.example", f"http://attacker.example:{port}", "null", "file://"):
        r = open_client.request(method, path, json=body, headers={"Origin": origin})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", (origin, r.text)
    r = open_client.request(method, path, json=body, headers={"Origin": f"http://localhost:{port}"})
    assert r.status_code in (200, 404)


def test_lone_surrogates_are_a_clear_400_on_every_endpoint(open_client):
    """Item 9: {"prompt": "\\ud800"} was a 500 and a reset connection."""
    sid = open_client.post("/v1/sessions").json()["id"]
    cases = [("/v1/completions", {"prompt": "\ud800"}, "prompt"),
             ("/v1/completions", {"prompt": "ok", "stop": ["a\udfff"]}, "stop"),
             ("/v1/completions", {"prompt": "ok", "model": "\udc80"}, "model"),
             ("/v1/completions", {"prompt": "ok", "\ud800": 1}, "body"),
             ("/v1/sessions", {"prompt": "x\ud800y"}, "prompt"),
             (f"/v1/sessions/{sid}/append", {"text": "\udfff"}, "text"),
             (f"/v1/sessions/{sid}/complete", {"prompt": "\ud800", "max_tokens": 1}, "prompt")]
    for path, body, needle in cases:
        r = post_raw(open_client, path, body)
        assert r.status_code == 400, (path, body, r.text)
        message = r.json()["error"]["message"]
        assert needle in message and "lone surrogate" in message, message
    assert open_client.get(f"/v1/sessions/{sid}").json()["tokens"] == 1


def test_the_session_disk_quota_is_checked_before_writing(open_server, open_client):
    """Item 6: sessions had no disk quota (100,000 x 1.1 MB by default)."""
    made, refused = [], None
    for _ in range(60):
        r = open_client.post("/v1/sessions", json={"prompt": "fill"})
        if r.status_code != 200:
            refused = r
            break
        made.append(r.json()["id"])
    assert refused is not None and refused.status_code == 507, "the quota never refused a session"
    error = refused.json()["error"]
    assert error["code"] == "session_disk_quota" and "--session-disk-mb" in error["message"]
    health = httpx.get(f"{open_server.url}/health").json()
    assert health["disk_bytes"] <= health["disk_quota"] <= 3.5 * state_file_mb() * 2**20 + 1
    files = {p.name.split(".")[0] for p in open_server.sessions_dir.rglob("sess_*") if "quarantine" not in p.parts}
    listed = {s["id"] for s in open_client.get("/v1/sessions").json()["data"]}
    assert files == listed, "a refused session left files behind"
    # Deleting makes room again.
    for sid in made[:3]:
        assert open_client.delete(f"/v1/sessions/{sid}").status_code == 200
    assert open_client.post("/v1/sessions", json={"prompt": "fits again"}).status_code == 200
    for sid in made[3:]:
        open_client.delete(f"/v1/sessions/{sid}")


def test_a_failed_final_save_ends_a_stream_with_an_error_event_and_done(open_server, open_client):
    """Item 11: a streamed session completion whose final save failed ended with no error event and no [DONE]."""
    sid = open_client.post("/v1/sessions", json={"prompt": "stream me"}).json()["id"]
    (folder,) = {p.parent for p in open_server.sessions_dir.rglob(f"{sid}.json")}
    away = folder.with_name(folder.name + ".away")
    folder.rename(away)
    folder.write_text("not a folder: every save fails")
    try:
        with open_client.stream("POST", f"/v1/sessions/{sid}/complete",
                                json={"prompt": "!", "max_tokens": 5, "stream": True}) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    finally:
        folder.unlink()
        away.rename(folder)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "session_save_failed" and str(folder) not in events[-2]
    assert open_client.get(f"/v1/sessions/{sid}").json()["tokens"] == len("stream me") + 1, "the session changed"
    assert "saving its state failed" in open_server.log.read_text()
