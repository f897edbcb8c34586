"""Compile a Triton kernel for sm_90 without a GPU and read its cubin's resource table.

Shared by ``ssd_registers.py``, ``conv_registers.py``, ``scan_registers.py`` and ``layer_registers.py``:
registers per thread and stack bytes (spills) from ``cuobjdump --dump-resource-usage`` (the one shipped with
Triton's NVIDIA backend), shared memory from the compiled kernel's metadata, and the PTX for instruction counts.

A kernel's code depends on how the JIT specializes its arguments at the call: an integer equal to 1 becomes a
constant (a unit stride: contiguous along that axis, so vector loads and a thread's own run of steps), and
integers and pointers known multiples of 16 carry ``tt.divisibility``. A signature written by hand with every
stride a plain ``i32`` compiles different, usually worse, code than the GPU runs. :class:`LaunchCapture` takes
a launcher's real arguments (on ``meta`` tensors of the benchmark's shape: nothing is allocated) and
:func:`compile_like_jit` specializes them exactly as the JIT would.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

SM90 = GPUTarget("cuda", 90, 32)


def compile_sm90(fn, signature: dict[str, str], constexprs: dict[str, object], options: dict[str, int],
                 attrs: dict[tuple[int, ...], list] | None = None):
    """The compiled kernel of ``fn`` for an H100/H200 (sm_90) target; ``attrs`` as the JIT's specialization
    gives them, e.g. ``{(3,): [["tt.divisibility", 16]]}`` for an argument known a multiple of 16."""
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=SM90, options=options)


class LaunchCapture:
    """Stands in for a ``@triton.jit`` kernel in its module (``monkeypatch``-style): ``kernel[grid](...)``
    records the arguments of each launch instead of running it; ``fn`` is the kernel it replaces. With an
    ``order`` list, each launch is also appended there as (``name``, grid, args, kwargs)."""

    def __init__(self, fn, order: list | None = None, name: str = "") -> None:
        self.fn, self.launches, self.order, self.name = fn, [], order, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            self.launches.append((grid, args, kwargs))
            if self.order is not None:
                self.order.append((self.name, grid, args, kwargs))
        return launch


def capture_launches(modules, run) -> list[tuple[str, object, tuple, dict]]:
    """Every Triton launch that ``run()`` makes through a kernel named in one of ``modules``, as
    (kernel name, grid, args, kwargs), in launch order, without running any (each ``@triton.jit`` function of
    the modules is swapped for a :class:`LaunchCapture` for the call, restored after it; helpers the kernels
    call are swapped too, but nothing compiles while they are). Run it on ``meta`` tensors: the outputs are
    never written, so launches must depend on shapes only."""
    order, captures = [], []
    for module in modules:
        for name, obj in list(vars(module).items()):
            if isinstance(obj, triton.runtime.jit.JITFunction):
                captures.append((module, name, LaunchCapture(obj, order, name)))
    for module, name, capture in captures:
        setattr(module, name, capture)
    try:
        run()
    finally:
        for module, name, capture in captures:
            setattr(module, name, capture.fn)
    return order


def compile_like_jit(fn, args: tuple, kwargs: dict):
    """The sm_90 kernel the JIT would compile for the launch ``fn[grid](*args, **kwargs)``: its own binder
    specializes the arguments (unit integers to constants, multiples of 16 marked divisible, pointers by
    dtype and alignment), with the NVIDIA backend of an sm_90 target instead of the current device's."""
    backend = make_backend(SM90)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, _ = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, None)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=SM90, options=options.__dict__)


def resource_usage(kernel) -> tuple[int, int]:
    """(registers per thread, spilled stack bytes) of a compiled kernel."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        table = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", table)
    return int(found.group(1)), int(found.group(2))
