"""Checkpoints named by Hugging Face Hub id (``org/name``), through the hub's own cache.

:func:`resolve_checkpoint` turns whatever names a checkpoint (a local folder, or a hub id with an
optional revision) into a local folder. Every entry point calls it: ``LanguageModel.from_pretrained``,
and the CLI's ``generate``, ``eval``, ``serve``, ``convert`` and ``info``. Example::

    resolve_checkpoint("runs/demo/model")                      # a folder: returned as it is
    resolve_checkpoint("state-spaces/mamba-130m-hf")           # the hub cache's snapshot folder
    resolve_checkpoint("state-spaces/mamba-130m-hf", revision="refs/pr/1")

A local path wins over a hub id of the same spelling. Hub ids go through ``huggingface_hub`` (the
``hub`` extra): the cache first (``HF_HUB_CACHE``, ``HF_HOME``), a download when online (with its
progress bar), nothing over the network when ``HF_HUB_OFFLINE=1``. Only configs, tokenizers and
safetensors weights are fetched (``*.json``, ``*.safetensors``), never pickled weights; a repository
whose weights are only pickled (``pytorch_model.bin``, as mamba_ssm's own ``state-spaces/mamba-*``
repositories) is refused, naming the converted transformers repository where one is known.

This module imports nothing of ssmkit above :mod:`ssmkit.io.files`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ssmkit.io.files import read_json_object

# Files fetched from the hub: configs, tokenizer.json and the other tokenizer JSON files, and safetensors
# weights (single or sharded with their index). Pickled formats (*.bin, *.pt, *.ckpt) are never fetched.
ALLOW_PATTERNS = ["*.json", "*.safetensors"]
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
# mamba_ssm's repositories (pickled weights, mamba_ssm's config.json) and their transformers conversions.
CONVERTED_REPOS = {f"state-spaces/mamba-{size}": f"state-spaces/mamba-{size}-hf"
                   for size in ("130m", "370m", "790m", "1.4b", "2.8b")}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub model id, ``org/name`` (letters, digits, ``.``, ``_``, ``-``)."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and not name.endswith((".json", ".safetensors"))


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of a checkpoint named by a path or by a hub id ``org/name`` (at ``revision``: a
    branch, tag or commit; default the main branch).

    Raises:
        FileNotFoundError: neither a local path nor a hub id; a hub id not on the hub, or not in the cache
            while offline.
        ImportError: a hub id while ``huggingface_hub`` is not installed (says what to install).
        ValueError: ``revision`` with a local path; a hub repository without safetensors weights.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if revision is not None:
            raise ValueError(f"{name} is a local path; a revision applies only to Hugging Face Hub ids")
        return path
    if not is_hub_id(name):
        raise FileNotFoundError(f"checkpoint not found: {name} (neither a local folder nor a Hugging Face Hub "
                                "id such as state-spaces/mamba-130m-hf)")
    folder = _snapshot(name, revision)
    _check_weights(folder, name)
    return folder


def offline() -> bool:
    """``HF_HUB_OFFLINE`` read now (huggingface_hub reads it, as ``HF_ENDPOINT`` and the cache, once at
    import; ssmkit passes all three at each call, so a change after import counts)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path | None:
    """The hub cache as huggingface_hub finds it, read now: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``; None
    leaves the library's default (``~/.cache/huggingface/hub``)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return None


def _snapshot(repo_id: str, revision: str | None) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise ImportError(f"{repo_id!r} is not a local folder, and loading it from the Hugging Face Hub needs "
                          "huggingface_hub: pip install 'ssmkit[hub]'") from None
    cache = cache_dir()
    where = f"the Hugging Face cache ({cache or 'its default folder'})"
    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache, allow_patterns=ALLOW_PATTERNS,
            local_files_only=offline(), endpoint=os.environ.get("HF_ENDPOINT") or None, library_name="ssmkit"))
    except errors.GatedRepoError:
        raise PermissionError(f"{repo_id} is a gated repository: accept its terms on huggingface.co and log in "
                              "(`hf auth login`, or set HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise FileNotFoundError(f"{repo_id}: no such model on the Hugging Face Hub (or it is private: log in "
                                "with `hf auth login` or set HF_TOKEN), and no local folder of that name") from None
    except errors.RevisionNotFoundError:
        raise FileNotFoundError(f"{repo_id}: the Hugging Face Hub has no revision {revision!r}") from None
    except errors.LocalEntryNotFoundError:
        if offline():
            raise FileNotFoundError(f"{repo_id}{at} is not in {where}, and HF_HUB_OFFLINE=1 forbids downloading "
                                    "it; download it once online, or unset HF_HUB_OFFLINE (nor is it a local "
                                    "folder)") from None
        raise FileNotFoundError(f"{repo_id}{at} is not in {where} and the Hugging Face Hub cannot be reached; "
                                "check the network (nor is it a local folder)") from None
    except (errors.HfHubHTTPError, errors.HFValidationError) as e:
        raise FileNotFoundError(f"{repo_id}: the Hugging Face Hub refused it: {_first_line(e)}") from None


def _check_weights(folder: Path, repo_id: str) -> None:
    """A snapshot must hold safetensors weights; anything else is refused with the reason."""
    if any((folder / name).is_file() for name in SAFETENSORS_WEIGHTS):
        return
    config = folder / "config.json"
    raw = read_json_object(config, "config") if config.is_file() else {}
    hint = mamba_ssm_hint(raw, repo_id)
    if hint:
        raise ValueError(f"{repo_id}: {hint}")
    where = f"its snapshot in the cache ({folder})" if offline() else "the repository"
    raise ValueError(f"{repo_id}: {where} has no safetensors weights ({' or '.join(SAFETENSORS_WEIGHTS)}); "
                     "ssmkit never downloads or unpickles pickled weights (pytorch_model.bin): use a safetensors "
                     "revision of it, or convert it to safetensors with a tool you trust")


def is_mamba_ssm_config(raw: dict[str, Any]) -> bool:
    """Whether a config.json is mamba_ssm's own (``MambaLMHeadModel``): d_model, n_layer, ssm_cfg and no
    transformers model_type."""
    return "model_type" not in raw and {"d_model", "n_layer", "ssm_cfg"} <= raw.keys()


def mamba_ssm_hint(raw: dict[str, Any], name: str) -> str:
    """For a mamba_ssm config.json: why ssmkit does not read it and what to use instead ("" otherwise)."""
    if not is_mamba_ssm_config(raw):
        return ""
    converted = CONVERTED_REPOS.get(name.lower())
    instead = (f"use its transformers conversion {converted}" if converted else
               "use a transformers conversion of it (config.json with a model_type, weights in safetensors)")
    return (f"this is a mamba_ssm checkpoint (config.json with d_model, n_layer, ssm_cfg; weights pickled as "
            f"pytorch_model.bin), which ssmkit does not unpickle; {instead}")


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
