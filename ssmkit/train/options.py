"""Config dataclasses as command-line options: ``--section.key value`` with the field docstrings as help.

Field docstrings (a string literal right below a field) are read from the class source with ``ast``, the
way documentation tools do, so a config documents itself once and the CLI shows the same words.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import json
import math
import textwrap
import types
import typing
from typing import Any, Literal, Union


class UsageError(ValueError):
    """A bad command line (an option, or a combination of them): the CLI prints it with the usage and exits
    with status 2. Raised by the CLI and by eval and bench entries."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass (fields without one are left out; no source = empty)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def flat_fields(cls: type, prefix: str = "") -> dict[str, tuple[Any, Any, str]]:
    """``{"a.b": (type, default, doc)}`` for every leaf field of a (nested) config dataclass.

    A field whose metadata has ``"sections"`` (a callable returning ``{name: dataclass}``, as
    ``ModelConfig.sections`` reads the layer registry) contributes each of those dataclasses under its name.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if "sections" in f.metadata:
            for name, section in f.metadata["sections"]().items():
                out.update(flat_fields(section, f"{prefix}{name}."))
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(flat_fields(tp, f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out[prefix + f.name] = (tp, default, docs.get(f.name, ""))
    return out


def parse_value(text: str, tp: Any, name: str) -> Any:
    """Turn command-line ``text`` into a value of type ``tp``; ValueError naming ``name`` when it cannot."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [t for t in typing.get_args(tp) if t is not type(None)]
        if text.lower() in ("none", "null") and len(options) < len(typing.get_args(tp)):
            return None
        for t in sorted(options, key=lambda t: t is str):
            try:
                return parse_value(text, t, name)
            except ValueError:
                continue
        raise ValueError(f"--{name}: cannot read {text!r} as {describe_type(tp)}")
    if origin is Literal:
        for allowed in typing.get_args(tp):
            if str(allowed) == text:
                return allowed
        raise ValueError(f"--{name} must be one of {', '.join(map(str, typing.get_args(tp)))}, got {text!r}")
    if origin in (tuple, list):
        parts = [p for p in text.replace(",", " ").split() if p]
        args = typing.get_args(tp)
        if origin is list:
            return [parse_value(p, args[0] if args else str, name) for p in parts]
        if len(parts) != len(args):
            raise ValueError(f"--{name} needs {len(args)} comma-separated values, got {text!r}")
        return tuple(parse_value(p, t, name) for p, t in zip(parts, args))
    if tp is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} must be true or false, got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--{name} must be an integer, got {text!r}") from None
    if tp is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"--{name} must be a number, got {text!r}") from None
        if math.isnan(value):
            raise ValueError(f"--{name} must be a number, got {text!r}")
        return value
    if tp is type(None):
        if text.lower() in ("none", "null"):
            return None
        raise ValueError(f"--{name}: expected none, got {text!r}")
    return text


def describe_type(tp: Any) -> str:
    """Short name of a field type for help texts: ``INT``, ``FLOAT,FLOAT``, ``auto | INT``..."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(describe_type(t) for t in typing.get_args(tp))
    if origin is Literal:
        return " | ".join(map(str, typing.get_args(tp)))
    if origin in (tuple, list):
        return ",".join(describe_type(t) for t in typing.get_args(tp)) + ("..." if origin is list else "")
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp)).upper()


def apply_overrides(data: dict[str, Any], cls: type, section: str, overrides: dict[str, str]) -> dict[str, Any]:
    """Copy of a config's ``to_dict``-style ``data`` with ``{"a.b": text}`` overrides parsed and set.

    Unknown keys raise ValueError with the closest known ones.
    """
    known = flat_fields(cls)
    data = json.loads(json.dumps(data, default=list))
    for key, text in overrides.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=3)
            hint = f"; did you mean {', '.join(f'--{section}.{c}' for c in close)}?" if close else ""
            raise ValueError(f"unknown option --{section}.{key}{hint} (see `ssmkit train --help`)")
        value = parse_value(text, known[key][0], f"{section}.{key}")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return data


def simple_from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build a flat config dataclass from a dict; unknown keys raise ValueError naming them and ``where``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**data)
