"""Decoding speed on a GPU: tokens/s of one decode step, eager vs replayed from a CUDA graph.

Models: the ``mamba2-130m`` and ``mamba-130m`` presets (random weights: speed does not depend on them)
in bfloat16, at batch 1 and 64. A step is one token per row through the cache plus sampling
(temperature 1, top-p 0.9, seeded). Columns:

* eager / graph: steady-state tokens/s (batch × steps / s) of the decode step, median of 5 timings of
  100 steps each, CUDA events;
* ratio: graph / eager;
* floor: the memory-bandwidth bound, (weight bytes + 2 × cache bytes) per step at 3.3 TB/s (an H100/H200
  SXM's HBM3; the H200's is 4.8 TB/s), as tokens/s;
* generate(): end-to-end ``generate`` of 256 tokens after a 16-token prompt (prefill, graph capture and
  every eos check included), tokens/s.

    python benchmarks/gpu_decode.py
"""

from __future__ import annotations

import statistics
import time

import torch

from ssmkit.generation.decode import DecodeState, GraphedStep, step
from ssmkit.generation.sampling import SamplingParams, make_generators
from ssmkit.models import LanguageModel, get_preset

BANDWIDTH = 3.3e12
STEPS = 100
PARAMS = SamplingParams(temperature=1.0, top_p=0.9)


def _decode_state(model: LanguageModel, batch: int) -> tuple[DecodeState, torch.Tensor]:
    device = model.embedding.weight.device
    cache = model.allocate_cache(batch)
    prompt = torch.randint(0, model.config.vocab_size, (batch, 16), device=device)
    with torch.no_grad():
        model(prompt, cache=cache)
    state = DecodeState(cache, PARAMS, model.config.vocab_size, make_generators(0, batch, device),
                        torch.zeros(0, dtype=torch.long, device=device),
                        torch.zeros(batch, dtype=torch.bool, device=device), None)
    return state, prompt[:, -1].clone()


def _time(fn, repeats: int = 5) -> float:
    """Median seconds of ``STEPS`` calls of fn."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(STEPS):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


@torch.no_grad()
def measure(name: str, batch: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = LanguageModel(get_preset(name), device="cuda", dtype=torch.bfloat16).eval()
    state, token = _decode_state(model, batch)
    holder = [token]

    def eager() -> None:
        holder[0] = step(model, holder[0], state)

    for _ in range(3):
        eager()
    eager_s = _time(eager)
    graphed = GraphedStep(model, holder[0], state)
    graph_s = _time(graphed.replay)

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor_s = (weight_bytes + 2 * state.cache.nbytes) / BANDWIDTH
    prompts = torch.randint(0, model.config.vocab_size, (batch, 16), device="cuda")
    model.generate(prompts, 32, temperature=1.0, top_p=0.9, seed=0)  # warm-up (compilation)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(prompts, 256, temperature=1.0, top_p=0.9, seed=0)
    torch.cuda.synchronize()
    e2e = batch * 256 / (time.perf_counter() - start)
    return {"eager": batch * STEPS / eager_s, "graph": batch * STEPS / graph_s, "floor": batch / floor_s,
            "e2e": e2e, "weights_mb": weight_bytes / 1e6, "cache_mb": state.cache.nbytes / 1e6}


def main() -> None:
    print(f"device: {torch.cuda.get_device_name()}; bfloat16 weights, float32 SSM states; tokens/s")
    header = (f"{'model':<12} {'batch':>5} {'eager':>10} {'graph':>10} {'ratio':>6} {'floor':>10} "
              f"{'generate()':>11} {'weights MB':>10} {'cache MB':>9}")
    print(header)
    print("-" * len(header))
    for name in ("mamba2-130m", "mamba-130m"):
        for batch in (1, 64):
            r = measure(name, batch)
            print(f"{name:<12} {batch:>5} {r['eager']:>10.0f} {r['graph']:>10.0f} {r['graph'] / r['eager']:>5.1f}x "
                  f"{r['floor']:>10.0f} {r['e2e']:>11.0f} {r['weights_mb']:>10.1f} {r['cache_mb']:>9.1f}", flush=True)
    print("target: >= 3000 tokens/s at batch 1 for mamba2-130m (graph column)")


if __name__ == "__main__":
    main()
