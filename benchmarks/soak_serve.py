"""Soak test of ``ssmkit serve`` (not run in CI): many clients, every kind of request, and ``kill -9``.

N client threads mix completions (plain and streamed), sessions (create, append, complete plain and
streamed, fork, delete) against a real server process, which is killed with SIGKILL and restarted every
``--kill-every`` seconds. Each client owns its sessions and remembers the token count of every
acknowledged change; after a restart it checks them all. Reported: requests served, errors by kind,
sessions lost (an acknowledged session missing: must be 0) and sessions behind (fewer tokens than
acknowledged: must be 0).

    python benchmarks/soak_serve.py                                   # 64 clients, 10 minutes, kill every 60 s
    python benchmarks/soak_serve.py --clients 16 --minutes 2 --kill-every 30
    python benchmarks/soak_serve.py --checkpoint runs/byte-small      # a real model (default: tiny, random)

Expected errors: ``down`` (connection refused while the server restarts) and ``cut`` (a request in
flight when the server was killed: its change may or may not have been made, so a cut create, fork or
delete explains a session the server lists but no client tracks). Anything else is unexpected.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
OPS = {"complete": 22, "stream": 12, "create": 14, "append": 16, "session_complete": 14, "session_stream": 8,
       "fork": 8, "delete": 6}
MAX_SESSIONS_PER_CLIENT = 12


def tiny_checkpoint(folder: Path) -> Path:
    """A random debug-mamba2 with the byte vocabulary (what tests/serve uses)."""
    import torch

    from ssmkit.data.tokenizer import ByteTokenizer
    from ssmkit.models import LanguageModel, get_preset
    from ssmkit.models.presets import BYTE_VOCAB_SIZE

    config = get_preset("debug-mamba2")
    config.vocab_size = BYTE_VOCAB_SIZE
    torch.manual_seed(0)
    LanguageModel(config).save_pretrained(folder)
    ByteTokenizer().save(folder)
    return folder


class Server:
    def __init__(self, checkpoint: Path, sessions: Path, log: Path, extra: list[str]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "ssmkit", "serve", "--checkpoint", str(checkpoint), "--sessions-dir",
                     str(sessions), "--port", str(self.port), *extra]
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.restarts: list[float] = []

    def start(self) -> float:
        start = time.monotonic()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while time.monotonic() - start < 120:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not come up in 120 s; see {self.log}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.served: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.lost: list[str] = []
        self.behind: list[str] = []
        self.checked = 0

    def count(self, counter: str, key: str) -> None:
        with self.lock:
            getattr(self, counter)[key] += 1


class Client(threading.Thread):
    """One client: its own sessions, with the token count of each one's last acknowledged change."""

    def __init__(self, index: int, server: Server, stats: Stats, until: float, epoch: list[int]) -> None:
        super().__init__(name=f"client-{index}", daemon=True)
        self.rng = random.Random(index)
        self.server, self.stats, self.until, self.epoch = server, stats, until, epoch
        self.sessions: dict[str, int] = {}
        self.deleted: set[str] = set()  # acknowledged deletes: none may come back
        self.seen_epoch = 0

    def run(self) -> None:
        with httpx.Client(base_url=self.server.url, timeout=60) as http:
            while time.monotonic() < self.until:
                if self.seen_epoch != self.epoch[0] and self.server_up(http):
                    self.seen_epoch = self.epoch[0]
                    self.verify(http)
                op = self.rng.choices(list(OPS), weights=list(OPS.values()))[0]
                try:
                    ok = self.request(http, op)
                except httpx.ConnectError:  # refused: the server is down, nothing was sent
                    self.stats.count("errors", f"{op}: down")
                    time.sleep(0.2)
                    continue
                except httpx.TransportError:  # cut by the kill: done or not, the client cannot know
                    self.stats.count("errors", f"{op}: cut")
                    continue
                if ok:
                    self.stats.count("served", op)

    def server_up(self, http: httpx.Client) -> bool:
        try:
            return http.get("/health").status_code == 200
        except httpx.TransportError:
            time.sleep(0.2)
            return False

    def verify(self, http: httpx.Client) -> None:
        """After a restart: every acknowledged session is there, with at least the acknowledged tokens."""
        for sid, tokens in list(self.sessions.items()):
            try:
                r = http.get(f"/v1/sessions/{sid}")
            except httpx.TransportError:
                self.seen_epoch = -1  # killed again meanwhile: check again after the next start
                return
            with self.stats.lock:
                self.stats.checked += 1
                if r.status_code == 404:
                    self.stats.lost.append(sid)
                    del self.sessions[sid]
                elif r.status_code == 200 and r.json()["tokens"] < tokens:
                    self.stats.behind.append(sid)

    def post(self, http: httpx.Client, op: str, path: str, body: dict | None, stream: bool = False) -> dict | None:
        """The reply's JSON (the last chunk's when streamed), or None after counting the error."""
        if stream:
            with http.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    r.read()
                    return self.failed(op, r)
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            if not events or events[-1] != "[DONE]":
                self.stats.count("errors", f"{op}: stream without [DONE]")
                return None
            last = json.loads(events[-2])
            if "error" in last:
                self.stats.count("errors", f"{op}: error event {last['error'].get('code')}")
                return None
            return last
        r = http.post(path, json=body)
        return r.json() if r.status_code == 200 else self.failed(op, r)

    def failed(self, op: str, r: httpx.Response) -> None:
        try:
            code = r.json()["error"].get("code")
        except (ValueError, KeyError, TypeError):
            code = "no JSON error body"
        self.stats.count("errors", f"{op}: {r.status_code} {code}")

    def request(self, http: httpx.Client, op: str) -> bool:
        rng = self.rng
        prompt = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 60)))
        sampling = {"max_tokens": rng.randint(1, 12), "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 99)}
        sid = rng.choice(list(self.sessions)) if self.sessions else None
        if op in ("complete", "stream"):
            return self.post(http, op, "/v1/completions", {"prompt": prompt, **sampling, "stream": op == "stream"},
                             stream=op == "stream") is not None
        if op == "create" or sid is None:
            if len(self.sessions) >= MAX_SESSIONS_PER_CLIENT:
                return self.request(http, "delete") if sid else False
            info = self.post(http, "create", "/v1/sessions", {"prompt": prompt})
            if info is not None:
                self.sessions[info["id"]] = info["tokens"]
            return info is not None
        if op == "append":
            return self.acked(sid, self.post(http, op, f"/v1/sessions/{sid}/append", {"text": prompt}))
        if op in ("session_complete", "session_stream"):
            stream = op == "session_stream"
            last = self.post(http, op, f"/v1/sessions/{sid}/complete", {"prompt": prompt, **sampling, "stream": stream},
                             stream=stream)
            return self.acked(sid, None if last is None else last["session"])
        if op == "fork":
            info = self.post(http, op, f"/v1/sessions/{sid}/fork", None)
            if info is not None:
                self.sessions[info["id"]] = info["tokens"]
            return info is not None
        try:
            r = http.delete(f"/v1/sessions/{sid}")
        except httpx.ConnectError:
            raise  # never sent: the session is still there
        except httpx.TransportError:
            self.sessions.pop(sid)  # deleted or not: no longer checked either way
            raise
        if r.status_code != 200:
            self.failed(op, r)
            return False
        self.sessions.pop(sid)
        self.deleted.add(sid)
        return True

    def acked(self, sid: str, info: dict | None) -> bool:
        if info is None:
            return False
        self.sessions[sid] = info["tokens"]
        return True


def list_all_sessions(http: httpx.Client) -> set[str]:
    """Every session id, page by page (GET /v1/sessions returns at most 1,000 at a time)."""
    ids: set[str] = set()
    params: dict[str, object] = {"limit": 1000}
    while True:
        page = http.get("/v1/sessions", params=params).json()
        ids.update(s["id"] for s in page["data"])
        if not page["has_more"]:
            return ids
        params["after"] = page["last_id"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--kill-every", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument("--checkpoint", help="model folder (default: a tiny random byte model)")
    parser.add_argument("--workdir", help="sessions and server log (default: a temporary folder)")
    parser.add_argument("--server-args", default="--threads 1", help="extra flags for ssmkit serve")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ssmkit-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint) if args.checkpoint else tiny_checkpoint(work / "model")
    server = Server(checkpoint, work / "sessions", work / "server.log", args.server_args.split())
    startup = [server.start()]
    stats, epoch = Stats(), [0]
    start = time.monotonic()
    until = start + args.minutes * 60
    clients = [Client(i, server, stats, until, epoch) for i in range(args.clients)]
    for c in clients:
        c.start()
    kills = 0
    while time.monotonic() + args.kill_every < until:
        time.sleep(args.kill_every)
        server.kill()
        kills += 1
        epoch[0] += 1
        startup.append(server.start())
    for c in clients:
        c.join()
    # A last kill -9, then every session any client acknowledged is checked once more.
    server.kill()
    startup.append(server.start())
    epoch[0] += 1
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for c in clients:
            c.seen_epoch = epoch[0]
            c.verify(http)
        listed_ids = list_all_sessions(http)
        listed = len(listed_ids)
        resurrected = listed_ids & set().union(*(c.deleted for c in clients))
    server.kill()
    # For a closer look: every session a client tracks, every acknowledged delete, what the server listed.
    tracked_ids = {sid: n for c in clients for sid, n in c.sessions.items()}
    (work / "sessions_tracked.json").write_text(json.dumps(
        {"tracked": tracked_ids, "deleted": sorted(set().union(*(c.deleted for c in clients))),
         "listed": sorted(listed_ids)}))
    elapsed = time.monotonic() - start
    tracked = sum(len(c.sessions) for c in clients)
    quarantined = len(list((work / "sessions").rglob("quarantine/*")))
    print(f"soak: {args.clients} clients, {elapsed / 60:.1f} min, {kills + 1} kill -9 and restarts "
          f"(restart to healthy: median {sorted(startup)[len(startup) // 2]:.1f} s, max {max(startup):.1f} s)")
    print(f"requests served: {sum(stats.served.values())} ({sum(stats.served.values()) / elapsed:.1f}/s): "
          + ", ".join(f"{k} {v}" for k, v in stats.served.most_common()))
    print("errors by kind: " + (", ".join(f"{k} {v}" for k, v in stats.errors.most_common()) or "none"))
    in_doubt = sum(stats.errors[f"{op}: cut"] for op in ("create", "fork", "delete"))
    print(f"sessions checked after restarts: {stats.checked}; acknowledged at the end: {tracked}; the server "
          f"lists {listed} (at most {tracked + in_doubt}: {in_doubt} creates, forks and deletes were cut); "
          f"quarantined files: {quarantined}")
    print(f"sessions lost: {len(stats.lost)}; sessions behind their acknowledged tokens: {len(stats.behind)}; "
          f"deleted sessions back after a restart: {len(resurrected)}")
    print(f"work folder: {work}")
    unexpected = [k for k in stats.errors if not k.endswith((": down", ": cut"))]
    return 1 if stats.lost or stats.behind or resurrected or unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
