"""Load test of ``ssmkit serve`` on loopback, and the memory of many open sessions vs a transformer's KV cache.

Starts a real server process (127.0.0.1, a free port, a temporary sessions folder) and

1. **throughput**: for each concurrency c (default 1, 8, 64, 256), sends a fixed number of streamed
   completion requests (``--requests``, at least c; each ``--max-tokens`` new tokens, sampled with its own
   seed; no two prompts share a prefix) from c concurrent clients, and reports generated tokens/s,
   requests/s, time to first token p50/p99, request latency p50/p99 and rows per decode step -- on a
   server with the prefix cache and on one without (``--no-prefix-cache``): a same-run A/B in
   ``--rounds`` interleaved rounds (each round one run on each server, back to back, the order
   alternating; the machine's load average is printed per run): each round's on / off ratio, their median
   and range (the cache must never cost more than 5%), the same by tokens per CPU second of the server
   process (psutil: on a CPU shared with other work, the server's own cost), with the cache filled to its budget first (a
   server's steady state: ``--prefix-cache-mb``);
2. **shared document**: one document of ``--doc-tokens`` tokens (default 16,000; bytes for a byte model)
   and ``--questions`` different questions (default 64), asked one after the other: time to first token
   with the prefix cache (the first question reads the document, the others resume from its state)
   against without it (every question reads the document: ``--cold-questions`` of them are timed, as
   each costs the same);
3. **memory**: opens ``--sessions`` sessions (default 1,000) that have each read ``--session-tokens``
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
    python benchmarks/serve.py --sessions 0 --doc-tokens 4000   # a smaller shared document, no memory test
    python benchmarks/serve.py --device cuda --concurrency 1 8 64 256 --max-batch 256
    python benchmarks/serve.py --sessions 0 --doc-tokens 0 --rounds 5     # only the cache on/off A/B

The engine alone (no HTTP, any preset with random weights, e.g. mamba2-130m on a GPU): benchmarks/serve_engine.py.
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
from math import nan
from pathlib import Path

import httpx
import psutil

from ssmkit.data.tokenizer import ByteTokenizer
from ssmkit.models import LanguageModel, get_preset

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def start_server(checkpoint: Path, sessions_dir: Path, log: Path, memory_mb: float, threads: int | None,
                 device: str, max_batch: int, dtype: str, *extra: str) -> tuple:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # This checkout first, then the caller's path (where packages installed with --target live, e.g. the device's).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    argv = [sys.executable, "-m", "ssmkit", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
            "--sessions-dir", str(sessions_dir), "--session-memory-mb", str(memory_mb), "--max-batch", str(max_batch),
            "--max-requests", "512", "--max-sessions", "1000000", "--device", device, "--max-tokens-cap", "100000",
            "--max-body-mb", "64", "--dtype", dtype, *extra]
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


async def stream_one(c: httpx.AsyncClient, body: dict) -> tuple[float, float, int]:
    """One streamed completion: (seconds to its first token, seconds to its end, tokens)."""
    start = time.perf_counter()
    first, tokens = None, 0
    async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            n = len(event["choices"][0]["token_ids"])
            if n and first is None:
                first = time.perf_counter() - start
            tokens += n
    end = time.perf_counter() - start
    return (end if first is None else first), end, tokens


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def load(url: str, concurrency: int, requests: int, max_tokens: int, prompt_bytes: int = 64,
               tag: str = "") -> dict[str, float]:
    """``requests`` streamed completions from ``concurrency`` clients, no two prompts sharing a prefix."""
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = 0
    failures: list[str] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency)

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            head = f"{os.urandom(4).hex()} {tag}{concurrency}.{i}: "
            prompt = (head + "the quick brown fox jumps over the lazy dog. " * 100)[:prompt_bytes]
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": i}
            try:
                ttft, total, n = await stream_one(c, body)
            except (httpx.HTTPError, RuntimeError) as e:  # counted and shown: an overloaded server drops some
                failures.append(f"{type(e).__name__}: {e}")
                continue
            ttfts.append(ttft)
            latencies.append(total)
            tokens += n

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        before = (await c.get("/health")).json()
        start = time.perf_counter()
        await asyncio.gather(*[client(c) for _ in range(concurrency)])
        wall = time.perf_counter() - start
        after = (await c.get("/health")).json()
    # A request's first token comes from its prompt; every later one from a shared decode step.
    steps = after["decode_steps"] - before["decode_steps"]
    if failures:
        print(f"  {len(failures)} of {requests} requests failed, e.g. {failures[0]}", flush=True)
    return {"concurrency": concurrency, "requests": requests, "tokens": tokens, "wall_s": wall, "failed": len(failures),
            "mean_batch": (after["decode_rows"] - before["decode_rows"]) / max(steps, 1),
            "padded_rows": (after["decode_padded_rows"] - before["decode_padded_rows"]) / max(steps, 1),
            "tokens_per_s": tokens / wall, "requests_per_s": requests / wall,
            "ttft_p50_s": statistics.median(ttfts or [nan]), "ttft_p99_s": percentile(ttfts or [nan], 0.99),
            "p50_s": statistics.median(latencies or [nan]), "p99_s": percentile(latencies or [nan], 0.99)}


def fill_prefix_cache(url: str, limit: int = 200) -> None:
    """Requests sharing no prefix until the server's prefix cache evicts: the throughput test then sees a
    server's steady state (a cache being filled first costs new memory for every snapshot, once)."""
    sent = 0
    for i in range(limit):
        stats = httpx.get(f"{url}/health").json()["prefix_cache"]
        if stats["evictions"]:
            break
        asyncio.run(load(url, 16, 64, 1, tag=f"fill{i}-"))
        sent += 64
    print(f"prefix cache filled: {sent} requests, {stats['entries_in_memory']} snapshots "
          f"({stats['memory_bytes'] / MIB:.0f} MiB), evicting", flush=True)


def shared_document(url_cached: str, url_cold: str, doc_tokens: int, questions: int, cold_questions: int,
                    token_model: bool) -> dict:
    """Time to first token of questions about one long document, with and without the prefix cache."""
    words = ["the", "state", "of", "an", "SSM", "is", "a", "fixed", "size", "whatever", "the", "length", "of", "the", "text", "it", "has", "read"]
    rng = __import__("random").Random(0)
    # A byte model reads a byte per token; for a subword model the words come to about one token each.
    doc = " ".join(rng.choice(words) for _ in range(doc_tokens if token_model else doc_tokens // 4))
    doc = doc if token_model else doc[:doc_tokens]
    asks = [f"\nQuestion {i}: which word comes {i + 1} times?\nAnswer:" for i in range(questions)]

    async def ask(url: str, items: list[str]) -> list[float]:
        async with httpx.AsyncClient(base_url=url, timeout=3600) as c:
            return [(await stream_one(c, {"prompt": doc + q, "max_tokens": 4, "temperature": 0}))[0] for q in items]

    async def ask_at_once(url: str, other: str) -> list[float]:
        async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=questions)) as c:
            replies = [stream_one(c, {"prompt": other + q, "max_tokens": 4, "temperature": 0}) for q in asks]
            return [r[0] for r in await asyncio.gather(*replies)]

    cold = asyncio.run(ask(url_cold, asks[:cold_questions]))
    first = asyncio.run(ask(url_cached, asks[:1]))
    warm = asyncio.run(ask(url_cached, asks[1:]))
    stats = httpx.get(f"{url_cached}/health").json()["prefix_cache"]
    # Another document (nothing cached), all questions sent at once: one reads it, the others wait for it.
    together = asyncio.run(ask_at_once(url_cached, "Another document. " + doc))
    return {"doc_chars": len(doc), "questions": questions, "cold_ttft": cold, "first_ttft": first[0],
            "warm_ttft": warm, "together_ttft": together, "prefix_cache": stats}


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
        sessions, params = [], {"limit": 1000}
        while True:  # every session, page by page
            page = c.get("/v1/sessions", params=params).json()
            sessions += page["data"]
            if not page["has_more"]:
                break
            params["after"] = page["last_id"]
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
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 64, 256],
                        help="client counts of the throughput test (none: skip it)")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-bytes", type=int, default=64, help="length of each request's prompt")
    parser.add_argument("--sessions", type=int, default=1000, help="0: skip the memory test")
    parser.add_argument("--session-tokens", type=int, default=10_000)
    parser.add_argument("--distinct", action="store_true", help="every session reads its own text")
    parser.add_argument("--max-batch", type=int, default=256, help="the server's --max-batch")
    parser.add_argument("--dtype", default="auto", help="the server's --dtype (auto: bfloat16 on a GPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on cuda, states live in GPU memory: "
                        "the RSS figure then shows host memory only; the state bytes are the server's own count)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the server (OMP_NUM_THREADS)")
    parser.add_argument("--doc-tokens", type=int, default=16_000, help="shared document length (0: skip)")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--cold-questions", type=int, default=4, help="questions timed without the prefix cache")
    parser.add_argument("--prefix-cache-mb", type=float, default=None,
                        help="the cached server's --prefix-cache-mb (default its own, 1,024); filled before the "
                             "throughput test, so on a CPU pass less, e.g. 16")
    parser.add_argument("--rounds", type=int, default=3,
                        help="throughput rounds per level, each running both servers (order alternating); medians kept")
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
        cache_mb = [] if args.prefix_cache_mb is None else ["--prefix-cache-mb", str(args.prefix_cache_mb)]
        proc, url = start_server(checkpoint, tmp / "sessions", tmp / "server.log", memory_mb, args.threads, args.device,
                                  args.max_batch, args.dtype, *cache_mb)
        cold_proc, cold_url = start_server(checkpoint, tmp / "sessions-cold", tmp / "server-cold.log", memory_mb,
                                           args.threads, args.device, args.max_batch, args.dtype, "--no-prefix-cache")
        token_model = (checkpoint / "tokenizer.json").exists()
        try:
            for u in (url, cold_url):
                asyncio.run(load(u, 1, 2, 4, tag="warmup"))
            if args.concurrency:
                fill_prefix_cache(url)
            servers = {"on": (url, proc.pid), "off": (cold_url, cold_proc.pid)}
            rows = [ab_level(servers, c, max(args.requests, c), args) for c in args.concurrency]
            shared = (shared_document(url, cold_url, args.doc_tokens, args.questions, args.cold_questions, token_model)
                      if args.doc_tokens else None)
            memory = open_sessions(url, proc.pid, args.sessions, args.session_tokens, args.distinct) if args.sessions else None
        finally:
            for p in (proc, cold_proc):
                p.terminate()
                p.wait(30)
    if rows:
        report(rows, args)
    if memory is not None:
        report_memory(memory, model, args, state_bytes)
    if shared is not None:
        report_shared(shared)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    if args.json:
        args.json.write_text(json.dumps({"load": rows, "shared_document": shared, "memory": memory}, indent=2) + "\n")


def ab_level(servers: dict[str, tuple[str, int]], concurrency: int, requests: int, args: argparse.Namespace) -> dict:
    """One concurrency level on both servers (``servers``: "on" and "off" -> url, pid), ``args.rounds``
    interleaved rounds: medians, per-round ratios of tokens/s and of tokens per CPU second of the server."""
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    ratios, cpu_ratios = [], []
    for r in range(args.rounds):  # alternate the order: both servers see the same machine load
        for name in ("on", "off")[:: 1 if r % 2 == 0 else -1]:
            url, pid = servers[name]
            load_avg, cpu = os.getloadavg()[0], psutil.Process(pid).cpu_times()
            result = asyncio.run(load(url, concurrency, requests, args.max_tokens, args.prompt_bytes, tag=f"{name}{r}-"))
            after = psutil.Process(pid).cpu_times()
            cpu_s = (after.user + after.system) - (cpu.user + cpu.system)
            runs[name].append({**result, "load_average": load_avg, "tokens_per_cpu_s": result["tokens"] / max(cpu_s, 1e-9)})
        on, off = runs["on"][-1], runs["off"][-1]
        ratios.append(on["tokens_per_s"] / off["tokens_per_s"])
        cpu_ratios.append(on["tokens_per_cpu_s"] / off["tokens_per_cpu_s"])
        print(f"  {concurrency} clients, round {r + 1}: on {on['tokens_per_s']:.0f} tok/s (load {on['load_average']:.1f}), "
              f"off {off['tokens_per_s']:.0f} tok/s (load {off['load_average']:.1f}), on/off {ratios[-1]:.3f} "
              f"(by the server's CPU time {cpu_ratios[-1]:.3f})", flush=True)
    median = {k: {key: statistics.median(run[key] for run in v) for key in v[0]} for k, v in runs.items()}
    return {**median["on"], "off": median["off"], "round_ratios": ratios, "cpu_ratios": cpu_ratios, "rounds": runs}


def report_shared(shared: dict) -> None:
    cold, warm = shared["cold_ttft"], shared["warm_ttft"]
    cold_mean, warm_mean = statistics.mean(cold), statistics.mean(warm)
    stats = shared["prefix_cache"]
    print(f"\n## Shared document: {shared['doc_chars']:,} characters, {shared['questions']} questions one after another\n")
    print("| | questions | time to first token, mean | p50 | p99 |")
    print("|---|---:|---:|---:|---:|")
    print(f"| without the prefix cache | {len(cold)} | {cold_mean:.3f} s | {statistics.median(cold):.3f} s | "
          f"{percentile(cold, 0.99):.3f} s |")
    print(f"| with it, first question (reads the document) | 1 | {shared['first_ttft']:.3f} s | | |")
    print(f"| with it, the other questions | {len(warm)} | {warm_mean:.3f} s | {statistics.median(warm):.3f} s | "
          f"{percentile(warm, 0.99):.3f} s |")
    together = shared["together_ttft"]
    print(f"| with it, another document, all questions sent at once | {len(together)} | "
          f"{statistics.mean(together):.3f} s | {statistics.median(together):.3f} s | {percentile(together, 0.99):.3f} s |")
    print(f"\nWith the cache / without: {warm_mean / cold_mean:.4f} (1/{cold_mean / warm_mean:.0f}); prefix cache: "
          f"{stats['hits']} hits, {stats['misses']} misses, {stats['tokens_saved']:,} prompt tokens not read, "
          f"{stats['entries_in_memory']} snapshots ({stats['memory_bytes'] / MIB:.1f} MiB).")


def report(rows: list[dict], args: argparse.Namespace) -> None:
    base = rows[0]["tokens_per_s"]
    print(f"\n## Throughput: at least {args.requests} streamed requests per level, {args.prompt_bytes}-byte prompts "
          f"sharing no prefix, {args.max_tokens} new tokens each (sampled); medians of {args.rounds} interleaved "
          f"rounds per server\n")
    print("| clients | tokens/s | x vs 1 client | requests/s | first token p50 | p99 | latency p50 | p99 | "
          "rows per decode step | tokens/s, no prefix cache | first token p50, no prefix cache | cache on / off, "
          "median of rounds | min - max | per round | by the server's CPU time, median | min - max | load average |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|---|")
    for r in rows:
        off, ratios, cpu = r["off"], r["round_ratios"], r["cpu_ratios"]
        loads = [run["load_average"] for v in r["rounds"].values() for run in v]
        print(f"| {r['concurrency']:.0f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.1f} | "
              f"{r['requests_per_s']:.2f} | {r['ttft_p50_s']:.3f} s | {r['ttft_p99_s']:.3f} s | {r['p50_s']:.2f} s | "
              f"{r['p99_s']:.2f} s | {r['mean_batch']:.1f} | {off['tokens_per_s']:.0f} | {off['ttft_p50_s']:.3f} s | "
              f"**{statistics.median(ratios):.3f}** | {min(ratios):.3f} - {max(ratios):.3f} | "
              f"{', '.join(f'{x:.3f}' for x in ratios)} | {statistics.median(cpu):.3f} | {min(cpu):.3f} - {max(cpu):.3f} | "
              f"{min(loads):.1f} - {max(loads):.1f} |")


def report_memory(memory: dict, model: LanguageModel, args: argparse.Namespace, state_bytes: int) -> None:
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
