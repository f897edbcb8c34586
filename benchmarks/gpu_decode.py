"""Decoding speed on a GPU: the decode-step op, then tokens/s of one model decode step, eager vs CUDA graph.

Op table: ``selective_state_update`` (one step, state in place) at the shapes of mamba2-130m (24 heads of
64, N 128) and mamba-130m (1536 channels, N 16), bf16 inputs and float32 state: the Triton kernel vs the
vectorised torch step vs mamba_ssm's Triton kernel (from ``.ext/``, "n/a" if it does not import), µs
(triton.testing.do_bench median) and the floor (state read + written once, plus inputs, at 3.3 TB/s).

Model table: the ``mamba2-130m`` and ``mamba-130m`` presets (random weights: speed does not depend on
them) in bfloat16, at batch 1 and 64. A step is one token per row through the cache plus picking the
next token. Columns:

* eager / graph: steady-state tokens/s (batch × steps / s) of the greedy decode step, median of 5
  timings of 100 steps each, CUDA events;
* ratio: graph / eager;
* graph sep. step: the graph step with the fused decode-step kernels switched off (``ssmkit.ops.decode_step``,
  ``MAX_ROWS = 0``: the convolution update and the state update as separate kernels again, and Mamba blocks'
  x_proj / dt_proj as cuBLAS calls); step gain: graph / graph sep. step;
* graph unfused: the graph step with the fused norm + linear kernels switched off too (Mamba-2 blocks then
  run the pre-norm, ``in_proj``, the gated norm, ``out_proj`` and the residual add as separate ops, Mamba
  blocks the pre-norm and ``in_proj``);
* kernels: GPU kernels one eager step launches (torch.profiler), fused / sep. step / unfused;
* graph top-p: the same with sampling (temperature 1, top-p 0.9, seeded streams);
* floor: the memory-bandwidth bound, (weight bytes + 2 × cache bytes) per step at 3.3 TB/s (an H100/H200
  SXM's HBM3; the H200's is 4.8 TB/s), as tokens/s;
* generate(): end-to-end ``generate`` of 256 tokens after a 16-token prompt (prefill, graph capture and
  every eos check included), tokens/s.

    python benchmarks/gpu_decode.py
    python benchmarks/gpu_decode.py --models mamba2-130m --batches 1 --no-op-table
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from mamba_ssm_source import import_from_source

from ssmkit.generation.decode import DecodeState, GraphedStep, step
from ssmkit.generation.sampling import SamplingParams, make_generators
from ssmkit.models import LanguageModel, get_preset
from ssmkit.ops import decode_step, norm_linear
from ssmkit.ops.state_update import selective_state_update

BANDWIDTH = 3.3e12
STEPS = 100
GREEDY = SamplingParams(temperature=0)
TOP_P = SamplingParams(temperature=1.0, top_p=0.9)


def op_table() -> None:
    from triton.testing import do_bench

    theirs = import_from_source("mamba_ssm.ops.triton.selective_state_update", "selective_state_update")
    print("\nselective_state_update, bf16 inputs, fp32 state; µs per step")
    header = f"{'shape':<34} {'triton':>8} {'torch':>8} {'mamba_ssm':>10} {'floor':>7} {'torch/triton':>13}"
    print(header)
    print("-" * len(header))
    dev, bf = "cuda", torch.bfloat16
    for label, b, h, p, n in (("mamba2-130m b=1", 1, 24, 64, 128), ("mamba2-130m b=64", 64, 24, 64, 128),
                              ("mamba-130m b=1", 1, 1536, 1, 16), ("mamba-130m b=64", 64, 1536, 1, 16)):
        mamba1 = p == 1
        state = torch.randn((b, h, n) if mamba1 else (b, h, p, n), device=dev)
        x = torch.randn((b, h) if mamba1 else (b, h, p), device=dev, dtype=bf)
        dt = torch.randn((b, h), device=dev, dtype=bf)
        A = -torch.rand((h, n) if mamba1 else (h,), device=dev)
        B, C = (torch.randn(b, n, device=dev, dtype=bf) for _ in range(2))
        D, bias = torch.randn(h, device=dev), torch.randn(h, device=dev)
        z = torch.randn_like(x) if mamba1 else None
        kw = dict(D=D, z=z, dt_bias=bias, dt_softplus=True)
        ms = {be: do_bench(lambda be=be: selective_state_update(state, x, dt, A, B, C, **kw, backend=be))
              for be in ("triton", "chunked")}
        if theirs is None:
            ms["mamba_ssm"] = None
        elif mamba1:
            ms["mamba_ssm"] = do_bench(lambda: theirs(state, x, dt, A, B, C, **kw))
        else:
            # mamba_ssm takes per-channel tensors; Mamba2.step passes broadcast views, as here.
            dt3, A3 = dt[..., None].expand(b, h, p), A[:, None, None].expand(h, p, n)
            D2, bias2 = D[:, None].expand(h, p), bias[:, None].expand(h, p)
            ms["mamba_ssm"] = do_bench(lambda: theirs(state, x, dt3, A3, B, C, D=D2, dt_bias=bias2, dt_softplus=True))
        floor_us = (2 * state.numel() * 4 + 3 * x.numel() * 2) / BANDWIDTH * 1e6
        ref = "n/a" if ms["mamba_ssm"] is None else f"{ms['mamba_ssm'] * 1e3:.1f}"
        print(f"{label:<34} {ms['triton'] * 1e3:>8.1f} {ms['chunked'] * 1e3:>8.1f} {ref:>10} {floor_us:>7.2f} "
              f"{ms['chunked'] / ms['triton']:>12.1f}x", flush=True)


def _decode_state(model: LanguageModel, batch: int, params: SamplingParams) -> tuple[DecodeState, torch.Tensor]:
    device = model.embedding.weight.device
    cache = model.allocate_cache(batch)
    prompt = torch.randint(0, model.config.vocab_size, (batch, 16), device=device)
    with torch.no_grad():
        model(prompt, cache=cache)
    state = DecodeState(cache, params, model.config.vocab_size, make_generators(0, batch, device),
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


def _step_rates(model: LanguageModel, batch: int, params: SamplingParams) -> tuple[float, float, DecodeState, int]:
    """Eager and graph-replayed tokens/s of the decode step, and the kernels one step launches."""
    state, token = _decode_state(model, batch, params)
    holder = [token]

    def eager() -> None:
        holder[0] = step(model, holder[0], state)

    for _ in range(3):
        eager()
    eager_s = _time(eager)
    graph_s = _time(GraphedStep(model, holder[0], state).replay)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        eager()
        torch.cuda.synchronize()
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return batch * STEPS / eager_s, batch * STEPS / graph_s, state, kernels


def _switched_off_rates(model: LanguageModel, batch: int, *, step: bool, norm_linear_too: bool) -> tuple[float, int]:
    """Graph tokens/s and kernels per step with the fused decode-step kernels switched off (``step``: the
    conv update and the state update as separate kernels again) and, with ``norm_linear_too``, the fused
    norm + linear kernels as well (the whole unfused step)."""
    saved = decode_step.MAX_ROWS, norm_linear.MAX_ROWS
    decode_step.MAX_ROWS = 0 if step else saved[0]
    norm_linear.MAX_ROWS = 0 if norm_linear_too else saved[1]
    try:
        _, graph, _, kernels = _step_rates(model, batch, GREEDY)
    finally:
        decode_step.MAX_ROWS, norm_linear.MAX_ROWS = saved
    return graph, kernels


@torch.no_grad()
def measure(name: str, batch: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = LanguageModel(get_preset(name), device="cuda", dtype=torch.bfloat16).eval()
    eager, graph, state, kernels = _step_rates(model, batch, GREEDY)
    _, graph_top_p, _, _ = _step_rates(model, batch, TOP_P)
    graph_sep, kernels_sep = _switched_off_rates(model, batch, step=True, norm_linear_too=False)
    graph_unfused, kernels_unfused = _switched_off_rates(model, batch, step=True, norm_linear_too=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor_s = (weight_bytes + 2 * state.cache.nbytes) / BANDWIDTH
    prompts = torch.randint(0, model.config.vocab_size, (batch, 16), device="cuda")
    model.generate(prompts, 32, temperature=1.0, top_p=0.9, seed=0)  # warm-up (compilation)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(prompts, 256, temperature=1.0, top_p=0.9, seed=0)
    torch.cuda.synchronize()
    e2e = batch * 256 / (time.perf_counter() - start)
    return {"eager": eager, "graph": graph, "graph_top_p": graph_top_p, "floor": batch / floor_s, "e2e": e2e,
            "graph_sep": graph_sep, "graph_unfused": graph_unfused,
            "kernels": f"{kernels}/{kernels_sep}/{kernels_unfused}",
            "weights_mb": weight_bytes / 1e6, "cache_mb": state.cache.nbytes / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description="decode speed on a GPU")
    parser.add_argument("--models", nargs="+", default=["mamba2-130m", "mamba-130m"], help="presets to time")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 64], help="batch sizes")
    parser.add_argument("--no-op-table", action="store_true", help="skip the selective_state_update table")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}")
    if not args.no_op_table:
        op_table()
    print("\ndecode step, bfloat16 weights, float32 SSM states; tokens/s")
    header = (f"{'model':<12} {'batch':>5} {'eager':>10} {'graph':>10} {'ratio':>6} {'graph sep. step':>15} "
              f"{'step gain':>9} {'graph unfused':>14} {'kernels':>12} {'graph top-p':>12} {'floor':>10} {'generate()':>11} {'weights MB':>10} {'cache MB':>9}")
    print(header)
    print("-" * len(header))
    for name in args.models:
        for batch in args.batches:
            r = measure(name, batch)
            print(f"{name:<12} {batch:>5} {r['eager']:>10.0f} {r['graph']:>10.0f} {r['graph'] / r['eager']:>5.1f}x "
                  f"{r['graph_sep']:>15.0f} {r['graph'] / r['graph_sep']:>8.2f}x {r['graph_unfused']:>14.0f} {r['kernels']:>12} "
                  f"{r['graph_top_p']:>12.0f} {r['floor']:>10.0f} {r['e2e']:>11.0f} {r['weights_mb']:>10.1f} {r['cache_mb']:>9.1f}", flush=True)
    print("targets (issue 17): >= 5,000 tokens/s at batch 1 for mamba2-130m, >= 4,000 for mamba-130m (graph column, "
          "greedy); >= 60,000 for mamba2-130m at batch 64")


if __name__ == "__main__":
    main()
