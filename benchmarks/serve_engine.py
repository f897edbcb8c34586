"""The ``ssmkit serve`` engine alone (no HTTP, no tokenizer): concurrent requests on a preset with random weights.

What ``benchmarks/serve.py`` measures through a real server, without the HTTP stack and the client in
the way, so the engine's own rate shows (on a GPU the engine outruns one Python HTTP client): for each
concurrency c (default 1, 8, 64, 256), ``--requests`` requests (at least 2c) of ``--prompt-tokens``
random tokens (no two share a prefix) and ``--max-new-tokens`` new tokens each (sampled, temperature 1,
own seed), with c in flight at all times. Reported: generated tokens/s, requests/s, time to first token
p50/p99 (from submission), time between tokens p50 at that concurrency (1 client: the streaming rate of
one request), rows per decode step, padding rows per step (CUDA-graph buckets), graphs captured -- with
the prefix cache (every request planned and snapshotted as the server does) and without.

**Cache on / off** (issue 22: the cache must never cost more than 5% with no shared prefix). One run of a
level takes seconds, and the machine's speed drifts by more than 5% over that (other work, clocks), so
the two are compared in ``--rounds`` rounds, each one run with the cache and one without, back to back,
the order alternating (on-off, off-on, ...: a drift within a round falls on each side alike); a round's
ratio compares two runs made under the same conditions. Reported per level: each round's ratio, their
**median** and their range (min-max), the same for tokens per CPU second of the process (on a CPU shared
with other work, the engine's own cost: time spent waiting for a core is not counted), the prefix-cache
hits while timed (must be 0: no prompt shares a prefix) and the load average at each run; the other
figures are medians over the rounds. What the cache costs is shown too: prefill forwards a run and rows
each (the same on and off: a prompt that shares nothing is read in the same batches), the host time of
its plans (the submitting thread) and of its snapshot stores (the engine's), how long the first tokens
of one prefill turn took to send (median over turns: the same on and off when no store comes between
them), and the memory segments the CUDA allocator added while timed (each a ``cudaMalloc``). Random
weights: speed does not depend on them (every request runs to its max tokens: no eos).

Each concurrency level first runs untimed, once with the cache and once without (the engine captured its
graphs at start; this compiles the kernels for the prefill shapes of its arrivals, and fills the level's
prefix cache to its memory budget, which grows the memory allocator's pool once: from then on each
snapshot stored evicts one, as in a server that has run a while), and "graphs captured while timed" must
read 0: a variant timed first must not pay for first uses the others then skip. ``--serial`` adds a third variant, the
cache off and the engine's overlap off (each step's tokens read before the next step is launched).

    python benchmarks/serve_engine.py                                   # byte-small on the CPU
    python benchmarks/serve_engine.py --preset mamba2-130m --device cuda --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time

import torch

from ssmkit.generation.sampling import SamplingParams
from ssmkit.models import LanguageModel, get_preset
from ssmkit.models.loading import resolve_dtype
from ssmkit.serve.batching import Engine, GenerationRequest
from ssmkit.serve.prefix_cache import PrefixCache

MIB = 1 << 20


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _segments(device: torch.device) -> int:
    """Memory segments the CUDA caching allocator has allocated so far (0 on a CPU)."""
    return torch.cuda.memory_stats(device).get("segment.all.allocated", 0) if device.type == "cuda" else 0


def run_level(engine: Engine, prefix: PrefixCache | None, concurrency: int, requests: int, prompt_tokens: int,
              new_tokens: int, seed: int) -> dict[str, float]:
    """``requests`` requests, ``concurrency`` in flight at all times; timings from the engine's callbacks."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model.config.vocab_size
    prompts = torch.randint(0, vocab, (requests, prompt_tokens), generator=g).tolist()
    for i, p in enumerate(prompts):  # distinct first blocks: no shared prefix at all
        p[:4] = [(seed * 7919 + i * 4 + k) % vocab for k in range(4)]
    slots = threading.Semaphore(concurrency)
    all_done = threading.Event()
    lock = threading.Lock()
    ttft: list[float] = []
    gaps: list[float] = []
    # First tokens sent by one prefill turn, keyed by the engine's prefill forwards so far (one per batch).
    firsts: dict[int, list[float]] = {}
    produced = [0]
    finished = [0]
    failures: list[str] = []

    def submit(i: int) -> None:
        start = time.perf_counter()
        last = [start]

        def on_token(token: int) -> bool:
            now = time.perf_counter()
            with lock:
                (ttft if last[0] == start else gaps).append(now - last[0])
                produced[0] += 1
                if last[0] == start:
                    firsts.setdefault(engine.prefills, []).append(now)
            last[0] = now
            return False

        def on_done(reason: str, cache: object) -> None:
            with lock:
                finished[0] += 1
                if reason not in ("stop", "length"):
                    failures.append(reason)
                if finished[0] == requests:
                    all_done.set()
            slots.release()

        plan = None
        if prefix is not None:  # planned as the server plans it (may wait for a leader: none here)
            t = time.perf_counter()
            plan = prefix.plan(prompts[i], may_wait=True)
            spent["plan"] += time.perf_counter() - t
            if plan.leader is not None:
                raise RuntimeError("a prompt sharing no prefix was given a leader to wait for")
        engine.submit(GenerationRequest(ids=prompts[i], max_new_tokens=new_tokens, params=SamplingParams(temperature=1.0),
                                        seed=seed + i, on_token=on_token, on_done=on_done, prefix=plan))

    # Host time the cache costs: plans on this thread, snapshots stored on the engine's.
    spent = {"plan": 0.0, "store": 0.0}
    if prefix is not None:
        store = prefix.store

        def timed_store(*args, **kwargs) -> None:
            t = time.perf_counter()
            store(*args, **kwargs)
            spent["store"] += time.perf_counter() - t

        prefix.store = timed_store  # type: ignore[method-assign]
    # New memory segments of the device allocator (each a cudaMalloc) while timed: 0 once it is warm.
    segments = _segments(engine.device)
    steps, rows, padded = engine.steps, engine.decoder.rows, engine.decoder.padded_rows
    prefills, prefill_rows = engine.prefills, engine.prefill_rows
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(requests):
        slots.acquire()
        submit(i)
    all_done.wait()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    if prefix is not None:
        del prefix.store
    if failures:
        raise RuntimeError(f"requests failed: {failures[:3]}")
    steps = max(engine.steps - steps, 1)
    return {"tokens_per_s": produced[0] / wall, "tokens_per_cpu_s": produced[0] / max(cpu, 1e-9),
            "requests_per_s": requests / wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": percentile(ttft, 0.99),
            "gap_p50_s": statistics.median(gaps) if gaps else 0.0,
            "rows_per_step": (engine.decoder.rows - rows) / steps, "padded_per_step": (engine.decoder.padded_rows - padded) / steps,
            "first_spread_ms": statistics.median(max(t) - min(t) for t in firsts.values()) * 1e3,
            "prefills": engine.prefills - prefills, "plan_ms": spent["plan"] * 1e3, "store_ms": spent["store"] * 1e3,
            "new_segments": _segments(engine.device) - segments,
            "rows_per_prefill": (engine.prefill_rows - prefill_rows) / max(engine.prefills - prefills, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="byte-small")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: 2 x concurrency, >= 8)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--prefill-budget", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per level, each one run with the cache and one "
                        "without (order alternating); 5 or more to bound the on / off ratio")
    parser.add_argument("--prefix-cache-mb", type=float, default=1024, help="the prefix cache's memory budget (the "
                        "server's default; filled before timing: on a CPU pass less, e.g. 64)")
    parser.add_argument("--no-cuda-graph", action="store_true")
    parser.add_argument("--no-ab", action="store_true", help="only the prefix cache off (half the time)")
    parser.add_argument("--serial", action="store_true", help="also time the engine with its overlap off")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    model = LanguageModel(get_preset(args.preset), device=device, dtype=dtype).eval()
    engine = Engine(model, max_batch=args.max_batch, max_requests=max(args.concurrency) + 8,
                    prefill_budget=args.prefill_budget, cuda_graph=False if args.no_cuda_graph else None)
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"# ssmkit serve engine: {args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{dtype}), {name}, torch {torch.__version__}, CUDA graphs {'on' if engine.cuda_graph else 'off'}, "
          f"{args.prompt_tokens}-token prompts, {args.max_new_tokens} new tokens, load average {os.getloadavg()[0]:.1f}")
    start = time.perf_counter()
    engine.start()
    print(f"engine start: {time.perf_counter() - start:.2f} s, {engine.decoder.captures} graphs captured", flush=True)
    servers = (["off"] if args.no_ab else ["on", "off"]) + (["serial"] if args.serial else [])
    overlap = engine.overlap  # the engine's default: on a GPU
    rows = []
    try:
        for c in args.concurrency:
            n = args.requests or max(8, 2 * c)
            # One cache for the level's runs (no prompt is ever repeated: no hits), full before timing starts.
            cache = None if args.no_ab else PrefixCache(model, memory_budget=int(args.prefix_cache_mb * MIB))
            # Warm-up: this level's workload untimed, without the cache and with it (the prefill shapes its
            # arrivals make; the cache's snapshots and the memory they take), with as many requests as fill
            # its budget: from then on it evicts.
            run_level(engine, None, c, n, args.prompt_tokens, args.max_new_tokens, seed=10**6 + c)
            if cache is not None:
                fill = cache.memory_budget // max(model.cache_nbytes(1), 1) + 1
                run_level(engine, cache, c, max(n, fill), args.prompt_tokens, args.max_new_tokens, seed=2 * 10**6 + c)
            runs: dict[str, list[dict]] = {s: [] for s in servers}
            for r in range(args.rounds):
                for s in servers[:: 1 if r % 2 == 0 else -1]:
                    prefix = cache if s == "on" else None
                    engine.overlap = overlap and s != "serial"
                    load_avg, captures = os.getloadavg()[0], engine.decoder.captures
                    hits = 0 if prefix is None else prefix.counts["hits"]
                    runs[s].append({**run_level(engine, prefix, c, n, args.prompt_tokens, args.max_new_tokens,
                                                seed=1000 * r + c), "load": load_avg,
                                    "captures": engine.decoder.captures - captures,
                                    "hits": 0 if prefix is None else prefix.counts["hits"] - hits})
                    engine.overlap = overlap
                on, off = runs["on"][-1] if not args.no_ab else None, runs["off"][-1]
                ratio = "" if on is None else (f", on/off {on['tokens_per_s'] / off['tokens_per_s']:.3f} "
                                               f"(by CPU time {on['tokens_per_cpu_s'] / off['tokens_per_cpu_s']:.3f})")
                print(f"  {c} clients, round {r + 1}: " + ", ".join(
                    f"{s} {runs[s][-1]['tokens_per_s']:.0f} tok/s, {runs[s][-1]['prefills']} prefills "
                    f"({runs[s][-1]['rows_per_prefill']:.1f} rows), first token p50 {runs[s][-1]['ttft_p50_s'] * 1e3:.1f} ms "
                    f"(a turn's spread over {runs[s][-1]['first_spread_ms']:.2f} ms), "
                    f"plans {runs[s][-1]['plan_ms']:.1f} ms, stores {runs[s][-1]['store_ms']:.1f} ms, "
                    f"{runs[s][-1]['new_segments']} new segments (load {runs[s][-1]['load']:.1f})" for s in servers)
                    + ratio, flush=True)
            # Medians, but graphs captured and prefix hits summed over the rounds.
            rows.append((c, n, {s: {**{k: statistics.median(x[k] for x in v) for k in v[0]},
                                    "captures": sum(x["captures"] for x in v), "hits": sum(x["hits"] for x in v),
                                    "load_min": min(x["load"] for x in v), "load_max": max(x["load"] for x in v)}
                                for s, v in runs.items()},
                         {k: [a[k] / b[k] for a, b in zip(runs["on"], runs["off"])]
                          for k in ("tokens_per_s", "tokens_per_cpu_s")} if not args.no_ab else {}))
    finally:
        engine.stop()
    report(rows, engine, args)


def report(rows: list, engine: Engine, args: argparse.Namespace) -> None:
    main_key = "off" if args.no_ab else "on"
    print(f"\n## Engine throughput, medians of {args.rounds} rounds (prefix cache {main_key})\n")
    serial = "| tokens/s, overlap off (cache off) " if args.serial else ""
    print("| clients | requests | tokens/s | requests/s | first token p50 | p99 | between tokens p50 (streaming tokens/s) | "
          f"rows per step | padding rows per step | tokens/s, cache off | first token p50, cache off {serial}| "
          "graphs captured while timed |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.serial else "") + "---:|")
    for c, n, med, _ in rows:
        m, off = med[main_key], med["off"]
        extra = f"{med['serial']['tokens_per_s']:,.0f} | " if args.serial else ""
        captured = sum(v["captures"] for v in med.values())
        print(f"| {c} | {n} | {m['tokens_per_s']:,.0f} | {m['requests_per_s']:.1f} | {m['ttft_p50_s'] * 1e3:.1f} ms | "
              f"{m['ttft_p99_s'] * 1e3:.1f} ms | {m['gap_p50_s'] * 1e3:.2f} ms ({1 / max(m['gap_p50_s'], 1e-9):,.0f}) | "
              f"{m['rows_per_step']:.1f} | "
              f"{m['padded_per_step']:.1f} | {off['tokens_per_s']:,.0f} | {off['ttft_p50_s'] * 1e3:.1f} ms | {extra}"
              f"{captured:.0f} |")
    if not args.no_ab:
        # Tokens per CPU second of the process: on a CPU the engine's own cost, whatever else runs beside it
        # (on a GPU the host mostly waits, so only the tokens/s ratio means something there).
        print(f"\n## Prefix cache on / off, no shared prefix ({args.rounds} rounds, order alternating)\n")
        print("| clients | tokens/s on / off, median of rounds | min - max | per round | tokens per CPU second "
              "on / off, median | min - max | prefix hits while timed | prefill forwards a run on / off (rows each) | "
              "host ms a run in plans / stores | a turn's first tokens spread over, on / off | "
              "new allocator segments on / off | load average during the runs |")
        print("|---:|---:|---|---|---:|---|---:|---|---|---|---|---|")
        for c, _, med, ratios in rows:
            loads = [x for s in ("on", "off") for x in (med[s]["load_min"], med[s]["load_max"])]
            wall, cpu = ratios["tokens_per_s"], ratios["tokens_per_cpu_s"]
            on, off = med["on"], med["off"]
            print(f"| {c} | **{statistics.median(wall):.3f}** | {min(wall):.3f} - {max(wall):.3f} | "
                  f"{', '.join(f'{x:.3f}' for x in wall)} | {statistics.median(cpu):.3f} | "
                  f"{min(cpu):.3f} - {max(cpu):.3f} | {on['hits']} | {on['prefills']:.0f} ({on['rows_per_prefill']:.1f}) / "
                  f"{off['prefills']:.0f} ({off['rows_per_prefill']:.1f}) | {on['plan_ms']:.1f} / {on['store_ms']:.1f} | "
                  f"{on['first_spread_ms']:.2f} / {off['first_spread_ms']:.2f} ms | "
                  f"{on['new_segments']:.0f} / {off['new_segments']:.0f} | {min(loads):.1f} - {max(loads):.1f} |")
    print(f"\nCUDA graphs captured: {engine.decoder.captures}; load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
