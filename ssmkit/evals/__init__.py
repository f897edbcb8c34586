"""Experiments that reproduce the seeds' claims at small scale: `ssmkit eval TASK`, `ssmkit bench NAME`."""

from ssmkit.evals.registry import Entry, discover, entries, register

__all__ = ["Entry", "discover", "entries", "register"]
