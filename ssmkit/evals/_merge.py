"""``ssmkit eval TASK --merge DIR [DIR ...]``: one table, plot and result.json from runs of one task made
apart, e.g. one model per GPU (``CUDA_VISIBLE_DEVICES=0 ssmkit eval mqar --models mamba --out parts/mamba``).

Nothing is trained: each ``DIR/result.json`` is read and checked against the first (same task, same
settings except ``models``, same ``--smoke``, every other field equal but the table, device and torch
version), the per-model results are put together in the order given, and the task's own ``report`` prints
the table and draws the plots of the whole.

Private to :mod:`ssmkit.evals` (its name starts with ``_`` so :func:`ssmkit.evals.discover` skips it).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ssmkit.io import files
from ssmkit.evals._report import write_result

HELP = ("combine finished runs of this task (folders holding its result.json, e.g. one model each made with "
        "--models on its own GPU) into one table, plot and result.json in --out. Nothing is trained: the settings "
        "come from the runs, which must agree on all but --models, and any option other than --out is an error")

# Fields that may differ between the parts: re-made (table), summed up (device, torch) or replaced.
_FREE = ("table", "device", "torch", "merged_from")
# Values of the options that leave a run's settings alone.
_UNSET = {"smoke": False, "device": "auto"}

Report = Callable[[dict[str, Any], Path], str]


def add_option(parser: argparse.ArgumentParser) -> None:
    """``--merge DIR [DIR ...]`` (default None: train as usual)."""
    parser.add_argument("--merge", nargs="+", metavar="DIR", default=None, help=HELP)


def merge_runs(args: argparse.Namespace, out_dir: Path, task: str, report: Report, options: Iterable[str], *,
               runs_key: str = "models", name_key: str | None = None,
               relocate: Callable[[dict[str, Any], Path, Path], None] | None = None) -> dict[str, Any]:
    """Merge the runs in ``args.merge`` into ``out_dir``: print the task's table, write its plots and
    ``result.json``; returns the merged result.

    ``options``: the task's options (argparse dests) that change what is trained; giving any of them (or
    ``--smoke``, ``--device``) with ``--merge`` is an error. ``runs_key``/``name_key``: where a result keeps
    its per-model entries, a dict by model name or a list of dicts named by ``entry[name_key]``.
    ``relocate(part, part_dir, out_dir)``: fixes paths in a part that are relative to its folder.
    """
    given = [name for name in ("smoke", "device", *options) if _is_set(name, getattr(args, name, None))]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"--merge trains nothing and takes the settings from the merged runs; drop {flags}")
    folders = [Path(folder) for folder in args.merge]
    out_dir = Path(out_dir)
    for folder in folders:
        if folder.resolve() == out_dir.resolve():
            raise ValueError(f"--out {out_dir} is one of the merged folders; write the merge to another folder")
    parts = [load(task, folder, runs_key) for folder in folders]
    if relocate is not None:
        for part, folder in zip(parts, folders):
            relocate(part, folder, out_dir)
    result = combine(parts, folders, runs_key=runs_key, name_key=name_key)
    print(f"{task}: merged {', '.join(map(str, folders))}")
    print(report(result, out_dir))
    write_result(out_dir, result)
    return result


def _is_set(name: str, value: Any) -> bool:
    if name in _UNSET:
        return value != _UNSET[name]
    # Identity, not equality: --seed 0 is given although 0 == False.
    return value is not None and value is not False


def load(task: str, folder: Path, runs_key: str = "models") -> dict[str, Any]:
    """``folder/result.json`` of a run of ``task``, with a clear error when it is missing, broken or another's."""
    path = Path(folder) / "result.json"
    try:
        data = files.read_bytes(path, "record")  # size-checked before reading
    except FileNotFoundError:
        raise FileNotFoundError(f"--merge: {path} not found; is {folder} the --out of an `ssmkit eval {task}` run?"
                                ) from None
    try:
        result = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"--merge: {path} is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(result, dict) or "task" not in result:
        raise ValueError(f"--merge: {path} is not the result of an `ssmkit eval` run (it has no 'task')")
    if result["task"] != task:
        raise ValueError(f"--merge: {path} is a result of {result['task']!r}, not {task!r}")
    settings, runs = result.get("settings"), result.get(runs_key)
    complete = (isinstance(settings, dict) and isinstance(settings.get("models"), list)
                and isinstance(runs, (dict, list)) and isinstance(result.get("smoke"), bool))
    if not complete:
        raise ValueError(f"--merge: {path} lacks the fields of a {task!r} result (settings.models, smoke, {runs_key})")
    return result


def combine(parts: Sequence[dict[str, Any]], folders: Sequence[Path], *, runs_key: str = "models",
            name_key: str | None = None) -> dict[str, Any]:
    """The parts as one result: their per-model entries in the order given, ``settings.models`` their union,
    ``merged_from`` the folders; device and torch version those of the parts (listed where they differ).

    Every other field must be equal in all parts, settings but ``models`` included; a model in two parts
    is an error.
    """
    if not parts:
        raise ValueError("--merge needs at least one folder")
    first, where = parts[0], {}
    for part, folder in zip(parts, folders):
        if part is not first:
            _check_compatible(first, part, folders[0], folder, runs_key)
        for name in _names(part[runs_key], name_key, folder):
            if name in where:
                raise ValueError(f"--merge: model {name!r} is in both {where[name]} and {folder}; give each model once")
            where[name] = folder
    merged = dict(first)
    merged["settings"] = {**first["settings"], "models": [m for part in parts for m in part["settings"]["models"]]}
    if isinstance(first[runs_key], dict):
        merged[runs_key] = {name: entry for part in parts for name, entry in part[runs_key].items()}
    else:
        merged[runs_key] = [entry for part in parts for entry in part[runs_key]]
    for key in ("device", "torch"):
        if key in first:
            merged[key] = ", ".join(dict.fromkeys(str(part.get(key)) for part in parts))
    merged["merged_from"] = [str(folder) for folder in folders]
    return merged


def _names(runs: dict[str, Any] | list[dict[str, Any]], name_key: str | None, folder: Path) -> list[str]:
    if isinstance(runs, dict):
        return list(runs)
    if name_key is None or not all(isinstance(r, dict) and name_key in r for r in runs):
        raise ValueError(f"--merge: {folder}/result.json has runs without a {name_key!r} name")
    return [r[name_key] for r in runs]


def _check_compatible(first: dict[str, Any], part: dict[str, Any], first_folder: Path, folder: Path,
                      runs_key: str) -> None:
    differ = []
    for key in dict.fromkeys([*first, *part]):
        if key in (*_FREE, runs_key):
            continue
        if key == "settings":
            for name in dict.fromkeys([*first[key], *part[key]]):
                mine, theirs = first[key].get(name), part[key].get(name)
                if name != "models" and mine != theirs:
                    differ.append(f"settings.{name} {theirs!r} (vs {mine!r})")
        elif first.get(key) != part.get(key):
            differ.append(f"{key} {_short(part.get(key))} (vs {_short(first.get(key))})")
    if differ:
        raise ValueError(f"--merge: {folder}/result.json is not a run of the same experiment as "
                         f"{first_folder}/result.json: it has {'; '.join(differ)}. Only --models may differ")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def relocate_run_dirs(part: dict[str, Any], part_dir: Path, out_dir: Path, runs_key: str = "runs") -> None:
    """Make each run's ``run_dir`` (relative to the part's folder) relative to ``out_dir`` instead."""
    for entry in part[runs_key]:
        if isinstance(entry, dict) and isinstance(entry.get("run_dir"), str):
            entry["run_dir"] = os.path.relpath(Path(part_dir) / entry["run_dir"], out_dir)
