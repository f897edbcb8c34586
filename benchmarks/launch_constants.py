"""``--set MODULE.NAME=INT``: change a module-level launch constant (a tile, warps, stages) for one benchmark run,
so variants are compared in the same process. Shared by ``layer_registers.py`` and ``gpu_mamba3_routes.py``."""

from __future__ import annotations

import argparse
import importlib


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=INT",
                        help="set a module-level integer constant for the run (repeatable)")


def apply_sets(items: list[str]) -> None:
    """Each ``MODULE.NAME=INT`` of ``items`` made so (the module imported, the attribute overwritten)."""
    for item in items:
        target, sep, value = item.partition("=")
        module, dot, attr = target.rpartition(".")
        if not (sep and dot and module and attr):
            raise SystemExit(f"--set wants MODULE.NAME=INT, got {item!r}")
        setattr(importlib.import_module(module), attr, int(value))
