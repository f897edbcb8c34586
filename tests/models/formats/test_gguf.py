"""GGUF in and out: ssmkit -> GGUF -> ssmkit logits, the file's layout against llama.cpp's converter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssmkit.models.formats.files import CheckpointError
from ssmkit.models import LanguageModel, get_preset

gguf = pytest.importorskip("gguf", reason="GGUF tests need the gguf package (pip install 'ssmkit[gguf]')")
from ssmkit.models.formats.gguf import write_gguf

PRESETS = ["debug-mamba", "debug-mamba2"]
# Relative max error of the logits against the float32 model; Q8_0 keeps 8 bits per weight in blocks of 32.
TOLERANCE = {"f32": 1e-6, "f16": 5e-3, "bf16": 3e-2, "q8_0": 6e-2}


def _model(preset: str, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(get_preset(preset)).eval()


def _logits(model: LanguageModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("file_type", ["f32", "f16", "bf16", "q8_0"])
def test_round_trip_logits(tmp_path: Path, preset: str, file_type: str) -> None:
    model = _model(preset)
    ids = torch.randint(0, model.config.vocab_size, (2, 19))
    path = write_gguf(model, tmp_path / "m.gguf", file_type)
    loaded = LanguageModel.from_pretrained(path).eval()
    assert loaded.config.layer_pattern == model.config.layer_pattern
    ref, got = _logits(model, ids), _logits(loaded, ids)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err <= TOLERANCE[file_type], err
    if file_type != "f32":  # the 2-D weights really are stored narrower
        assert path.stat().st_size < 0.7 * write_gguf(model, tmp_path / "f32.gguf").stat().st_size


@pytest.mark.parametrize("preset", PRESETS)
def test_layout_follows_llama_cpp(tmp_path: Path, preset: str) -> None:
    """Names, shapes, types and the converter's transforms (A = -exp(A_log), squeezed conv, Mamba-2's
    (nheads, 1) A and D and (ngroups, I / ngroups) norm), read back with gguf's own reader."""
    model = _model(preset)
    path = write_gguf(model, tmp_path / "m.gguf", "q8_0")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    arch = "mamba2" if preset.endswith("2") else "mamba"
    assert reader.get_field("general.architecture").contents() == arch
    assert reader.get_field(f"{arch}.block_count").contents() == model.config.n_layer
    assert "output.weight" not in tensors  # tied head
    q = gguf.GGMLQuantizationType
    mixer = model.layers[0].mixer
    a = tensors["blk.0.ssm_a"]
    assert a.tensor_type == q.F32 and tensors["blk.0.ssm_conv1d.weight"].tensor_type == q.F32
    A = np.asarray(a.data).reshape(tuple(reversed(a.shape.tolist())))
    np.testing.assert_allclose(A.reshape(-1), (-torch.exp(mixer.A_log)).detach().numpy().reshape(-1), rtol=1e-6)
    assert list(tensors["blk.0.ssm_conv1d.weight"].shape) == [mixer.d_conv, mixer.conv1d.weight.shape[0]]
    if arch == "mamba2":
        assert list(a.shape) == [1, mixer.nheads]
        assert reader.get_field("mamba2.ssm.group_count").contents() == mixer.ngroups
        assert list(tensors["blk.0.ssm_norm.weight"].shape) == [mixer.d_inner // mixer.ngroups, mixer.ngroups]
    assert tensors["blk.0.ssm_in.weight"].tensor_type == q.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == q.F32


def test_untied_head_and_tokenizer(tmp_path: Path) -> None:
    config = get_preset("debug-mamba")
    config.tie_embeddings = False
    torch.manual_seed(1)
    model = LanguageModel(config).eval()
    vocab = {chr(97 + i): i for i in range(10)}
    tok = tmp_path / "tokenizer.json"
    spec = {"model": {"type": "BPE", "vocab": vocab, "merges": ["a b"]},
            "added_tokens": [{"id": 10, "content": "<eos>", "special": True}]}
    tok.write_text(json.dumps(spec))
    path = write_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=tok)
    reader = gguf.GGUFReader(path)
    assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    assert tokens[:3] == ["a", "b", "c"] and tokens[10] == "<eos>" and len(tokens) == model.embedding.weight.shape[0]
    loaded = LanguageModel.from_pretrained(path)
    assert not loaded.config.tie_embeddings
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_bad_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(CheckpointError, match="junk.gguf"):
        LanguageModel.from_pretrained(junk)
    with pytest.raises(ValueError, match="Mamba"):
        write_gguf(LanguageModel(_attention_config()), tmp_path / "x.gguf")


def _attention_config():
    config = get_preset("debug-mamba")
    config.layer_pattern = "MA"
    config.n_layer = 2
    return config


def test_cli_convert(tmp_path: Path) -> None:
    model = _model("debug-mamba2")
    model.save_pretrained(tmp_path / "src")
    dst = tmp_path / "m.gguf"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "ssmkit", "convert", str(tmp_path / "src"), str(dst), "--to", "gguf",
                          "--outtype", "bf16"], capture_output=True, text=True, check=False, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    err = (_logits(LanguageModel.from_pretrained(dst), ids) - _logits(model, ids)).abs().max()
    assert err <= TOLERANCE["bf16"] * _logits(model, ids).abs().max()
    again = subprocess.run([sys.executable, "-m", "ssmkit", "convert", str(tmp_path / "src"), str(dst), "--to",
                            "gguf"], capture_output=True, text=True, check=False, env=env, timeout=120)
    assert again.returncode != 0 and "exists" in again.stderr


def _llama_cpp_converter() -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py, from $SSMKIT_LLAMA_CPP (a llama.cpp source folder) when set."""
    root = os.environ.get("SSMKIT_LLAMA_CPP")
    script = Path(root) / "convert_hf_to_gguf.py" if root else None
    return script if script is not None and script.is_file() else None


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("file_type", ["f32", "q8_0"])
def test_same_tensors_as_llama_cpp_converter(tmp_path: Path, preset: str, file_type: str) -> None:
    """llama.cpp's converter run on the transformers export writes the same tensors, bytes included, and its
    file loads to the same logits."""
    script = _llama_cpp_converter()
    if script is None:
        pytest.skip("set SSMKIT_LLAMA_CPP to a llama.cpp source folder to compare with its converter")
    model = _model(preset)
    model.save_pretrained(tmp_path / "hf", format="transformers")
    theirs = tmp_path / "theirs.gguf"
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "hf"), "--outfile", str(theirs), "--outtype",
                          file_type], capture_output=True, text=True, check=False, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    ours = write_gguf(model, tmp_path / "ours.gguf", file_type)
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert sorted(a) == sorted(b)
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type and list(t.shape) == list(b[name].shape), name
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(b[name].data), err_msg=name)
    ids = torch.randint(0, model.config.vocab_size, (1, 13))
    torch.testing.assert_close(_logits(LanguageModel.from_pretrained(theirs), ids),
                               _logits(LanguageModel.from_pretrained(ours), ids), rtol=0, atol=0)


def test_load_model_takes_a_gguf_file(tmp_path: Path) -> None:
    """The CLI's loader (generate, serve) reads a .gguf file as from_pretrained does; a text tokenizer must be
    given, since the one inside the file is not read."""
    from ssmkit.models.loading import load_model

    torch.manual_seed(0)
    model = LanguageModel(get_preset("debug-mamba2")).eval()
    write_gguf(model, tmp_path / "m.gguf", "f32")
    loaded, tok, path = load_model(tmp_path / "m.gguf", need_tokenizer=False)
    assert tok is None and path == tmp_path / "m.gguf"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="--tokenizer"):
        load_model(tmp_path / "m.gguf")
