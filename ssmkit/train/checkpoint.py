"""Resumable training checkpoints: atomic, verified, the last K kept, a corrupt latest one skipped.

A checkpoint is a folder ``<out>/checkpoints/step_NNNNNNN/`` (the run folder's layout, its verification and
the search for the newest good checkpoint live in :mod:`ssmkit.models.run_folder`)::

    config.json            the model config, in the ssmkit checkpoint format (so the folder also loads
    model.safetensors      with LanguageModel.from_pretrained and the CLI's generate/eval)
    optimizer.safetensors  AdamW moments and step counts, keyed "<parameter name>/<key>"
    rng.safetensors        torch CPU (and CUDA) generator states
    ssmkit_tokenizer.json  the tokenizer (and tokenizer.json for token models)
    trainer_state.json     step, schedule, data position, counters, Python/NumPy RNG states, optimiser
                           hyper-parameters, and the size + SHA-256 of every other file (written last)

Everything is written into a hidden temporary folder, each file fsynced, then the folder is renamed into
place and the parent fsynced: a crash leaves either the whole checkpoint or none of it. On load every file
is checked against its recorded hash; a checkpoint that fails is reported and the previous one is used.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ssmkit.data.tokenizer import Tokenizer
from ssmkit.io.files import load_safetensors, read_json_object, save_safetensors_atomic, shown
from ssmkit.models.config import ModelConfig
from ssmkit.models.formats.native import (
    ARCHITECTURE,
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_NAME,
)
from ssmkit.models.run_folder import (  # noqa: F401  (the run folder's layout: the trainer and tests use it here)
    STATE_FILE,
    CorruptCheckpoint,
    find_resumable,
    fingerprint,
    list_checkpoints,
    step_dir,
    verify,
)
from ssmkit.train.distributed import Dist, barrier


def save(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, config: ModelConfig,
         tokenizer: Tokenizer, state: dict[str, Any], info: Dist, keep: int) -> Path:
    """Write the checkpoint of ``step`` (every process must call this; rank 0 writes) and prune to ``keep``."""
    # Imported here: it takes seconds, and generate/eval/info never need it.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    final = step_dir(root, step)
    if info.is_main:
        tmp = root / f".tmp-step_{step:07d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_safetensors_atomic(model_sd, tmp / WEIGHTS_NAME, metadata={"format": FORMAT})
        _write_json(tmp / CONFIG_NAME, {"format": FORMAT, "format_version": FORMAT_VERSION,
                                        "architecture": ARCHITECTURE, "config": config.to_dict()})
        moments = {f"{name}/{key}": value for name, per_param in optim_sd["state"].items()
                   for key, value in per_param.items()}
        save_safetensors_atomic(moments, tmp / "optimizer.safetensors")
        save_safetensors_atomic(_torch_rng_states(), tmp / "rng.safetensors")
        tokenizer.save(tmp)
        for p in tmp.iterdir():
            _fsync_file(p)
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in optim_sd["param_groups"]]
        files = {p.name: fingerprint(p) for p in sorted(tmp.iterdir())}
        _write_json(tmp / STATE_FILE, {**state, "step": step, "optimizer_param_groups": groups,
                                       "python_rng": _python_rng_state(), "files": files})
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_run_file(path: Path) -> dict[str, Any]:
    """A training run's ``run.json``: its ``model``, ``train`` and ``data`` configs, each checked and filled to
    a complete dict. ValueError naming the file when it is unreadable, corrupt or not of that shape;
    FileNotFoundError when missing."""
    from dataclasses import asdict

    from ssmkit.data.config import DataConfig
    from ssmkit.train.config import TrainConfig
    from ssmkit.train.options import simple_from_dict

    data = read_json_object(path, "record")
    for section in ("model", "train", "data"):
        if not isinstance(data.get(section), dict):
            raise ValueError(f"{shown(path)}: not a training run record (no {section!r} object); the file is damaged "
                             "or not written by ssmkit train")
    try:
        model = ModelConfig.from_dict(data["model"]).to_dict()
        sections = {}
        for name, cls in (("train", TrainConfig), ("data", DataConfig)):
            config = simple_from_dict(cls, data[name], name)
            config.validate()  # a value of the wrong type fails here as a TypeError
            sections[name] = asdict(config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{shown(path)}: {e}") from None
    return {**data, "model": model, **sections}


def load(folder: Path, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore model, optimiser and RNG states from a verified checkpoint (every process reads the files)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_sd, _ = load_safetensors(folder / WEIGHTS_NAME)
    moments, _ = load_safetensors(folder / "optimizer.safetensors")
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        name, _, what = key.rpartition("/")
        per_param.setdefault(name, {})[what] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in state["optimizer_param_groups"]]
    set_state_dict(model, optimizer, model_state_dict=model_sd,
                   optim_state_dict={"state": per_param, "param_groups": groups},
                   options=StateDictOptions(full_state_dict=True))
    rng, _ = load_safetensors(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(rng) if k.startswith("cuda/")])
    py = state["python_rng"]
    random.setstate((py["python"][0], tuple(py["python"][1]), py["python"][2]))
    np.random.set_state((py["numpy"][0], np.array(py["numpy"][1], dtype=np.uint32), *py["numpy"][2:]))


def remove_leftovers(root: Path) -> None:
    """Delete temporary folders of checkpoints whose writing was interrupted."""
    if root.is_dir():
        for p in root.glob(".tmp-step_*"):
            shutil.rmtree(p, ignore_errors=True)


def _torch_rng_states() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def _python_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
