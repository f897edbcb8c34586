"""Importing ssmkit imports neither triton nor torch's compiler: Triton's CPU interpreter (``TRITON_INTERPRET``)
must be chosen before triton is imported (the interpreter tests and the context-parallel workers set it after
importing ssmkit), and a CPU user should not pay for either."""

from __future__ import annotations

import subprocess
import sys


def test_importing_ssmkit_imports_neither_triton_nor_dynamo():
    code = ("import sys, ssmkit, ssmkit.models, ssmkit.generation, ssmkit.ops.fused, ssmkit.ops.ssd, "
            "ssmkit.ops.mamba3, ssmkit.layers; print(sorted(m for m in ('triton', 'torch._dynamo') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout
