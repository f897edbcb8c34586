"""Compile a Triton kernel for sm_90 without a GPU and read its cubin's resource table.

Shared by ``ssd_registers.py`` and ``conv_registers.py``: registers per thread and stack bytes (spills) from
``cuobjdump --dump-resource-usage`` (the one shipped with Triton's NVIDIA backend), shared memory from the
compiled kernel's metadata, and the PTX for instruction counts.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_sm90(fn, signature: dict[str, str], constexprs: dict[str, object], options: dict[str, int],
                 attrs: dict[tuple[int, ...], list] | None = None):
    """The compiled kernel of ``fn`` for an H100/H200 (sm_90) target; ``attrs`` as the JIT's specialization
    gives them, e.g. ``{(3,): [["tt.divisibility", 16]]}`` for an argument known a multiple of 16."""
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


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
