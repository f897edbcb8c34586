"""Reading transformers checkpoint folders: config mapping, file formats, and every refusal."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ssmkit.interop import CheckpointError, load_transformers_checkpoint
from ssmkit.models import LanguageModel
from ssmkit.models.formats.files import read_weights, write_folder

DROP = object()


def _edit_config(folder: Path, **changes) -> None:
    """Set fields of the folder's config.json (``DROP`` removes one)."""
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    for k, v in changes.items():
        if v is DROP:
            raw.pop(k, None)
        else:
            raw[k] = v
    path.write_text(json.dumps(raw))


def _edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_config_fields_mamba(hf_checkpoint):
    hf, folder = hf_checkpoint("mamba_untied_bias")
    config, state = load_transformers_checkpoint(folder)
    c = hf.config
    assert (config.vocab_size, config.d_model, config.n_layer, config.layer_pattern) == (53, 18, 3, "M")
    assert config.padded_vocab_size == 53 and config.norm_eps == c.layer_norm_epsilon
    assert (config.tie_embeddings, config.residual_in_fp32) == (False, False)
    m = config.mamba
    assert (m.d_state, m.d_conv, m.expand, m.dt_rank) == (7, 4, 3, math.ceil(18 / 16))
    assert (m.conv_bias, m.bias, m.mixer_rms_eps) == (False, True, None)
    assert (m.dt_min, m.dt_max, m.dt_init_floor, m.dt_init) == (1e-3, 0.1, 1e-4, "random")
    assert "lm_head.weight" in state and "embedding.weight" in state
    assert not any(k.startswith("backbone.") for k in state)
    torch.testing.assert_close(state["layers.2.mixer.A_log"], hf.backbone.layers[2].mixer.A_log.detach(),
                               rtol=0, atol=0)


def test_config_fields_falcon_mamba_and_tied_head(hf_checkpoint):
    _, folder = hf_checkpoint("falcon_mamba")
    config, state = load_transformers_checkpoint(folder)
    assert config.mamba.mixer_rms_eps == 5e-2 and config.tie_embeddings
    assert "lm_head.weight" not in state
    _edit_config(folder, mixer_rms_eps=DROP)  # transformers' default applies
    assert load_transformers_checkpoint(folder)[0].mamba.mixer_rms_eps == 1e-6


def test_config_fields_mamba2(hf_checkpoint):
    _, folder = hf_checkpoint("mamba2_limit")
    config, state = load_transformers_checkpoint(folder)
    m = config.mamba2
    assert config.layer_pattern == "2" and config.norm_eps == 1e-3
    assert (m.d_state, m.d_conv, m.expand, m.headdim, m.ngroups, m.chunk_size) == (5, 3, 2, 10, 2, 8)
    assert m.dt_limit == (0.03, 0.3) and (m.bias, m.conv_bias) == (True, False)
    assert (m.norm_before_gate, m.rmsnorm, m.D_has_hdim) == (False, True, False)
    assert state["layers.0.mixer.in_proj.weight"].shape == (2 * 40 + 2 * 2 * 5 + 4, 20)


@pytest.mark.parametrize("infinity", ['{"__float__": "Infinity"}', "Infinity"])
def test_time_step_limit_infinity_spellings(hf_checkpoint, infinity):
    _, folder = hf_checkpoint("mamba2")
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw["time_step_limit"] = [0.0, "INF"]
    path.write_text(json.dumps(raw).replace('"INF"', infinity))
    assert load_transformers_checkpoint(folder)[0].mamba2.dt_limit == (0.0, math.inf)


def test_sharded_safetensors_and_bin_give_the_same_state(hf_checkpoint):
    _, folder = hf_checkpoint("mamba2")
    _, expected = load_transformers_checkpoint(folder)
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors").unlink()
    _, sharded = load_transformers_checkpoint(folder)
    assert sharded.keys() == expected.keys()
    assert all(torch.equal(sharded[k], expected[k]) for k in expected)

    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_transformers_checkpoint(folder)

    for shard in shards:
        (folder / shard).unlink(missing_ok=True)
    (folder / "model.safetensors.index.json").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    _, from_bin = load_transformers_checkpoint(folder)
    assert all(torch.equal(from_bin[k], expected[k]) for k in expected)


class _NotATensor:
    pass


def test_bin_with_pickled_objects_is_refused(hf_checkpoint):
    _, folder = hf_checkpoint("mamba")
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**tensors, "evil": _NotATensor()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*weights_only=True"):
        load_transformers_checkpoint(folder)
    torch.save({"a": 1}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*mapping of tensor names to tensors"):
        load_transformers_checkpoint(folder)


def test_missing_folder_config_or_weights(tmp_path, hf_checkpoint):
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        load_transformers_checkpoint(tmp_path / "nope")
    _, folder = hf_checkpoint("mamba")
    (folder / "config.json").rename(folder / "other.json")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_transformers_checkpoint(folder)
    (folder / "other.json").rename(folder / "config.json")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights found"):
        load_transformers_checkpoint(folder)


def test_corrupt_config_json(hf_checkpoint):
    _, folder = hf_checkpoint("mamba")
    (folder / "config.json").write_text('{"model_type": "mamba", ')
    with pytest.raises(CheckpointError, match=r"config\.json: not a readable JSON"):
        load_transformers_checkpoint(folder)


@pytest.mark.parametrize("model_type", ["llama", DROP], ids=["llama", "absent"])
def test_another_model_type_is_refused(hf_checkpoint, model_type):
    _, folder = hf_checkpoint("mamba")
    _edit_config(folder, model_type=model_type)
    with pytest.raises(CheckpointError, match=r"config\.json: model_type .* checkpoint of another model type"):
        load_transformers_checkpoint(folder)


def test_language_model_from_pretrained_reports_the_same_errors(hf_checkpoint):
    _, folder = hf_checkpoint("mamba")
    (folder / "model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt or truncated"):
        LanguageModel.from_pretrained(folder)
    _edit_config(folder, model_type="llama")
    with pytest.raises(ValueError, match=r"config\.json: model_type 'llama'"):
        LanguageModel.from_pretrained(folder)


@pytest.mark.parametrize(
    "name, change, field",
    [
        ("mamba", dict(hidden_act="gelu"), "hidden_act"),
        ("mamba2", dict(hidden_act="relu"), "hidden_act"),
        ("mamba", dict(quantization_config={"quant_method": "bitsandbytes"}), "quantization_config"),
        ("mamba2", dict(norm_before_gate=True), "norm_before_gate"),
        ("mamba2", dict(rms_norm=False), "rms_norm"),
        ("mamba2", dict(num_heads=5), "num_heads"),
        ("mamba2", dict(n_groups=4), "n_groups"),
        ("mamba2", dict(time_step_limit=[0.5, 0.1]), "time_step_limit"),
        ("mamba", dict(time_step_init_scheme="orthogonal"), "time_step_init_scheme"),
        ("mamba", dict(state_size=0), "state_size"),
        ("mamba", dict(tie_word_embeddings="yes"), "tie_word_embeddings"),
        ("falcon_mamba", dict(mixer_rms_eps=-1.0), "mixer_rms_eps"),
    ],
)
def test_unsupported_or_bad_fields_are_named(hf_checkpoint, name, change, field):
    _, folder = hf_checkpoint(name)
    _edit_config(folder, **change)
    with pytest.raises(CheckpointError, match=rf"config\.json: field '{field}'"):
        load_transformers_checkpoint(folder)


def test_values_modelconfig_rejects_name_the_file(hf_checkpoint):
    _, folder = hf_checkpoint("mamba")
    _edit_config(folder, time_step_min=0.5, time_step_max=0.1)
    with pytest.raises(CheckpointError, match=r"config\.json: mamba\.dt_min / dt_max"):
        load_transformers_checkpoint(folder)


def test_null_fields_take_transformers_defaults(hf_checkpoint):
    _, folder = hf_checkpoint("mamba2")
    _edit_config(folder, time_step_limit=DROP, chunk_size=None)
    config, _ = load_transformers_checkpoint(folder)
    assert config.mamba2.dt_limit == (0.0, math.inf) and config.mamba2.chunk_size == 256


def test_missing_unexpected_and_misshaped_tensors(hf_checkpoint):
    _, folder = hf_checkpoint("mamba")
    original = load_file(folder / "model.safetensors")

    _edit_weights(folder, lambda t: t.pop("backbone.layers.1.mixer.D"))
    missing = r"model\.safetensors: missing tensors \['backbone\.layers\.1\.mixer\.D'\]"
    with pytest.raises(CheckpointError, match=missing):
        load_transformers_checkpoint(folder)

    save_file({**original, "backbone.layers.0.mixer.extra": torch.zeros(3)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['backbone\.layers\.0\.mixer\.extra'\]"):
        load_transformers_checkpoint(folder)

    save_file({**original, "backbone.layers.2.mixer.A_log": torch.zeros(40, 6)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.2\.mixer\.A_log has shape \(40, 6\).*\(40, 5\)"):
        load_transformers_checkpoint(folder)

    save_file({**original, "backbone.norm_f.weight": torch.ones(20, dtype=torch.int32)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"norm_f\.weight has dtype torch\.int32"):
        load_transformers_checkpoint(folder)


def test_mamba_ssm_embedding_name_is_accepted(hf_checkpoint):
    _, folder = hf_checkpoint("mamba")
    _, expected = load_transformers_checkpoint(folder)
    _edit_weights(folder, lambda t: t.update({"backbone.embedding.weight": t.pop("backbone.embeddings.weight")}))
    _, state = load_transformers_checkpoint(folder)
    assert torch.equal(state["embedding.weight"], expected["embedding.weight"])


def test_mamba2_mlp_prefix_is_refused(hf_checkpoint):
    _, folder = hf_checkpoint("mamba2")
    d_mlp = 7

    def add_prefix(t):
        w = t["backbone.layers.0.mixer.in_proj.weight"]
        t["backbone.layers.0.mixer.in_proj.weight"] = torch.cat([torch.zeros(2 * d_mlp, w.shape[1]), w])

    _edit_weights(folder, add_prefix)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: .*in_proj\.weight .*d_mlp = {d_mlp}"):
        load_transformers_checkpoint(folder)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_or_truncated_safetensors(hf_checkpoint, damage):
    _, folder = hf_checkpoint("mamba")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) * 2 // 3], "garbage": b"\x10\x00" + data[2:], "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated safetensors"):
        load_transformers_checkpoint(folder)


def test_write_folder_is_atomic(tmp_path, monkeypatch):
    tensors = {"a": torch.arange(3.0)}
    out = write_folder(tmp_path / "ckpt", {"model_type": "mamba", "x": math.inf}, tensors)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["x"] == math.inf
    (out / "README.md").write_text("kept")
    write_folder(out, {"model_type": "mamba2"}, {"a": torch.ones(2)})
    assert json.loads((out / "config.json").read_text()) == {"model_type": "mamba2"}
    assert (out / "README.md").read_text() == "kept" and torch.equal(read_weights(out)[0]["a"], torch.ones(2))

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("ssmkit.models.formats.files.save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        write_folder(tmp_path / "new", {}, tensors)
    with pytest.raises(OSError, match="disk full"):
        write_folder(out, {"model_type": "other"}, tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no new folder, no staging left over
    assert json.loads((out / "config.json").read_text()) == {"model_type": "mamba2"}
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        write_folder(tmp_path / "file", {}, tensors)
