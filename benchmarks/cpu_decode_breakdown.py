"""Where a CPU decode token goes: the lean step (``generate``'s on CPU) timed callable by callable.

For each preset and weight type, random weights (seed 0; out_proj x 16 as in ``cpu_llamacpp.py``), batch 1,
greedy single-token steps from a cache: the token's wall time, then the same steps with every callable the
lean step holds wrapped in a timer (per block: the matmuls ``in_proj``, ``x_proj``, ``out_proj``, the native
calls ``conv`` (convolution), ``selective_step`` / ``mamba2_step`` / ``mamba2_conv_step`` (state steps) and
``layer_step`` (a whole block in one call, matmuls inside); the head), ms per token each, and the rest
(norms, dt_proj in torch, casts, residual adds, Python and dispatch, embedding, argmax). The wrappers
cost about a microsecond a call. ``--no-layer-step`` times the path the one-call block steps replace.

    OMP_NUM_THREADS=1 python benchmarks/cpu_decode_breakdown.py --threads 1
    OMP_NUM_THREADS=1 python benchmarks/cpu_decode_breakdown.py --models mamba-130m --no-layer-step
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import time
from collections.abc import Callable

import torch

from ssmkit.generation.lean import lean_decoder
from ssmkit.models import LanguageModel, get_preset

TIMED = ("in_proj", "x_proj", "out_proj", "in_f32", "out_f32", "selective_step", "mamba2_step", "mamba2_conv_step",
         "fused_step", "layer_step")


def make(preset: str, kind: str) -> LanguageModel:
    torch.manual_seed(0)
    model = LanguageModel(get_preset(preset)).eval()
    with torch.no_grad():
        for block in model.layers:
            block.mixer.out_proj.weight.mul_(16)
    if kind == "bf16":
        return model.to(torch.bfloat16)
    return model.quantize("int8") if kind == "int8" else model


def breakdown(model: LanguageModel, tokens: int, layer_step: bool) -> tuple[float, dict[str, float]]:
    """(wall ms per token, {callable: ms per token}, the rest under "rest")."""
    spent: dict[str, float] = collections.defaultdict(float)

    def timed(name: str, fn: Callable) -> Callable:
        def wrapper(*args):
            start = time.perf_counter()
            out = fn(*args)
            spent[name] += time.perf_counter() - start
            return out
        return wrapper

    cache = model.allocate_cache(1)
    with torch.no_grad():
        lean = copy.copy(lean_decoder(model, cache))
        lean.steps = [copy.copy(step) for step in lean.steps]
        for step in lean.steps:
            if not layer_step:
                step.layer_step = None
        token = lean(torch.tensor([1]), cache).argmax(-1)
        start = time.perf_counter()
        for _ in range(tokens):
            token = lean(token, cache).argmax(-1)
        plain = (time.perf_counter() - start) / tokens
        for step in lean.steps:
            for name in TIMED:
                if getattr(step, name, None) is not None:
                    setattr(step, name, timed(name, getattr(step, name)))
            step.conv = copy.copy(step.conv)
            if step.conv.native is not None:
                step.conv.native = timed("conv", step.conv.native)
        lean.head = timed("head", lean.head)
        start = time.perf_counter()
        for _ in range(tokens):
            token = lean(token, cache).argmax(-1)
        total = (time.perf_counter() - start) / tokens
    parts = {name: 1e3 * seconds / tokens for name, seconds in spent.items()}
    parts["rest"] = 1e3 * total - sum(parts.values())
    return 1e3 * plain, parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mamba-130m", "mamba2-130m"])
    parser.add_argument("--types", nargs="+", default=["fp32", "bf16", "int8"], choices=["fp32", "bf16", "int8"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--no-layer-step", action="store_true", help="the path without the one-call block steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()}")
    for preset in args.models:
        for kind in args.types:
            plain, parts = breakdown(make(preset, kind), args.tokens, not args.no_layer_step)
            cells = ", ".join(f"{name} {ms:.2f}" for name, ms in parts.items())
            print(f"{preset} {kind}: {plain:.2f} ms/token ({1e3 / plain:.1f} tokens/s); timed: {cells} ms", flush=True)


if __name__ == "__main__":
    main()
