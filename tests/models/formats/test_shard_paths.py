"""Shard index paths stay inside the checkpoint folder (issue 19, item 5)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ssmkit.interop import CheckpointError, load_transformers_checkpoint


def _shard(folder, names=("model-1.safetensors", "model-2.safetensors")):
    """Split the folder's model.safetensors into two shards named ``names``, with an index."""
    tensors = load_file(folder / "model.safetensors")
    keys = sorted(tensors)
    shards = {names[0]: keys[::2], names[1]: keys[1::2]}
    for shard, part in shards.items():
        (folder / shard).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: tensors[k] for k in part}, folder / shard, metadata={"format": "pt"})
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: s for s, part in shards.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors, index


def _point(folder, index, new_name):
    """Make the index map the second shard's tensors to ``new_name``."""
    first = sorted(set(index["weight_map"].values()))[1]
    weight_map = {k: (new_name if v == first else v) for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_a_shard_outside_the_folder_is_refused(hf_checkpoint, tmp_path):
    _, folder = hf_checkpoint("mamba")
    _, index = _shard(folder)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(folder / "model-2.safetensors", other / "model.safetensors")
    for name in ("../other/model.safetensors", str(other / "model.safetensors"), "sub/../../other/model.safetensors",
                 "..\\other\\model.safetensors", "C:\\other\\model.safetensors"):
        _point(folder, index, name)
        with pytest.raises(CheckpointError, match="inside the checkpoint folder"):
            load_transformers_checkpoint(folder)
    for bad in ({"a": ["list"]}, {"a": 3}, {"a": ""}):
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": bad}))
        with pytest.raises(CheckpointError, match="expected a file name"):
            load_transformers_checkpoint(folder)


def test_a_symlink_leading_out_is_refused_and_one_inside_is_read(hf_checkpoint, tmp_path):
    _, folder = hf_checkpoint("mamba")
    _shard(folder)
    outside = tmp_path / "outside.safetensors"
    shutil.move(folder / "model-2.safetensors", outside)
    os.symlink(outside, folder / "model-2.safetensors")
    with pytest.raises(CheckpointError, match="link that leads outside the checkpoint folder"):
        load_transformers_checkpoint(folder)
    (folder / "model-2.safetensors").unlink()
    shutil.move(outside, folder / "real.safetensors")
    os.symlink("real.safetensors", folder / "model-2.safetensors")
    load_transformers_checkpoint(folder)


def test_shards_in_subfolders_and_hub_cache_links_are_read(hf_checkpoint, tmp_path):
    _, folder = hf_checkpoint("mamba")
    _shard(folder, ("model-1.safetensors", "sub/model-2.safetensors"))
    assert load_transformers_checkpoint(folder)[1].keys()
    # The hub cache's layout: snapshot files are links to ../../blobs/<hash>.
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(p for p in folder.rglob("*") if p.is_file()):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(path, blob)
        target = snapshot / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, target.parent), target)
    state = load_transformers_checkpoint(snapshot)[1]
    assert state.keys() == load_transformers_checkpoint(folder)[1].keys()
    assert all(isinstance(t, torch.Tensor) for t in state.values())


def test_shards_are_size_checked_together_before_reading(hf_checkpoint):
    from ssmkit.models.formats.files import read_weights

    _, folder = hf_checkpoint("mamba")
    _shard(folder)
    total = sum((folder / f"model-{i}.safetensors").stat().st_size for i in (1, 2))
    assert read_weights(folder, max_bytes=total)[0]
    with pytest.raises(CheckpointError, match=f"the weights take {total:,} bytes, more than"):
        read_weights(folder, max_bytes=total - 1)
