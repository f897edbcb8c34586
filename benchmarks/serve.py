"""Load test of ``ssmkit serve`` on loopback, and the memory of many open sessions vs a transformer's KV cache.

Starts a real server process (127.0.0.1, a free port, a temporary sessions folder) and

1. **throughput**: for each concurrency c (default 1, 8, 64), sends a fixed number of completion requests
   (``--requests``, each ``--max-tokens`` new tokens, sampled with its own seed) from c concurrent
   clients, and reports generated tokens/s, requests/s and the p50/p99 request latency;
2. **memory**: opens ``--sessions`` sessions (default 1,000) that have each read ``--session-tokens``
   tokens (default 10,000) and reports the server's resident memory (RSS, psutil) before and after, next
   to the state bytes the server reports and to the KV cache a transformer of the same size would hold
   for the same tokens: ``2 (K and V) x layers x d_model x bytes per value x tokens``, for a transformer
   with the same d_model and the same number of non-embedding parameters (12 d_model^2 per layer).

By default one session reads the text and the others are forks of it (a fork is a full copy of the
state, so memory is the same as for distinct texts; an SSM state does not depend on how many tokens it
has read); ``--distinct`` makes every session read its own text (slow on CPU: sessions x tokens).

Everything is bounded: a fixed number of requests, client timeouts, and the server is stopped at the end.

    python benchmarks/serve.py                                  # random byte-small weights
    python benchmarks/serve.py --checkpoint runs/byte-small     # a trained model
    python benchmarks/serve.py --quick                          # 16 requests, 100 sessions of 1,000 tokens
    python benchmarks/serve.py --device cuda --concurrency 1 8 64 256 --max-batch 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from ssmkit.data.tokenizer import ByteTokenizer
from ssmkit.models import LanguageModel, get_preset

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def start_server(checkpoint: Path, sessions_dir: Path, log: Path, memory_mb: float, threads: int | None,
                 device: str, max_batch: int) -> tuple:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    argv = [sys.executable, "-m", "ssmkit", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
            "--sessions-dir", str(sessions_dir), "--session-memory-mb", str(memory_mb), "--max-batch", str(max_batch),
            "--max-requests", "512", "--max-sessions", "1000000", "--device", device]
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


async def load(url: str, concurrency: int, requests: int, max_tokens: int, prompt_bytes: int = 64) -> dict[str, float]:
    """``requests`` completions from ``concurrency`` clients; latency percentiles and throughput."""
    latencies: list[float] = []
    tokens = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency)

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            prompt = (f"Request {i}: " + "the quick brown fox jumps over the lazy dog. " * 100)[:prompt_bytes]
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": i}
            start = time.perf_counter()
            r = await c.post("/v1/completions", json=body)
            latencies.append(time.perf_counter() - start)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        before = (await c.get("/health")).json()
        start = time.perf_counter()
        await asyncio.gather(*[client(c) for _ in range(concurrency)])
        wall = time.perf_counter() - start
        after = (await c.get("/health")).json()
    latencies.sort()
    # A request's first token comes from its prompt; every later one from a shared decode step.
    steps = after["decode_steps"] - before["decode_steps"]
    return {"concurrency": concurrency, "requests": requests, "tokens": tokens, "wall_s": wall,
            "mean_batch": (tokens - requests) / max(steps, 1),
            "tokens_per_s": tokens / wall, "requests_per_s": requests / wall,
            "p50_s": statistics.median(latencies), "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def open_sessions(url: str, pid: int, count: int, n_tokens: int, distinct: bool) -> dict[str, float]:
    """``count`` sessions of ``n_tokens`` tokens each; RSS of the server before and after."""
    proc = psutil.Process(pid)
    text = ("All work and no play makes Jack a dull boy. " * (n_tokens // 44 + 1))[: n_tokens - 1]
    with httpx.Client(base_url=url, timeout=600) as c:
        rss_before = proc.memory_info().rss
        start = time.perf_counter()
        first = c.post("/v1/sessions", json={"prompt": text}).json()
        read_s = time.perf_counter() - start
        ids = [first["id"]]
        start = time.perf_counter()
        for i in range(count - 1):
            if distinct:
                ids.append(c.post("/v1/sessions", json={"prompt": f"{i} {text}"[: n_tokens - 1]}).json()["id"])
            else:
                ids.append(c.post(f"/v1/sessions/{first['id']}/fork").json()["id"])
        open_s = time.perf_counter() - start
        sessions = c.get("/v1/sessions").json()["data"]
        health = c.get("/health").json()
        rss_after = proc.memory_info().rss
    mine = [s for s in sessions if s["id"] in set(ids)]
    assert len(mine) == count and all(s["tokens"] == n_tokens for s in mine), "sessions did not read the text"
    return {"sessions": count, "tokens_each": n_tokens, "state_bytes_each": mine[0]["state_bytes"],
            "in_memory": health["in_memory"], "rss_before": rss_before, "rss_after": rss_after,
            "first_read_s": read_s, "open_rest_s": open_s}


def transformer_kv_bytes(model: LanguageModel, tokens: int, bytes_per_value: int) -> tuple[int, int]:
    """(layers, KV bytes for ``tokens`` tokens) of a transformer with this model's d_model and parameters."""
    d = model.config.d_model
    non_embedding = sum(p.numel() for p in model.parameters()) - model.embedding.weight.numel()
    layers = max(1, round(non_embedding / (12 * d * d)))
    return layers, 2 * layers * d * bytes_per_value * tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="model folder (default: random byte-small weights)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-bytes", type=int, default=64, help="length of each request's prompt")
    parser.add_argument("--sessions", type=int, default=1000, help="0: skip the memory test")
    parser.add_argument("--session-tokens", type=int, default=10_000)
    parser.add_argument("--distinct", action="store_true", help="every session reads its own text")
    parser.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on cuda, states live in GPU memory: "
                        "the RSS figure then shows host memory only; the state bytes are the server's own count)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the server (OMP_NUM_THREADS)")
    parser.add_argument("--quick", action="store_true", help="16 requests, 100 sessions of 1,000 tokens")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.sessions, args.session_tokens = 16, 100, 1000
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = tmp / "byte-small"
            LanguageModel(get_preset("byte-small")).save_pretrained(checkpoint)
            ByteTokenizer().save(checkpoint)
        model = LanguageModel.from_pretrained(checkpoint)
        state_bytes = model.cache_nbytes(1)
        memory_mb = args.sessions * state_bytes * 1.2 / MIB + 64
        print(f"# ssmkit serve load test: {checkpoint.name}, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        proc, url = start_server(checkpoint, tmp / "sessions", tmp / "server.log", memory_mb, args.threads, args.device,
                                  args.max_batch)
        try:
            asyncio.run(load(url, 1, 2, 4))  # warm-up
            rows = [asyncio.run(load(url, c, args.requests, args.max_tokens, args.prompt_bytes))
                    for c in args.concurrency]
            memory = open_sessions(url, proc.pid, args.sessions, args.session_tokens, args.distinct) if args.sessions else None
        finally:
            proc.terminate()
            proc.wait(30)
    report(rows, memory, model, args, state_bytes)
    if args.json:
        args.json.write_text(json.dumps({"load": rows, "memory": memory}, indent=2) + "\n")


def report(rows: list[dict], memory: dict | None, model: LanguageModel, args: argparse.Namespace, state_bytes: int) -> None:
    base = rows[0]["tokens_per_s"]
    print(f"\n## Throughput: {args.requests} requests per level, {args.prompt_bytes}-byte prompts, "
          f"{args.max_tokens} new tokens each (sampled)\n")
    print("| clients | tokens/s | x vs 1 client | requests/s | p50 latency | p99 latency | rows per decode step |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.1f} | "
              f"{r['requests_per_s']:.2f} | {r['p50_s']:.2f} s | {r['p99_s']:.2f} s | {r['mean_batch']:.1f} |")
    if memory is None:
        return
    n, t = memory["sessions"], memory["tokens_each"]
    layers, kv32 = transformer_kv_bytes(model, t, 4)
    _, kv16 = transformer_kv_bytes(model, t, 2)
    grown = memory["rss_after"] - memory["rss_before"]
    how = "each read its own text" if args.distinct else "one read the text, the rest are forks (full copies)"
    print(f"\n## Memory: {n:,} open sessions of {t:,} tokens ({how})\n")
    print("| | per session | all sessions |")
    print("|---|---:|---:|")
    print(f"| SSM state, reported by the server ({memory['in_memory']:,} in memory) | "
          f"{state_bytes / MIB:.2f} MiB | {n * state_bytes / MIB:,.0f} MiB |")
    print(f"| server resident memory growth (RSS {memory['rss_before'] / MIB:,.0f} -> "
          f"{memory['rss_after'] / MIB:,.0f} MiB) | {grown / n / MIB:.2f} MiB | {grown / MIB:,.0f} MiB |")
    print(f"| transformer KV cache, fp32 ({layers} layers x d_model {model.config.d_model}, same parameters) | "
          f"{kv32 / MIB:,.1f} MiB | {n * kv32 / MIB:,.0f} MiB |")
    print(f"| transformer KV cache, bf16 | {kv16 / MIB:,.1f} MiB | {n * kv16 / MIB:,.0f} MiB |")
    print(f"\nKV/SSM ratio at {t:,} tokens: {kv32 / state_bytes:.0f}x (fp32). Reading the first {t:,} tokens took "
          f"{memory['first_read_s']:.1f} s; opening the other {n - 1:,} sessions {memory['open_rest_s']:.1f} s.")


if __name__ == "__main__":
    main()
