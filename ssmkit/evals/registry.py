"""Registry of `ssmkit eval TASK` tasks and `ssmkit bench NAME` benchmarks.

Each task or benchmark is a module of ``ssmkit.evals`` that calls :func:`register` at import time; the
CLI imports every module of the package (``discover()``), so adding one needs no list edited elsewhere.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Literal

Kind = Literal["eval", "bench"]


@dataclass(frozen=True)
class Entry:
    """One runnable experiment.

    ``add_arguments(parser)`` adds its options (each with a help text and a default that makes the
    full run); ``run(args, out_dir)`` runs it, prints a table, writes ``result.json`` and PNG plots
    into ``out_dir`` and returns the result dictionary. ``--smoke`` (added by the CLI for every entry)
    asks for the few-step configuration that CI runs.
    """

    kind: Kind
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Any], dict]


_ENTRIES: dict[tuple[Kind, str], Entry] = {}


def register(kind: Kind, name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace, Any], dict]) -> Entry:
    """Add an entry; registering the same (kind, name) twice is an error."""
    if (kind, name) in _ENTRIES:
        raise ValueError(f"ssmkit {kind} {name!r} is registered twice")
    entry = Entry(kind, name, help, add_arguments, run)
    _ENTRIES[(kind, name)] = entry
    return entry


def discover() -> None:
    """Import every module of ``ssmkit.evals`` so that each registers its entries."""
    import ssmkit.evals as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_") and info.name != "registry":
            importlib.import_module(f"ssmkit.evals.{info.name}")


def entries(kind: Kind) -> dict[str, Entry]:
    """Registered entries of one kind, by name (call :func:`discover` first)."""
    return {name: e for (k, name), e in sorted(_ENTRIES.items()) if k == kind}
