"""How many kernels one layer's forward and backward launch on the GPU path, counted on a CPU.

At the sizes people train (b8, L 2K) Mamba-3's and Mamba-2's layers are bound by the host launching their
kernels, not by the kernels (``gpu_mamba3.py --profile`` / ``--host-profile``): each launch costs the host
tens of microseconds. This counts them without a GPU: the layer runs its CUDA choices (every op's ``auto``
backend resolved to Triton) in Triton's CPU interpreter at a tiny shape, and a dispatch mode logs each PyTorch
op that would launch a kernel (views and allocations left out, as are the interpreter's own ops inside a
Triton kernel), beside each Triton kernel launched. Gradients accumulate into existing ``.grad`` (as a
benchmark loop does), so each parameter also costs an add.

    python benchmarks/launch_count.py                   # Mamba-3 (the SSD route), Mamba-2 and Mamba (fused), bf16
    python benchmarks/launch_count.py --layers mamba3 --verbose
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import argparse  # noqa: E402
import collections  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import ssmkit.ops.backend as backend_module  # noqa: E402
from ssmkit.layers import Mamba, Mamba2, Mamba3  # noqa: E402

# Ops that launch no kernel on a GPU (views, allocations, metadata).
NO_KERNEL = {
    "aten.view.default", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims", "aten.expand.default",
    "aten.slice.Tensor", "aten.select.int", "aten.t.default", "aten._unsafe_view.default", "aten.detach.default",
    "aten.split_with_sizes.default", "aten.unflatten.int", "aten.alias.default", "aten.transpose.int",
    "aten.as_strided.default", "aten.permute.default", "aten.empty.memory_format", "aten.empty_like.default",
    "aten.new_empty.default", "aten.empty_strided.default", "aten.new_empty_strided.default",
    "aten.promote_types.default", "aten.set_.source_Storage", "aten.set_.source_Storage_storage_offset",
}
_depth = [0]  # > 0 inside a Triton kernel run by the interpreter
_kernels: list[str] = []


def _count_kernels() -> None:
    run = interpreter.GridExecutor.__call__

    def counted(self, *args, **kwargs):
        if _depth[0] == 0:
            _kernels.append(getattr(self.fn, "__name__", str(self.fn)))
        _depth[0] += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            _depth[0] -= 1

    interpreter.GridExecutor.__call__ = counted


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


def count(layer: torch.nn.Module, x: torch.Tensor, verbose: bool) -> None:
    layer(x).sum().backward()  # warm-up: the grads exist, as in a timing loop
    for part in ("forward", "backward"):
        _kernels.clear()
        with _Ops(verbose) as ops:
            if part == "forward":
                y = layer(x)
            else:
                y.sum().backward()
        print(f"  {part}: {len(_kernels)} Triton kernels + {len(ops.ops)} PyTorch kernels = "
              f"{len(_kernels) + len(ops.ops)} launches")
        print(f"    Triton: {', '.join(_kernels)}")
        print(f"    PyTorch: {dict(collections.Counter(ops.ops).most_common())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", choices=("mamba3", "mamba2", "mamba"),
                        default=["mamba3", "mamba2", "mamba"])
    parser.add_argument("--verbose", action="store_true", help="print every PyTorch op with its shapes")
    args = parser.parse_args()
    _count_kernels()
    _cuda_choices()
    torch.manual_seed(0)
    x = torch.randn(2, 40, 64, dtype=torch.bfloat16, requires_grad=True)
    layers = {
        "mamba3": lambda: Mamba3(d_model=64, d_state=16, headdim=16, dtype=torch.bfloat16),
        "mamba2": lambda: Mamba2(64, d_state=16, headdim=16, dtype=torch.bfloat16),
        "mamba": lambda: Mamba(64, dtype=torch.bfloat16),
    }
    for name in args.layers:
        print(f"{name}, bf16, b2 L40 d_model 64 (the SSD backward splits heads over more programs at tiny sizes: a sum or two more than at b8 L2K):")
        count(layers[name](), x, args.verbose)


if __name__ == "__main__":
    main()
