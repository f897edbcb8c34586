"""Activation memory (and, on CUDA, forward+backward time) of one Mamba / Mamba-2 layer, fused against unfused.

"fused" is the layers' default training path (``fused=True``: ``mamba_inner_fn`` /
``mamba_split_conv1d_scan_combined``, which release the convolution, Δ, B, C and gate intermediates after
the forward and recompute them in the backward); "unfused" the same layer with ``fused=False`` (the separate
ops, each keeping what its backward needs). Same weights, same input.

Columns:

* saved MB: bytes autograd holds for the backward when the forward returns, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (:func:`ssmkit.testing.saved_activation_bytes`: distinct
  storages, at their size after the forward; parameters and the layer's input left out). Device-agnostic:
  it depends on the ops each backend runs (Triton on CUDA, the chunked PyTorch ops on CPU), not on load;
* allocated MB (CUDA): ``torch.cuda.memory_allocated`` after the forward minus before, output included;
* peak MB (CUDA): the peak during forward+backward above the memory before it;
* fwd+bwd ms (CUDA): median of ``triton.testing.do_bench`` of forward then backward of a fixed cotangent.

    python benchmarks/activation_memory.py                     # CUDA: b 8, d_model 2048, L 2048, bf16
    python benchmarks/activation_memory.py --batch 2 --d-model 256 --length 512   # a CPU-sized shape
    TRITON_INTERPRET=1 python benchmarks/activation_memory.py --triton-interpreter --batch 2 --d-model 128 \
        --length 256 --dtype bfloat16                          # the Triton path's bytes, on a CPU

``--ssd-launch NAME`` runs the SSD (Mamba-2, both paths) with ``ssmkit.ops.ssd.launch.CONFIGS[NAME]`` in place
of the default launch: ``keep_states`` is the SSD before its backward recomputed Δ, cum, the chunk states and
C·Bᵀ (``SSDLaunch.recompute_states``).

``--mamba1-layout channel time`` measures the Mamba layer on each scan layout (``ssmkit.layers.mamba.SCAN_LAYOUT``;
rows ``mamba:time``), the ratio column against the unfused layer of the same layout.

``--triton-interpreter`` (with ``TRITON_INTERPRET=1``, on a CPU) routes every op with a Triton kernel to it,
as CUDA does, so that the saved bytes are those of the GPU path; "units" = saved bytes over one (b, l,
d_inner) tensor of the layer's dtype, which carries across shapes where every saved tensor scales with
b * l * d_inner (Mamba-1's checkpoints do at fixed N; Mamba-2's states and C·Bᵀ depend on the chunk).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import statistics
import time

import torch

import ssmkit
import ssmkit.layers.mamba as mamba1_layer
from ssmkit.layers import Mamba, Mamba2
from ssmkit.testing import saved_activation_bytes

MB = 1e6


def _route_auto_to_triton() -> None:
    """Make backend="auto" pick the Triton kernel of every op that has one (Triton's CPU interpreter)."""
    import sys

    from ssmkit.ops import backend

    original = backend.resolve_backend

    def resolve(name: str, device: torch.device, *, has_triton: bool = False) -> str:
        return "triton" if name == "auto" and has_triton else original(name, device, has_triton=has_triton)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("ssmkit.") and getattr(module, "resolve_backend", None) is original:
            module.resolve_backend = resolve


def _use_ssd_launch(name: str) -> None:
    """Make the SSD's default launch (what the layers get: they pass none) ``CONFIGS[name]``."""
    from ssmkit.ops import ssd
    from ssmkit.ops.ssd.launch import CONFIGS

    ssd.DEFAULT_LAUNCH = CONFIGS[name]


def _layers(kind: str, d_model: int, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    cls = Mamba if kind == "mamba" else Mamba2
    fused = cls(d_model, device=device, dtype=dtype)
    unfused = copy.deepcopy(fused)
    unfused.config = dataclasses.replace(unfused.config, fused=False)
    return fused, unfused


def _fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, cot: torch.Tensor) -> None:
    layer(x).backward(cot)


def _time_ms(fn, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=50, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(kind: str, batch: int, d_model: int, length: int, device: str, dtype: torch.dtype,
            timed: bool) -> dict[str, dict[str, float]]:
    rows = {}
    for name, layer in zip(("fused", "unfused"), _layers(kind, d_model, device, dtype)):
        x = torch.randn(batch, length, d_model, device=device, dtype=dtype, requires_grad=True)
        exclude = [*layer.parameters(), x]
        row = {"saved": saved_activation_bytes(functools.partial(layer, x), exclude=exclude) / MB}
        row["units"] = row["saved"] * MB / (batch * length * layer.d_inner * dtype.itemsize)
        if device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = layer(x)
            row["allocated"] = (torch.cuda.memory_allocated() - before) / MB
            out.backward(torch.ones_like(out))
            torch.cuda.synchronize()
            row["peak"] = (torch.cuda.max_memory_allocated() - before) / MB
            del out
        if timed:
            cot = torch.randn(batch, length, d_model, device=device, dtype=dtype)
            row["ms"] = _time_ms(functools.partial(_fwd_bwd, layer, x, cot), device)
        rows[name] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="activation memory of a Mamba / Mamba-2 layer, fused vs unfused")
    cuda = torch.cuda.is_available()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=["bfloat16", "float32"])
    parser.add_argument("--layers", nargs="+", default=["mamba", "mamba2"], choices=["mamba", "mamba2"])
    parser.add_argument("--mamba1-layout", nargs="+", default=["channel"], choices=["channel", "time"],
                        help="the Mamba layer's scan layouts to measure (ssmkit.layers.mamba.SCAN_LAYOUT)")
    parser.add_argument("--time", action="store_true", help="also time forward+backward on CPU (CUDA: always)")
    parser.add_argument("--triton-interpreter", action="store_true",
                        help="on a CPU with TRITON_INTERPRET=1: run the Triton kernels (the GPU path's bytes)")
    parser.add_argument("--ssd-launch", default="default", help="the SSD's launch config (launch.CONFIGS)")
    args = parser.parse_args()
    from ssmkit.ops.ssd.launch import CONFIGS

    if args.ssd_launch not in CONFIGS:
        parser.error(f"unknown --ssd-launch {args.ssd_launch!r}; known: {', '.join(CONFIGS)}")
    _use_ssd_launch(args.ssd_launch)
    if args.triton_interpreter:
        import os

        if cuda or os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--triton-interpreter needs TRITON_INTERPRET=1 and no CUDA device")
        _route_auto_to_triton()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name() if cuda else "CPU (chunked PyTorch ops; the Triton kernels run on CUDA)"
    if args.triton_interpreter:
        where = "CPU, the Triton kernels in Triton's interpreter (the CUDA path's ops)"
    print(f"device: {where}; torch {torch.__version__}, ssmkit {ssmkit.__version__}")
    print(f"one layer, default config, batch {args.batch}, d_model {args.d_model}, length {args.length}, {args.dtype}, "
          f"SSD launch {args.ssd_launch}")
    header = (f"{'layer':<12} {'path':<8} {'saved MB':>9} {'units':>6} {'ratio':>6} {'allocated MB':>13} {'peak MB':>8} "
              f"{'fwd+bwd ms':>11} {'time ratio':>10}")
    print(header)
    print("-" * len(header))
    runs = [(kind, layout) for kind in args.layers for layout in (args.mamba1_layout if kind == "mamba" else [None])]
    for kind, layout in runs:
        mamba1_layer.SCAN_LAYOUT = layout or "channel"
        rows = measure(kind, args.batch, args.d_model, args.length, device, dtype, cuda or args.time)
        label = kind if layout is None or args.mamba1_layout == ["channel"] else f"{kind}:{layout}"
        base = rows["unfused"]
        for name, r in rows.items():
            alloc = f"{r['allocated']:.0f}" if "allocated" in r else "-"
            peak = f"{r['peak']:.0f}" if "peak" in r else "-"
            ms = f"{r['ms']:.2f}" if "ms" in r else "-"
            tratio = f"{r['ms'] / base['ms']:.2f}x" if "ms" in r else "-"
            print(f"{label:<12} {name:<8} {r['saved']:>9.2f} {r['units']:>6.2f} {r['saved'] / base['saved']:>5.2f}x {alloc:>13} "
                  f"{peak:>8} {ms:>11} {tratio:>10}", flush=True)
    print("target: fused <= 0.6x the unfused layer's activation memory, and no slower")


if __name__ == "__main__":
    main()
