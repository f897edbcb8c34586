"""CPU benchmark of Mamba-3's chunked scan at long lengths: blocks of chunks vs the whole sequence at once.

The chunked backend computes long sequences in blocks of chunks so that its temporaries stay bounded;
one block of the whole length is the former behaviour (whole-sequence temporaries), reachable only
through ``block_chunks``. Both run side by side in one process, at the op shape of ``ssmkit bench
scaling``'s Mamba-3 stack (d_model 64: 4 heads of 32, d_state 64, 16 rotary angles, chunk 64, batch 1,
with D, z and the B/C biases), forward and forward+backward. Per length it prints ms per token of each,
their ratio, minor page faults per call (``getrusage``) and the peak RSS of the calls (Linux, glibc: VmHWM,
reset through ``/proc/self/clear_refs`` after ``malloc_trim`` before each mode; it includes the inputs
and, with backward, their gradients).

    OMP_NUM_THREADS=1 python benchmarks/cpu_mamba3_long.py                      # L = 8K, 32K, 128K
    OMP_NUM_THREADS=1 python benchmarks/cpu_mamba3_long.py --lengths 8192 32768 131072 262144 --repeats 2
    OMP_NUM_THREADS=1 python benchmarks/cpu_mamba3_long.py --mimo 4 --lengths 8192 32768 65536
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import resource
import time
from collections.abc import Callable

import torch

from ssmkit.ops.mamba3 import Mamba3Inputs
from ssmkit.ops.mamba3.chunked import default_block_chunks, mamba3_chunked

CHUNK = 64


def inputs(length: int, rank: int, grad: bool) -> dict[str, torch.Tensor]:
    """The scaling stack's Mamba-3 op inputs (batch 1, h 4, p 32, n 64, a 16), MIMO of ``rank``."""
    b, h, p, n, a, r = 1, 4, 32, 64, 16, rank
    g = torch.Generator().manual_seed(0)
    out = {
        "x": torch.randn(b, length, h, p, generator=g),
        "dt": torch.rand(b, length, h, generator=g) * 0.1 + 1e-3,
        "A": -torch.rand(b, length, h, generator=g),
        "B": torch.randn(b, length, r, 1, n, generator=g),
        "C": torch.randn(b, length, r, 1, n, generator=g),
        "trap": torch.randn(b, length, h, generator=g),
        "angles": torch.randn(b, length, h, a, generator=g),
        "D": torch.ones(h),
        "z": torch.randn(b, length, h, p, generator=g),
        "B_bias": torch.ones(h, r, n),
        "C_bias": torch.ones(h, r, n),
    }
    if r > 1:
        out |= {"mimo_x": torch.full((h, r, p), 1 / r), "mimo_z": torch.ones(h, r, p),
                "mimo_o": torch.full((h, r, p), 1 / r)}
    return {k: v.requires_grad_(grad) for k, v in out.items()}


def peak_rss_mib(reset: bool = False) -> float:
    """The process's peak resident memory (VmHWM) in MiB; ``reset`` sets it to the current RSS first,
    after handing glibc's free heap back to the OS (else an earlier run's heap counts in the next peak)."""
    if reset:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def measure(fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """(best seconds, fewest minor page faults per call, peak RSS in MiB) of ``repeats`` calls after a warm-up."""
    peak_rss_mib(reset=True)
    fn()
    times, faults = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(times), min(faults), peak_rss_mib()


def call(inp: dict[str, torch.Tensor], block_chunks: int | None, backward: bool) -> Callable[[], None]:
    def run() -> None:
        for t in inp.values():
            t.grad = None
        with torch.set_grad_enabled(backward):
            inputs = Mamba3Inputs.from_args(dict(inp, chunk_size=CHUNK, rotary_interleaved=True))
            out, _ = mamba3_chunked(inputs, block_chunks=block_chunks)
        if backward:
            out.backward(torch.ones_like(out))

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--mimo", type=int, default=1, help="MIMO rank r (1: single input)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls after one warm-up call")
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}"
          f", MIMO rank {args.mimo}, chunk {CHUNK}")
    header = ("pass", "L", "blocks", "whole ms/tok", "blocks ms/tok", "speed-up", "faults whole", "faults blocks",
              "peak RSS MiB whole", "peak RSS MiB blocks")
    rows = []
    for backward in (False,) if args.no_backward else (False, True):
        for length in args.lengths:
            inp = inputs(length, args.mimo, backward)
            fast, fast_faults, fast_rss = measure(call(inp, None, backward), args.repeats)
            slow, slow_faults, slow_rss = measure(call(inp, -(-length // CHUNK), backward), args.repeats)
            block = default_block_chunks(1, 4, 32, args.mimo, 64, CHUNK, torch.device("cpu")) * CHUNK
            rows.append(("fwd+bwd" if backward else "fwd", f"{length:,}", str(-(-length // block)),
                         f"{1e3 * slow / length:.4f}", f"{1e3 * fast / length:.4f}", f"{slow / fast:.2f}x",
                         f"{slow_faults:,.0f}", f"{fast_faults:,.0f}", f"{slow_rss:,.0f}", f"{fast_rss:,.0f}"))
            print(" | ".join(rows[-1]), flush=True)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    print()
    for i, row in enumerate((header, *rows)):
        print("| " + " | ".join(str(c).rjust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


if __name__ == "__main__":
    main()
