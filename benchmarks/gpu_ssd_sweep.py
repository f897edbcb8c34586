"""One device call for issue 16's SSD sweep: ssmkit's launch configs checked, timed and profiled beside mamba_ssm.

Shape of the issue's target (``gpu_ssd.py``'s: b8, 32 heads x 64, N 128, 1 group, chunk 256, bf16, D, dt_bias,
softplus). In order:
  0. the kernels' bytes and FLOPs from their shapes and tiles (a model, no GPU): HBM bytes each kernel must move,
     bytes its programs read again from L2 (tiles reloaded per head or per row block), tensor FLOPs, exps;
  1. every variant's kernels compiled at once in worker processes (``--jobs``; Triton's disk cache is shared, so
     the timed process only loads them), mamba_ssm's autotune candidates too (its autotune then only times them);
  2. each variant's output and every gradient at L 8192 against float32 (ssmkit's Triton path on float32
     inputs: IEEE matmuls); a variant whose relative error in any of them exceeds twice the default's is refused;
  3. forward and forward+backward medians (CUDA events, ``--reps`` after ``--warmup``) at each of ``--lengths``,
     ratios to the default, the forward against its HBM floor (``gpu_ssd.floor_bytes`` at the measured copy
     bandwidth);
  4. one more config: the fastest forward variant's forward fields with the fastest backward's backward fields;
  5. mamba_ssm's ``mamba_chunk_scan_combined`` timed last in the same process (a slow autotune cannot cost
     ssmkit's rows), every config's ratio to it;
  6. the winner, as the one line that makes it the default; then per-kernel CUDA time (torch.profiler, one
     forward+backward) of the default, the winner and mamba_ssm, with the model's bytes per kernel over its time.

    python benchmarks/gpu_ssd_sweep.py                  # the whole sweep (about 3-4 minutes on an H100)
    python benchmarks/gpu_ssd_sweep.py --model          # step 0 only, no GPU needed
    python benchmarks/gpu_ssd_sweep.py --variants default rows_h2 --lengths 8192 --jobs 0
    python benchmarks/gpu_ssd_sweep.py --variants default keep_states --jobs 2 --no-peer   # backward recompute on / off
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import time

import torch
from gpu_ssd import (
    BATCH,
    CHUNK,
    GROUPS,
    HEADDIM,
    HEADS,
    STATE,
    copy_bandwidth,
    floor_bytes,
    fwd_bwd,
    make_inputs,
)
from mamba_ssm_source import import_from_source
from ssd_kernel_model import kernel_model, print_model

from ssmkit.ops.ssd import SSDLaunch, mamba_chunk_scan_combined
from ssmkit.ops.ssd.launch import CONFIGS, DEFAULT_LAUNCH

VARIANTS = ["default", "uncapped", "rows_r128", "cols_joint", "rows_h2", "rows_h3", "rows_state_h2", "cols_split_h2",
            "cols_split_h3", "bwd_h2", "cb_lowp", "lowp", "bwd_h2_lowp", "scan_2h", "scan_2h_s3", "scan_2h_lowp",
            "all_h2_lowp", "state_online", "state_online_t128", "state_bwd_tile32", "keep_states"]
PEER = "mamba_ssm"
# Fields of SSDLaunch the forward reads; the backward reads the rest (fwd_tile bounds both: C Bᵀ's tiles).
FORWARD_FIELDS = {"state", "scan", "cb", "state_pass", "state_tile", "fwd_tile", "chain", "cb_lowp", "scan_heads",
                  "state_online"}
GRADS = ["x", "dt", "A", "B", "C", "D", "dt_bias"]
# Relative errors under this pass whatever the default's: a quarter of bf16's rounding step, where a default
# error of ~1e-6 (dA, dD summed over 10^8 terms in float32) would otherwise refuse noise.
ERROR_FLOOR = 1e-3


def ours(launch: SSDLaunch):
    return lambda inp: mamba_chunk_scan_combined(**inp, chunk_size=CHUNK, dt_softplus=True, backend="triton",
                                                 launch=launch)


def theirs(fn):
    return lambda inp: fn(**inp, chunk_size=CHUNK, dt_softplus=True)


def share_autotuning(share: int, shares: int) -> None:
    """In a compile worker: every autotuned mamba_ssm kernel keeps its ``share``-th of ``shares`` slices of its
    candidate configs, each compiled and run once, not timed (the timed process times them all, compiled)."""
    from triton.runtime.autotuner import Autotuner

    def run_once(kernel_call, quantiles):
        kernel_call()
        return [1.0, 1.0, 1.0]

    tuners = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("mamba_ssm.ops.triton"):
            continue
        for obj in vars(module).values():
            for _ in range(3):  # through @triton.heuristics wrappers
                if isinstance(obj, Autotuner):
                    tuners[id(obj)] = obj  # once, though a module may import another's kernel
                    break
                obj = getattr(obj, "fn", None)
    for tuner in tuners.values():
        tuner.configs = tuner.configs[share::shares] or tuner.configs[-1:]
        tuner.__dict__["do_bench"] = run_once  # shadows the cached_property


def compile_only(names: list[str]) -> None:
    """Worker: one forward+backward of each named config (or the float32 reference, or "mamba_ssm:i:k": its
    autotuned kernels' i-th of k slices of configs) at L 8192."""
    inp = make_inputs(8192, True)
    grad = torch.randn_like(inp["x"])
    for name in names:
        start = time.perf_counter()
        try:
            if name.startswith(PEER):
                peer = import_from_source("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")
                if peer is None:
                    continue
                share_autotuning(*map(int, name.split(":")[1:]))
                fn, args, g = theirs(peer), inp, grad
            elif name == "float32":
                fn, args, g = ours(DEFAULT_LAUNCH), {k: v.float() for k, v in inp.items()}, grad.float()
            else:
                fn, args, g = ours(CONFIGS[name]), inp, grad
            fwd_bwd(fn, args, g)
            torch.cuda.synchronize()
            print(f"  compiled {name} in {time.perf_counter() - start:.0f} s", flush=True)
        except Exception as err:  # noqa: BLE001 - reported; the timed process reports it again
            print(f"  {name}: {type(err).__name__}: {str(err)[:300]}", flush=True)


def precompile(names: list[str], jobs: int, peer_jobs: int, timeout: float) -> None:
    """Compile every config and the float32 reference in ``jobs`` worker processes, mamba_ssm's autotune
    candidates in ``peer_jobs`` more, all at once."""
    rest = ["float32", *names]
    shares = [rest[i::jobs] for i in range(jobs)] + [[f"{PEER}:{i}:{peer_jobs}"] for i in range(peer_jobs)]
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--compile-only", *share]) for share in shares if share]
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            print(f"  a compile worker passed {timeout:.0f} s and was stopped", flush=True)
    print(f"compiled in {len(procs)} workers: {time.perf_counter() - start:.0f} s", flush=True)


def rel_errors(fn, inp, grad) -> dict[str, torch.Tensor]:
    """Output and gradients of one forward+backward of ``fn``, in float64."""
    for v in inp.values():
        v.grad = None
    out = fn(inp)
    torch.autograd.backward(out, grad)
    got = {"out": out.detach().double(), **{f"d{k}": inp[k].grad.double() for k in GRADS}}
    for v in inp.values():
        v.grad = None
    return got


def check(names: list[str], length: int) -> list[str]:
    """Each config's output and gradients against float32; returns the configs within 2x the default's error."""
    inp = make_inputs(length, True)
    grad = torch.randn_like(inp["x"])
    inp32 = {k: v.detach().float().requires_grad_() for k, v in inp.items()}
    want = rel_errors(ours(DEFAULT_LAUNCH), inp32, grad.float())
    del inp32

    def errors(name):
        got = rel_errors(ours(CONFIGS[name]), inp, grad)
        return {k: ((got[k] - want[k]).norm() / want[k].norm()).item() for k in want}

    base = errors("default")
    print(f"\nrelative error against float32 at L {length} (refused: any > 2x the default's and > {ERROR_FLOOR}):")
    print(f"{'config':>20} " + " ".join(f"{k:>8}" for k in base))
    passed = []
    for name in names:
        try:
            err = base if name == "default" else errors(name)
        except Exception as e:  # noqa: BLE001 - a config that fails to compile or launch is left out
            print(f"{name:>20} failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        bad = [k for k in err if not err[k] <= max(2 * base[k], ERROR_FLOOR)]  # NaN is refused too
        print(f"{name:>20} " + " ".join(f"{err[k]:>8.1e}" for k in err) + (f"  REFUSED ({', '.join(bad)})" if bad
                                                                            else ""), flush=True)
        if not bad:
            passed.append(name)
    return passed


def median_ms(fn, inp, grad, backward: bool, reps: int, warmup: int) -> float:
    """Median of ``reps`` CUDA-event timings of one call (with the backward: forward+backward) after ``warmup``."""
    def once():
        for v in inp.values():
            v.grad = None
        if backward:
            fwd_bwd(fn, inp, grad)
        else:
            with torch.no_grad():
                fn(inp)

    for _ in range(warmup):
        once()
    times = []
    for _ in range(reps):
        for v in inp.values():
            v.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if backward:
            fwd_bwd(fn, inp, grad)
        else:
            with torch.no_grad():
                fn(inp)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_all(fns: dict, lengths: list[int], reps: int, warmup: int, bandwidth: float, results: dict) -> None:
    """Times each of ``fns`` into ``results[length, name] = (fwd ms, fwd+bwd ms)``; ratios to the default and
    mamba_ssm where ``results`` already holds theirs at that length (``print_vs_peer`` prints them all)."""
    for length in lengths:
        inp = make_inputs(length, True)
        grad = torch.randn_like(inp["x"])
        floor = floor_bytes(length)[0] / bandwidth * 1e3
        print(f"\nL {length} (median ms of {reps}; forward HBM floor {floor:.3f} ms):")
        print(f"{'config':>20} {'fwd':>7} {'fwd+bwd':>8} {'bwd':>7} {'f+b/default':>11} {'f+b/peer':>9} "
              f"{'fwd/peer':>8} {'fwd/floor':>9}")
        for name, fn in fns.items():
            try:
                fwd = median_ms(fn, inp, grad, False, reps, warmup)
                both = median_ms(fn, inp, grad, True, reps, warmup)
            except Exception as e:  # noqa: BLE001
                print(f"{name:>20} failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            results[length, name] = (fwd, both)
            base, peer = results.get((length, "default")), results.get((length, PEER))
            rel = f"{both / base[1]:.3f}" if base else "-"
            vs = (f"{both / peer[1]:.3f}", f"{fwd / peer[0]:.3f}") if peer else ("-", "-")
            print(f"{name:>20} {fwd:>7.3f} {both:>8.3f} {both - fwd:>7.3f} {rel:>11} {vs[0]:>9} {vs[1]:>8} "
                  f"{fwd / floor:>9.2f}", flush=True)


def print_vs_peer(results: dict, lengths: list[int], names: list[str]) -> None:
    """Each config's time over mamba_ssm's, same process (< 1: ssmkit faster)."""
    for length in lengths:
        peer = results.get((length, PEER))
        if peer is None:
            continue
        print(f"\nL {length}, over mamba_ssm's fwd {peer[0]:.3f} / fwd+bwd {peer[1]:.3f} ms:")
        print(f"{'config':>20} {'fwd':>7} {'fwd+bwd':>8}")
        for name in names:
            if (length, name) in results:
                fwd, both = results[length, name]
                print(f"{name:>20} {fwd / peer[0]:>7.3f} {both / peer[1]:>8.3f}")


def per_kernel(name: str, fn, length: int, launch: SSDLaunch | None) -> None:
    """CUDA time of each kernel in one forward+backward (after a warm-up call), with the model's bytes."""
    from torch.profiler import ProfilerActivity, profile

    inp = make_inputs(length, True)
    grad = torch.randn_like(inp["x"])
    fwd_bwd(fn, inp, grad)
    for v in inp.values():
        v.grad = None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fwd_bwd(fn, inp, grad)
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(ev.name, []).append(ev.time_range.elapsed_us() / 1e3)
    model = kernel_model(length, launch) if launch is not None else {}
    total = sum(sum(v) for v in kernels.values())
    print(f"\n{name}, L {length}, one forward+backward: {total:.3f} ms of kernels, {sum(map(len, kernels.values()))} "
          f"launches")
    for kernel, times in sorted(kernels.items(), key=lambda kv: -sum(kv[1])):
        ms = sum(times)
        extra = ""
        if kernel in model:
            hbm, l2, flops, _ = model[kernel]
            extra = f"  {hbm / ms / 1e9:>6.0f} GB/s HBM  {(hbm + l2) / ms / 1e9:>6.0f} GB/s all  " \
                    f"{flops / ms / 1e9:>5.0f} TFLOP/s"
        print(f"  {ms:>7.3f} ms x{len(times):<3} {kernel[:60]:<60}{extra}")


def combined(results: dict, names: list[str], length: int) -> SSDLaunch | None:
    """The fastest forward variant's forward fields with the fastest backward variant's backward fields."""
    timed = [n for n in names if (length, n) in results]
    if not timed:
        return None
    f = min(timed, key=lambda n: results[length, n][0])
    bwd = min(timed, key=lambda n: results[length, n][1] - results[length, n][0])
    fields = {k: v for k, v in CONFIGS[bwd].overrides().items() if k not in FORWARD_FIELDS}
    fields.update({k: v for k, v in CONFIGS[f].overrides().items() if k in FORWARD_FIELDS})
    print(f"\ncombined: forward of {f}, backward of {bwd}: {fields}")
    return dataclasses.replace(DEFAULT_LAUNCH, **fields)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, help="names of ssmkit.ops.ssd.launch.CONFIGS")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=7, help="compile workers of ssmkit's configs (0: no workers)")
    parser.add_argument("--peer-jobs", type=int, default=5, help="compile workers of mamba_ssm's autotune configs")
    parser.add_argument("--compile-timeout", type=float, default=150.0)
    parser.add_argument("--no-peer", action="store_true", help="leave mamba_ssm out")
    parser.add_argument("--model", action="store_true", help="print the kernel model only (no GPU)")
    parser.add_argument("--compile-only", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model:
        print_model(args.lengths)
        return
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    if args.compile_only:
        compile_only(args.compile_only)
        return
    unknown = set(args.variants) - set(CONFIGS)
    if unknown:
        sys.exit(f"unknown configs {sorted(unknown)}; known: {sorted(CONFIGS)}")
    names = ["default", *(n for n in args.variants if n != "default")]
    import triton

    start = time.perf_counter()
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; b{BATCH}, "
          f"{HEADS} heads x {HEADDIM}, N {STATE}, {GROUPS} group, chunk {CHUNK}, bf16", flush=True)
    print_model([8192])
    if args.jobs > 0:
        precompile(names, args.jobs, 0 if args.no_peer else args.peer_jobs, args.compile_timeout)
    passed = check(names, 8192)
    bandwidth = copy_bandwidth()
    print(f"\ndevice copy bandwidth {bandwidth / 1e12:.2f} TB/s; {time.perf_counter() - start:.0f} s so far", flush=True)
    # ssmkit's configs first, mamba_ssm last: its first call autotunes (and compiles what the workers did not).
    fns = {name: ours(CONFIGS[name]) for name in passed}
    results: dict = {}
    time_all(fns, args.lengths, args.reps, args.warmup, bandwidth, results)
    both = combined(results, passed, args.lengths[0])
    if both is not None and both not in {CONFIGS[n] for n in passed}:
        CONFIGS["combined"] = both
        if "combined" in check(["default", "combined"], 8192):
            # Timed after the others: the default again beside it (its row replaces the first).
            time_all({"default": fns["default"], "combined": ours(both)}, args.lengths, args.reps, args.warmup,
                     bandwidth, results)
            passed.append("combined")
    peer = None if args.no_peer else import_from_source("mamba_ssm.ops.triton.ssd_combined",
                                                         "mamba_chunk_scan_combined")
    if peer is not None:
        time_all({PEER: theirs(peer)}, args.lengths, args.reps, args.warmup, bandwidth, results)
        print_vs_peer(results, args.lengths, passed)
    length = args.lengths[0]
    timed = [n for n in passed if (length, n) in results]
    winner = min(timed, key=lambda n: results[length, n][1])
    fwd, f_b = results[length, winner]
    base = results[length, "default"]
    line = f"\nWINNER at L {length}: {winner}, fwd {fwd:.3f} / fwd+bwd {f_b:.3f} ms ({f_b / base[1]:.3f}x the default"
    if (length, PEER) in results:
        line += f", {f_b / results[length, PEER][1]:.3f}x mamba_ssm's fwd+bwd, {fwd / results[length, PEER][0]:.3f}x" \
                " its fwd"
    print(line + ")")
    for other in args.lengths[1:]:
        if (other, winner) in results:
            r = results[other, winner]
            peer_r = results.get((other, PEER))
            print(f"  at L {other}: fwd+bwd {r[1]:.3f} ms ({r[1] / results[other, 'default'][1]:.3f}x the default"
                  + (f", {r[1] / peer_r[1]:.3f}x mamba_ssm)" if peer_r else ")"))
    print(f"to make it the default, set in ssmkit/ops/ssd/launch.py's SSDLaunch: {CONFIGS[winner].overrides()}",
          flush=True)
    per_kernel("default", fns["default"], length, DEFAULT_LAUNCH)
    if winner != "default":
        per_kernel(winner, ours(CONFIGS[winner]), length, CONFIGS[winner])
    if peer is not None:
        per_kernel(PEER, theirs(peer), length, None)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
