"""CPU benchmark of the time-invariant family against the selective scans, and of Mamba-3's backends.

Side by side in one run, forward, fp32, batch 1, per sequence length L:

* S4D convolution mode: the kernel K (Vandermonde, ``ssm_kernel``) plus an FFT convolution (``fft_conv``);
* S4D recurrent mode: ``lti_scan(backend="reference")``, the state updated position by position;
* Mamba-1 chunked selective scan at the same width and state (``selective_scan_fn``), for scale;
* Mamba-3: ``mamba3_scan`` chunked vs its sequential reference (shorter lengths: the reference is slow).

S4D shapes: d = 768 channels, N = 64 (32 conjugate pairs), S4D-Lin. Mamba-1: d = 768, N = 16 (its
usual state). Mamba-3: 12 heads x 64, N 64, rope fraction 0.5, SISO.

    python benchmarks/lti_cpu.py                       # L = 1K ... 64K
    python benchmarks/lti_cpu.py --lengths 1024 4096 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable

import torch

from ssmkit.ops import mamba3_scan, selective_scan_fn
from ssmkit.ops.lti import discretize, fft_conv, lti_scan, s4d_init, ssm_kernel


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def s4d_system(d: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Discretised S4D-Lin (ZOH): Ā, B̄ (d, n/2) complex64 and C (d, n/2)."""
    lam, b = s4d_init("lin", n, dtype=torch.complex64)
    A = lam.expand(d, -1).contiguous()
    B = b.expand(d, -1).contiguous()
    dt = torch.exp(torch.empty(d).uniform_(math.log(1e-3), math.log(1e-1)))
    A_bar, B_bar, _ = discretize(A, B, dt, "zoh")
    C = torch.randn(d, n // 2, dtype=torch.complex64)
    return A_bar, B_bar, C


def mamba3_inputs(length: int) -> dict[str, torch.Tensor]:
    b, h, p, g, n, r = 1, 12, 64, 1, 64, 1
    return {
        "x": torch.randn(b, length, h, p), "dt": torch.rand(b, length, h) * 0.1 + 1e-3,
        "A": -torch.rand(b, length, h) * 4 - 0.5, "B": torch.randn(b, length, r, g, n),
        "C": torch.randn(b, length, r, g, n), "trap": torch.randn(b, length, h),
        "angles": torch.randn(b, length, h, n // 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--recurrent-max-len", type=int, default=16384, help="skip S4D's recurrence above this L")
    parser.add_argument("--mamba3-lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(0)
    d, n = 768, 64
    A_bar, B_bar, C = s4d_system(d, n)
    A1 = -torch.arange(1, 17, dtype=torch.float32).repeat(d, 1)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'L':>7} {'S4D conv (K+FFT)':>17} {'S4D recurrence':>15} {'Mamba-1 chunked':>16} {'rec/conv':>9}")
    with torch.no_grad():
        for length in args.lengths:
            x = torch.randn(1, d, length)
            conv = best_time(lambda: fft_conv(x, ssm_kernel(A_bar, B_bar, C, length)), args.repeats)
            rec = math.nan
            if length <= args.recurrent_max_len:
                rec = best_time(lambda: lti_scan(x, A_bar, B_bar, C, backend="reference"), max(1, args.repeats // 2))
            delta = torch.randn(1, d, length) * 0.5
            Bs, Cs = torch.randn(1, 16, length), torch.randn(1, 16, length)
            mamba = best_time(lambda: selective_scan_fn(x, delta, A1, Bs, Cs, delta_softplus=True), args.repeats)
            rows.append({"op": "lti", "L": length, "s4d_conv_s": conv, "s4d_recurrent_s": rec, "mamba1_chunked_s": mamba})
            print(f"{length:>7} {conv * 1e3:>14.1f} ms {rec * 1e3:>12.1f} ms {mamba * 1e3:>13.1f} ms "
                  f"{rec / conv:>8.1f}x")
        print(f"\n{'L':>7} {'Mamba-3 chunked':>16} {'Mamba-3 reference':>18} {'ratio':>7}")
        for length in args.mamba3_lengths:
            inp = mamba3_inputs(length)
            fast = best_time(lambda: mamba3_scan(**inp, backend="chunked"), args.repeats)
            ref = best_time(lambda: mamba3_scan(**inp, backend="reference"), 1)
            rows.append({"op": "mamba3", "L": length, "chunked_s": fast, "reference_s": ref})
            print(f"{length:>7} {fast * 1e3:>13.1f} ms {ref * 1e3:>15.1f} ms {ref / fast:>6.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
