"""What the language-model, image and benchmark experiments share: the device, tables, result files, plots.

Private to :mod:`ssmkit.evals` (its name starts with ``_`` so :func:`ssmkit.evals.discover` skips it).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ssmkit.models.config import write_text_atomic


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call of ``fn``, GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (it reads fine in a terminal and pastes into docs as is)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.rjust(w) for v, w in zip(values, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if abs(value) >= 1e7:
            return f"{value:.3e}"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def write_result(out_dir: Path, result: dict[str, Any]) -> Path:
    """``out_dir/result.json``, written atomically; infinities and NaN become strings (JSON has neither)."""
    path = Path(out_dir) / "result.json"
    write_text_atomic(path, json.dumps(_jsonable(result), indent=2) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend (PNG files only, no display needed)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the evaluations draw PNG plots with matplotlib: pip install 'ssmkit[evals]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def check_names(names: Sequence[str], known: Sequence[str], option: str) -> list[str]:
    """``names`` (from a ``nargs="+"`` option), each one of ``known``; unknown or repeated names are an error."""
    names = list(names)
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise ValueError(f"{option}: unknown name(s) {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{option}: {' '.join(names)} names one twice")
    return names
