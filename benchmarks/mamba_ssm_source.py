"""mamba_ssm's pure-Triton code from its source distribution, for side-by-side benchmarks.

The source (``pip download --no-deps --no-binary :all: mamba-ssm``, unpacked under ``.ext/``; git-ignored,
nothing of it committed) is imported as a bare package: mamba_ssm's own ``__init__`` would load its
compiled CUDA extension, which is not built here.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / ".ext").glob("mamba_ssm-*/mamba_ssm"))


def import_from_source(module: str, name: str) -> Any | None:
    """``name`` from mamba_ssm's ``module`` (e.g. ``"mamba_ssm.modules.mamba3"``), or None (reason printed)."""
    if not SOURCES:
        print(f"mamba_ssm {name}: n/a (no source under .ext/)")
        return None
    if "mamba_ssm" not in sys.modules:
        package = types.ModuleType("mamba_ssm")
        package.__path__ = [str(SOURCES[-1])]
        sys.modules["mamba_ssm"] = package
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        print(f"mamba_ssm {name}: n/a ({type(e).__name__}: {e})")
        return None
