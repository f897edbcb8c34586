"""CPU benchmark: single-input Mamba-3 by its chunked path against the SSD route (``via_ssd.py``, here with the
SSD op's chunked PyTorch backend), forward and forward+backward, side by side in one process.

The SSD route exists for the SSD op's Triton kernels on a GPU; this measures whether it would also pay on
a CPU (it decides what ``backend="auto"`` picks there). Shapes: the scaling stack's op (batch 1, 4 heads
x 32, N 64, 16 angles) at 8K and 32K, and a training-like one (batch 2, L 2048, 24 heads x 64, N 128,
32 angles); chunk 64, with D, z and the B/C biases; best of ``--repeats``.

    OMP_NUM_THREADS=2 python benchmarks/cpu_mamba3_routes.py
"""

from __future__ import annotations

import argparse
import time

import torch

from ssmkit.ops.mamba3 import Mamba3Inputs
from ssmkit.ops.mamba3.chunked import mamba3_chunked
from ssmkit.ops.mamba3.via_ssd import mamba3_via_ssd

SHAPES = [(1, 8192, 4, 32, 64, 16), (1, 32768, 4, 32, 64, 16), (2, 2048, 24, 64, 128, 32)]
ROUTES = {
    "chunked": mamba3_chunked,
    "via SSD": lambda inputs: mamba3_via_ssd(inputs, ssd_backend="chunked"),
}


def inputs(b: int, l: int, h: int, p: int, n: int, a: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(b, l, h, p, generator=g), "dt": torch.rand(b, l, h, generator=g) * 0.1 + 1e-3,
        "A": -torch.rand(b, l, h, generator=g), "B": torch.randn(b, l, 1, 1, n, generator=g),
        "C": torch.randn(b, l, 1, 1, n, generator=g), "trap": torch.randn(b, l, h, generator=g),
        "angles": torch.randn(b, l, h, a, generator=g), "D": torch.ones(h),
        "z": torch.randn(b, l, h, p, generator=g), "B_bias": torch.ones(h, 1, n), "C_bias": torch.ones(h, 1, n),
    }


def best_seconds(route, inp: dict[str, torch.Tensor], backward: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        leaves = {k: v.detach().requires_grad_(backward) for k, v in inp.items()}
        start = time.perf_counter()
        out, final = route(Mamba3Inputs.from_args(dict(leaves, chunk_size=64)))
        if backward:
            (out.sum() + final.ssm.sum()).backward()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| b, L, heads x p, N | pass | chunked ms | via SSD ms | chunked / via SSD |")
    print("|---|---|---|---|---|")
    for b, l, h, p, n, a in SHAPES:
        inp = inputs(b, l, h, p, n, a)
        for backward in (False, True):
            ms = {name: 1e3 * best_seconds(route, inp, backward, args.repeats) for name, route in ROUTES.items()}
            print(f"| {b}, {l:,}, {h} x {p}, {n} | {'fwd+bwd' if backward else 'fwd'} | {ms['chunked']:.0f} | "
                  f"{ms['via SSD']:.0f} | {ms['chunked'] / ms['via SSD']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
