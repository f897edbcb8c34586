"""How many kernels one layer's forward and backward launch on the GPU path, and the host time around them,
counted on a CPU.

At the sizes people train (b8, L 2K) Mamba-3's and Mamba-2's layers are bound by the host launching their
kernels, not by the kernels (``gpu_mamba3.py --profile`` / ``--host-profile``): each launch costs the host
tens of microseconds. This counts them without a GPU: the layer runs its CUDA choices (every op's ``auto``
backend resolved to Triton) with Triton's CPU interpreter, and a dispatch mode logs each PyTorch op that would
launch a kernel (views and allocations left out, as are the interpreter's own ops inside a Triton kernel),
beside each Triton kernel launched. Gradients accumulate into existing ``.grad`` (as a benchmark loop does),
so each parameter also costs an add.

Three modes:

* default: the Triton kernels run in the interpreter, at a tiny shape (b2, L 40, d_model 64);
* ``--stub``: the Triton kernels are launched but not run (their outputs are left uninitialised: launches
  depend on shapes, never on values), so the count is taken at the benchmark's shape (``--shape``, default
  ``gpu_mamba3.py``'s: b8, L 2048, d_model 768, 24 heads x 64, N 128); the PyTorch ops do run, on the CPU;
* ``--host``: as ``--stub`` at the tiny shape, timing one forward and one backward (``y.sum().backward()``):
  microseconds of the thread's CPU time per step spent in Python, autograd and PyTorch's dispatch (CPU kernels
  at that size cost a few microseconds each), i.e. everything but Triton's own launch path (argument binding,
  cache lookup, the driver call), which needs a GPU: on one, ``gpu_mamba3.py --counts`` gives the whole host
  time a step. Thread CPU time, not wall time: other processes on a shared machine disturb it less.

    python benchmarks/launch_count.py                   # Mamba-3 (the SSD route), Mamba-2 and Mamba (fused), bf16
    python benchmarks/launch_count.py --layers mamba3 --verbose
    python benchmarks/launch_count.py --layers mamba3 --stub        # at b8 L2048 d_model 768
    python benchmarks/launch_count.py --layers mamba3 --host
    python benchmarks/launch_count.py --layers mamba3 mamba3-unfolded --stub   # with the route before the fold
    python benchmarks/launch_count.py --layers mamba mamba-time     # Mamba-1 on both scan layouts
    python benchmarks/launch_count.py --layers mamba3-mimo mamba3-mimo-unfused --stub   # MIMO rank 4, both forms

``mamba3-unfolded`` is the Mamba-3 layer with ``FOLD_PROJECTION`` off: single input through ``_project`` (the B/C
norm and Δ/A kernels apart) and ``mamba3_scan``, the route before the projection's slices were folded in.
``mamba-time`` is the Mamba-1 layer on ``SCAN_LAYOUT = "time"`` (mamba_ssm's layout: unit time stride into the
scan), ``mamba`` on the default channel layout. ``mamba3-mimo`` is a rank-4 MIMO Mamba-3 layer on the SSD route's
fused MIMO kernels (``via_ssd.FUSED_MIMO``), ``mamba3-mimo-unfused`` the same layer with its glue in PyTorch.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported; importers (gpu_mamba3.py) launch for real

import argparse
import collections
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
import triton.runtime.jit as triton_jit
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime import interpreter

import ssmkit.layers.mamba as mamba_layer
import ssmkit.layers.mamba3 as mamba3_layer
import ssmkit.ops.backend as backend_module
from ssmkit.layers import Mamba, Mamba2, Mamba3
from ssmkit.ops.mamba3 import via_ssd

# Ops that launch no kernel on a GPU (views, allocations, metadata).
NO_KERNEL = {
    "aten.view.default", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims", "aten.expand.default",
    "aten.slice.Tensor", "aten.select.int", "aten.t.default", "aten._unsafe_view.default", "aten.detach.default",
    "aten.split_with_sizes.default", "aten.unflatten.int", "aten.alias.default", "aten.transpose.int",
    "aten.as_strided.default", "aten.permute.default", "aten.empty.memory_format", "aten.empty_like.default",
    "aten.new_empty.default", "aten.empty_strided.default", "aten.new_empty_strided.default",
    "aten.promote_types.default", "aten.set_.source_Storage", "aten.set_.source_Storage_storage_offset",
    "aten.is_same_size.default", "aten.lift_fresh.default", "aten.unbind.int",
}
_depth = [0]  # > 0 inside a Triton kernel run by the interpreter
_kernels: list[str] = []
_stub = [False]  # Triton kernels launched (counted) but not run


def _name(fn: object) -> str:
    fn = getattr(fn, "fn", fn)
    return getattr(fn, "__name__", str(fn))


def hook_triton_launches() -> None:
    """Log every Triton launch in ``_kernels``: the interpreter's (CPU) and ``JITFunction.run``'s (GPU)."""
    if getattr(interpreter.InterpretedFunction.run, "_counted", False):
        return
    run_interpreted = interpreter.InterpretedFunction.run
    run_jit = triton_jit.JITFunction.run

    def interpreted(self, *args, **kwargs):
        if _depth[0] == 0:
            _kernels.append(_name(self))
        if _stub[0]:
            return None  # stubbed before the interpreter binds anything: none of its own cost is timed
        _depth[0] += 1
        try:
            return run_interpreted(self, *args, **kwargs)
        finally:
            _depth[0] -= 1

    def jit(self, *args, **kwargs):
        if not kwargs.get("warmup", False):
            _kernels.append(_name(self))
        return run_jit(self, *args, **kwargs)

    interpreted._counted = True
    interpreter.InterpretedFunction.run = interpreted
    triton_jit.JITFunction.run = jit


def _cuda_choices() -> None:
    """Every op's ``auto`` backend resolves as on CUDA: Triton wherever the op has it."""
    resolve = backend_module.resolve_backend

    def as_on_cuda(backend: str, device: torch.device, *, has_triton: bool = False) -> str:
        if backend == "auto" and has_triton:
            return "triton"
        return resolve(backend, device, has_triton=has_triton)

    for module in list(sys.modules.values()):
        if getattr(module, "resolve_backend", None) is resolve:
            module.resolve_backend = as_on_cuda


class _Ops(TorchDispatchMode):
    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.verbose = verbose

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if _depth[0] == 0 and name not in NO_KERNEL:
            self.ops.append(name)
            if self.verbose:
                shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
                print(f"    {name} {shapes}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting(verbose: bool = False) -> Iterator[tuple[list[str], list[str]]]:
    """Inside: ``(triton, pytorch)`` lists that fill with the names of the kernels launched
    (``hook_triton_launches`` first)."""
    start = len(_kernels)
    triton_names: list[str] = []
    with _Ops(verbose) as ops:
        yield triton_names, ops.ops
    triton_names.extend(_kernels[start:])
    del _kernels[start:]


def count_step(layer: torch.nn.Module, x: torch.Tensor, verbose: bool = False) -> dict:
    """{"forward": (triton, pytorch), "backward": (...), "nodes": int}: kernel names of one ``layer(x)`` and one
    ``.sum().backward()`` (the sum and its seed counted in the backward), after a warm-up step that makes the
    gradients exist, and the forward's autograd nodes."""
    layer(x).sum().backward()
    result = {}
    with counting(verbose) as launched:
        y = layer(x)
    result["forward"] = launched
    result["nodes"] = autograd_nodes(y)
    with counting(verbose) as launched:
        y.sum().backward()
    result["backward"] = launched
    return result


def autograd_nodes(y: torch.Tensor) -> int:
    """Nodes of ``y``'s autograd graph (parameters' accumulators included): each is host work the engine does
    every backward, a launch or not (a view's backward is a node too)."""
    seen, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(fn for fn, _ in node.next_functions)
    return len(seen)


def host_us(layer: torch.nn.Module, x: torch.Tensor, repeats: int = 50, sync: Callable[[], None] = lambda: None,
            clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """Median host microseconds of one forward and of one backward (``y.sum().backward()``), never waiting for
    the device inside a timed region (``sync`` between them). ``clock``: wall time (a GPU's backward runs on
    autograd's device thread), or on a CPU ``time.thread_time``, the calling thread's own CPU time (autograd
    runs a CPU backward on the calling thread), which other processes on a shared machine disturb less."""
    fwd, bwd = [], []
    for _ in range(repeats):
        sync()
        start = clock()
        y = layer(x)
        fwd.append(clock() - start)
        sync()
        start = clock()
        y.sum().backward()
        bwd.append(clock() - start)
    sync()
    return statistics.median(fwd) * 1e6, statistics.median(bwd) * 1e6


def print_counts(counts: dict, indent: str = "  ") -> None:
    total = 0
    for part in ("forward", "backward"):
        triton_names, ops = counts[part]
        total += len(triton_names) + len(ops)
        print(f"{indent}{part}: {len(triton_names)} Triton kernels + {len(ops)} PyTorch kernels = "
              f"{len(triton_names) + len(ops)} launches")
        print(f"{indent}  Triton: {', '.join(triton_names)}")
        print(f"{indent}  PyTorch: {dict(collections.Counter(ops).most_common())}")
    print(f"{indent}forward + backward: {total} launches; {counts['nodes']} autograd nodes")


LAYERS = ("mamba3", "mamba3-unfolded", "mamba3-mimo", "mamba3-mimo-unfused", "mamba2", "mamba", "mamba-time")
TINY = (2, 40, 64, 16, 16)  # batch, length, d_model, d_state, headdim
BENCH = (8, 2048, 768, 128, 64)  # gpu_mamba3.py's Mamba-3 shape


MIMO_RANK = 4  # the mamba3-mimo layers' rank (benchmarks/RESULTS.md's MIMO table)


def make_layer(name: str, d_model: int, d_state: int, headdim: int) -> torch.nn.Module:
    if name.startswith("mamba3-mimo"):
        return Mamba3(d_model=d_model, d_state=d_state, headdim=headdim, is_mimo=True, mimo_rank=MIMO_RANK,
                      dtype=torch.bfloat16)
    if name.startswith("mamba3"):
        return Mamba3(d_model=d_model, d_state=d_state, headdim=headdim, dtype=torch.bfloat16)
    if name == "mamba2":
        return Mamba2(d_model, d_state=d_state, headdim=headdim, dtype=torch.bfloat16)
    return Mamba(d_model, dtype=torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", choices=LAYERS, default=["mamba3", "mamba2", "mamba"])
    parser.add_argument("--verbose", action="store_true", help="print every PyTorch op with its shapes")
    parser.add_argument("--stub", action="store_true", help="Triton kernels launched, not run: any shape")
    parser.add_argument("--host", action="store_true", help="host us a forward and a backward, kernels stubbed")
    parser.add_argument("--shape", type=int, nargs=5, metavar=("B", "L", "D_MODEL", "D_STATE", "HEADDIM"),
                        help=f"with --stub (default {BENCH}; else {TINY})")
    parser.add_argument("--repeats", type=int, default=200, help="--host: timed steps (median)")
    args = parser.parse_args()
    hook_triton_launches()
    _cuda_choices()
    _stub[0] = args.stub or args.host
    b, l, d_model, d_state, headdim = args.shape or (BENCH if args.stub else TINY)
    torch.manual_seed(0)
    x = torch.randn(b, l, d_model, dtype=torch.bfloat16, requires_grad=True)
    for name in args.layers:
        layer = make_layer(name, d_model, d_state, headdim)
        mode = "kernels stubbed" if _stub[0] else "kernels in the interpreter"
        print(f"{name}, bf16, b{b} L{l} d_model {d_model} N {d_state} headdim {headdim}, {mode}:")
        mamba3_layer.FOLD_PROJECTION = name != "mamba3-unfolded"
        via_ssd.FUSED_MIMO = name != "mamba3-mimo-unfused"
        mamba_layer.SCAN_LAYOUT = "time" if name == "mamba-time" else "channel"
        try:
            if args.host:
                torch.set_num_threads(1)
                for _ in range(5):
                    layer(x).sum().backward()
                fwd, bwd = host_us(layer, x, args.repeats, clock=time.thread_time)
                print(f"  host CPU time (Triton's launch path excluded): forward {fwd:.0f} us, backward {bwd:.0f} us,"
                      f" together {fwd + bwd:.0f} us (median of {args.repeats})")
            else:
                print_counts(count_step(layer, x, args.verbose))
        finally:
            mamba3_layer.FOLD_PROJECTION = True
            via_ssd.FUSED_MIMO = True
            mamba_layer.SCAN_LAYOUT = "channel"


if __name__ == "__main__":
    main()
