"""CPU decode kernels, ssmkit's native ones beside torch's: one decode step's worth of matmuls and states.

For a model preset (random weights of its shapes, every layer its own tensors so that nothing stays in
cache between layers, as in a real step) the script times, interleaved over rounds (median), the
batch-1 matmuls of all layers plus the head by:

- float32: ``F.linear`` (MKL);
- bfloat16: ``torch.mv`` (the lean step's fallback) and ssmkit's native GEMV (:mod:`ssmkit.ops.gemv`);
- int8 with per-row scales: ``aten._weight_int8pack_mm`` (bfloat16 activations) and ssmkit's native GEMV;

and, for Mamba-2 presets, the state updates of all layers by torch's ops (three passes) and the native
one-pass step (:mod:`ssmkit.ops.state_update.native`). Printed: ms per step and GB/s of weights or
state, beside a streaming read of a large buffer; with ``--cpu-time`` the thread's CPU time instead of
wall time (on a loaded machine, closer to what the work costs unloaded).

    python benchmarks/cpu_decode_kernels.py --preset mamba2-130m --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from ssmkit.models import LanguageModel, get_preset
from ssmkit.ops.gemv import native_available, native_linear
from ssmkit.ops.state_update.native import native_ssd_step


def shapes_of(preset: str) -> list[tuple[int, int]]:
    """(n, k) of every matmul in one decode step: each layer's linear modules in order, then the head
    (read off the model built on the "meta" device: nothing allocated)."""
    model = LanguageModel(get_preset(preset), device=torch.device("meta"))
    shapes = [tuple(m.weight.shape) for m in model.layers.modules() if isinstance(m, torch.nn.Linear)]
    return shapes + [tuple(model.head_weight.shape)]


def timed(fns: dict[str, Callable[[], object]], rounds: int, cpu_time: bool) -> dict[str, float]:
    clock = time.thread_time if cpu_time else time.perf_counter
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            fn()
            samples[name].append(clock() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mamba2-130m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cpu-time", action="store_true", help="thread CPU time (one thread only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not native_available():
        raise SystemExit("the native kernels are not built here (no C compiler, or SSMKIT_NATIVE=0)")
    torch.manual_seed(0)
    shapes = shapes_of(args.preset)
    q = [torch.randint(-127, 128, s, dtype=torch.int8) for s in shapes]
    scales = [torch.rand(s[0]) * 0.01 for s in shapes]
    w32 = [qi.float() * si[:, None] for qi, si in zip(q, scales)]
    w16 = [w.bfloat16() for w in w32]
    x32 = [torch.randn(1, s[1]) for s in shapes]
    x16 = [x.bfloat16() for x in x32]
    s16 = [s.bfloat16() for s in scales]
    n16, n8 = [native_linear(w) for w in w16], [native_linear(qi, si) for qi, si in zip(q, scales)]
    elements = sum(n * k for n, k in shapes)
    buffer = torch.ones(128 << 20)
    with torch.inference_mode():
        fns = {
            "streaming read (sum of 512 MB)": lambda: buffer.sum(),
            "fp32 F.linear": lambda: [torch.nn.functional.linear(x, w) for x, w in zip(x32, w32)],
            "bf16 torch.mv": lambda: [torch.mv(w, x[0]) for x, w in zip(x16, w16)],
            "bf16 ssmkit native": lambda: [f(x) for x, f in zip(x32, n16)],
            "int8 torch _weight_int8pack_mm": lambda: [torch.ops.aten._weight_int8pack_mm(x, qi, s)
                                                       for x, qi, s in zip(x16, q, s16)],
            "int8 ssmkit native": lambda: [f(x) for x, f in zip(x32, n8)],
        }
        bytes_of = {"streaming read (sum of 512 MB)": buffer.numel() * 4, "fp32 F.linear": elements * 4,
                    "bf16 torch.mv": elements * 2, "bf16 ssmkit native": elements * 2,
                    "int8 torch _weight_int8pack_mm": elements, "int8 ssmkit native": elements}
        config = get_preset(args.preset)
        if set(config.layer_pattern) == {"2"}:
            m2 = config.mamba2
            h, p, n, g = m2.expand * config.d_model // m2.headdim, m2.headdim, m2.d_state, m2.ngroups
            states = [torch.randn(1, h, p, n) for _ in range(config.n_layer)]
            x, delta, decay = torch.randn(1, h, p), torch.rand(1, h), torch.rand(1, h)
            B, C = torch.randn(1, g, n), torch.randn(1, g, n)
            fused = native_ssd_step()

            def torch_states() -> None:
                for s in states:
                    v = s.mul_(decay.view(1, h, 1, 1)).view(1, g, h // g, p, n)
                    v.addcmul_((delta.unsqueeze(-1) * x).view(1, g, h // g, p, 1), B.view(1, g, 1, 1, n))
                    torch.matmul(v.view(g, -1, n), C.view(g, n, 1))
            fns["Mamba-2 states: torch (3 passes)"] = torch_states
            fns["Mamba-2 states: ssmkit native (1 pass)"] = lambda: [fused(s, x, delta, decay, B, C) for s in states]
            state_bytes = sum(s.numel() * 4 for s in states)
            bytes_of["Mamba-2 states: torch (3 passes)"] = bytes_of["Mamba-2 states: ssmkit native (1 pass)"] = state_bytes
        result = timed(fns, args.rounds, args.cpu_time)
    clock = "thread CPU time" if args.cpu_time else "wall time"
    print(f"{args.preset}, {args.threads} thread(s), torch {torch.__version__}, {clock}, median of {args.rounds}")
    print("| kernel | ms per decode step | GB/s (weights or state bytes, once) |")
    print("|---|---|---|")
    for name, seconds in result.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {bytes_of[name] / seconds / 1e9:.1f} |")


if __name__ == "__main__":
    main()
