import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ssmkit.models import LanguageModel, ModelConfig, get_preset


def make(name="debug-hybrid", tie=True):
    torch.manual_seed(0)
    cfg = get_preset(name)
    cfg.tie_embeddings = tie
    return LanguageModel(cfg)


@pytest.mark.parametrize("name, tie", [("debug-hybrid", True), ("debug-mamba2", False), ("debug-mamba", True)])
def test_round_trip(tmp_path, name, tie):
    model = make(name, tie)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    data = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert data["format"] == "ssmkit" and data["format_version"] == 1 and data["architecture"] == "LanguageModel"
    assert ("lm_head.weight" in load_file(tmp_path / "ckpt" / "model.safetensors")) == (not tie)
    loaded = LanguageModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config == ModelConfig.load(tmp_path / "ckpt" / "config.json")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    if tie:
        assert loaded.head_weight is loaded.embedding.weight
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_dtype_and_overwrite(tmp_path):
    model = make().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # overwriting an existing checkpoint is fine
    assert load_file(tmp_path / "model.safetensors")["embedding.weight"].dtype == torch.bfloat16
    assert LanguageModel.from_pretrained(tmp_path).embedding.weight.dtype == torch.float32
    loaded = LanguageModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert torch.equal(loaded.embedding.weight, model.embedding.weight)


@pytest.fixture
def ckpt(tmp_path):
    make().save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_missing_files_are_named(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nowhere .neither a local folder nor"):
        LanguageModel.from_pretrained(tmp_path / "nowhere")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model.safetensors does not exist"):
        LanguageModel.from_pretrained(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt/config.json does not exist"):
        LanguageModel.from_pretrained(ckpt)


def test_truncated_and_corrupt_weights_are_named(ckpt):
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        LanguageModel.from_pretrained(ckpt)
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        LanguageModel.from_pretrained(ckpt)


def test_truncated_and_bad_configs_are_named(ckpt):
    config = ckpt / "config.json"
    good = json.loads(config.read_text())
    config.write_text(json.dumps(good)[:40])
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        LanguageModel.from_pretrained(ckpt)
    config.write_text(json.dumps(good | {"architecture": "SequenceClassifier"}))
    with pytest.raises(ValueError, match=r"config.json: holds a 'SequenceClassifier' checkpoint, not a LanguageModel"):
        LanguageModel.from_pretrained(ckpt)
    config.write_text(json.dumps(good | {"format_version": 99}))
    with pytest.raises(ValueError, match=r"format_version 99 is not readable"):
        LanguageModel.from_pretrained(ckpt)
    config.write_text(json.dumps(good | {"config": good["config"] | {"d_modle": 3}}))
    with pytest.raises(ValueError, match=r"config.json: unknown config key\(s\): d_modle"):
        LanguageModel.from_pretrained(ckpt)
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"config.json: model_type 'llama' is not supported"):
        LanguageModel.from_pretrained(ckpt)
    config.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match=r"config.json: neither an ssmkit checkpoint"):
        LanguageModel.from_pretrained(ckpt)


def test_tensors_that_do_not_match_the_config(ckpt):
    weights = ckpt / "model.safetensors"
    tensors = load_file(weights)
    extra = dict(tensors, **{"layers.9.mixer.D": torch.ones(3)})
    del extra["layers.0.mixer.A_log"]
    save_file(extra, weights)
    with pytest.raises(ValueError, match=r"model.safetensors: tensors do not match .*missing tensors \(1\): "
                       r"layers.0.mixer.A_log .*unexpected tensors \(1\): layers.9.mixer.D"):
        LanguageModel.from_pretrained(ckpt)
    bad = dict(tensors)
    bad["norm_f.weight"] = torch.ones(5)
    save_file(bad, weights)
    with pytest.raises(ValueError, match=r"norm_f.weight: \(5,\) in the file, \(32,\) in the model"):
        LanguageModel.from_pretrained(ckpt)
    # A checkpoint whose config says Mamba-2 everywhere but whose tensors are the hybrid's.
    config = json.loads((ckpt / "config.json").read_text())
    config["config"]["layer_pattern"] = "2"
    (ckpt / "config.json").write_text(json.dumps(config))
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="tensors do not match the model built from its config"):
        LanguageModel.from_pretrained(ckpt)


def test_writes_are_atomic(ckpt, monkeypatch):
    before = (ckpt / "model.safetensors").read_bytes()
    model = make()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("ssmkit.io.files.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(ckpt)
    assert (ckpt / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors"]


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="format must be 'ssmkit' or 'transformers'"):
        make().save_pretrained(tmp_path, format="gguf")


@pytest.mark.parametrize("name", ["debug-hybrid", "jamba-tiny", "samba-tiny"])
def test_model_tensor_shapes_are_the_language_models(name):
    """The formats check checkpoints against model_tensor_shapes without building a LanguageModel: it must
    name the model's tensors, in order, with their shapes."""
    from ssmkit.models.formats.native import model_tensor_shapes

    config = get_preset(name)
    model = LanguageModel(config, device="meta")
    assert model_tensor_shapes(config) == {n: tuple(t.shape) for n, t in model.state_dict().items()}
    assert list(model_tensor_shapes(config)) == list(model.state_dict())
