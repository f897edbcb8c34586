"""Checkpoints named by Hugging Face Hub id, through a hub cache laid out as huggingface_hub lays it out,
offline (issue 27). No test touches the network: HF_HUB_OFFLINE=1 throughout."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("huggingface_hub", reason="the hub extra (huggingface_hub) is not installed")
tokenizers = pytest.importorskip("tokenizers", reason="the tokens extra (tokenizers) is not installed")

from ssmkit.cli import main
from ssmkit.data.tokenizer import MissingTokenizerError, load_tokenizer
from ssmkit.io.hub import is_hub_id, resolve_checkpoint
from ssmkit.models import LanguageModel, MambaConfig, ModelConfig

MAIN, V1 = "a" * 40, "b" * 40


def _tokenizer_json(path: Path) -> int:
    """A small byte-level BPE tokenizer.json; returns its vocabulary size."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(["def main():\n    return 1\n", "hello world, hello hub"] * 20, vocab_size=300,
                            min_frequency=1, show_progress=False)
    tok.save(str(path))
    return tok.get_vocab_size()


def _transformers_folder(folder: Path, vocab: int, seed: int, tokenizer: bool) -> Path:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab, d_model=16, n_layer=2, layer_pattern="M", pad_vocab_size_multiple=1,
                         mamba=MambaConfig(d_state=4))
    LanguageModel(config).save_pretrained(folder, format="transformers")
    if tokenizer:
        _tokenizer_json(folder / "tokenizer.json")
    return folder


def _add_to_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = MAIN, ref: str = "main") -> Path:
    """``files`` into ``cache`` as huggingface_hub stores them: content-addressed blobs, a snapshot of
    relative links per commit, and refs/<ref> naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub cache with org/tiny (main and tag v1: two different random models), org/tiny-notok (no
    tokenizer), state-spaces/mamba-130m (mamba_ssm's own format, pickled) and org/pickled (transformers
    config, pytorch_model.bin only)."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    vocab = _tokenizer_json(root / "probe.json")
    tiny = _transformers_folder(root / "tiny", vocab, seed=0, tokenizer=True)
    _add_to_cache(cache, "org/tiny", _files(tiny))
    _add_to_cache(cache, "org/tiny", _files(_transformers_folder(root / "tiny1", vocab, 1, True)), V1, "v1")
    _add_to_cache(cache, "org/tiny-notok", _files(_transformers_folder(root / "notok", vocab, 2, False)))
    mamba_ssm = {"d_model": 16, "n_layer": 2, "vocab_size": 64, "ssm_cfg": {}, "rms_norm": True,
                 "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}
    _add_to_cache(cache, "state-spaces/mamba-130m", {"config.json": json.dumps(mamba_ssm).encode()})
    _add_to_cache(cache, "org/pickled", {"config.json": (tiny / "config.json").read_bytes()})
    return {"cache": cache, "tiny": tiny, "vocab": vocab}


@pytest.fixture(autouse=True)
def offline_cache(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local folder named org/... shadows the ids


def _logits(model: LanguageModel) -> torch.Tensor:
    return model(torch.arange(10)[None] % model.config.vocab_size).logits


def test_hub_ids_and_paths_are_told_apart():
    assert is_hub_id("state-spaces/mamba-130m-hf") and is_hub_id("org/name.v2")
    for name in ("model", "./org/name", "/abs/path", "org/name/sub", "../org", "org/..", "org/config.json", ""):
        assert not is_hub_id(name), name


def test_from_pretrained_by_id_and_revision(hub):
    by_path = LanguageModel.from_pretrained(hub["tiny"])
    by_id = LanguageModel.from_pretrained("org/tiny")
    assert torch.equal(_logits(by_id), _logits(by_path))
    assert resolve_checkpoint("org/tiny").name == MAIN
    v1 = LanguageModel.from_pretrained("org/tiny", revision="v1")
    assert resolve_checkpoint("org/tiny", revision="v1").name == V1
    assert not torch.equal(_logits(v1), _logits(by_id))
    assert load_tokenizer("org/tiny").vocab_size == load_tokenizer("org/tiny", revision="v1").vocab_size == hub["vocab"]


def test_a_local_folder_wins_over_an_id_of_the_same_spelling(hub, tmp_path):
    local = _transformers_folder(tmp_path / "org" / "tiny", hub["vocab"], seed=5, tokenizer=False)
    assert resolve_checkpoint("org/tiny") == Path("org/tiny")
    by_id, by_path = LanguageModel.from_pretrained("org/tiny"), LanguageModel.from_pretrained(local)
    assert torch.equal(_logits(by_id), _logits(by_path))
    with pytest.raises(ValueError, match="a revision applies only to Hugging Face Hub ids"):
        resolve_checkpoint("org/tiny", revision="v1")


def test_missing_ids_and_revisions_offline_say_so():
    with pytest.raises(FileNotFoundError, match="org/missing is not in the Hugging Face cache.*HF_HUB_OFFLINE=1"):
        LanguageModel.from_pretrained("org/missing")
    with pytest.raises(FileNotFoundError, match="at revision 'v9' is not in the Hugging Face cache"):
        resolve_checkpoint("org/tiny", revision="v9")
    with pytest.raises(FileNotFoundError, match="checkpoint not found: no/such/folder"):
        resolve_checkpoint("no/such/folder")


def test_pickle_only_repos_are_refused_naming_the_conversion():
    with pytest.raises(ValueError, match="mamba_ssm checkpoint.*use its transformers conversion "
                                         "state-spaces/mamba-130m-hf"):
        LanguageModel.from_pretrained("state-spaces/mamba-130m")
    with pytest.raises(ValueError, match="org/pickled: its snapshot in the cache .* has no safetensors weights.*never "
                                         "downloads or unpickles"):
        LanguageModel.from_pretrained("org/pickled")


def test_a_local_mamba_ssm_folder_gets_the_same_hint(tmp_path):
    folder = tmp_path / "mamba-130m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"d_model": 768, "n_layer": 24, "ssm_cfg": {}, "vocab_size": 50277}))
    with pytest.raises(ValueError, match="mamba_ssm checkpoint"):
        LanguageModel.from_pretrained(folder)


def test_without_huggingface_hub_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"pip install 'ssmkit\[hub\]'"):
        resolve_checkpoint("org/tiny")
    assert resolve_checkpoint(".") == Path(".")  # local paths need no hub


def test_cli_generate_info_convert_by_id(capsys, hub, tmp_path):
    argv = ["generate", "--checkpoint", "org/tiny", "--prompt", "def ", "--max-new-tokens", "8", "--seed", "0"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("def ")
    assert main([*argv, "--revision", "v1"]) == 0
    assert capsys.readouterr().out.startswith("def ")

    assert main(["info", "--checkpoint", "org/tiny", "--revision", "v1"]) == 0
    assert f"snapshots/{V1}" in capsys.readouterr().out

    out = tmp_path / "converted"
    assert main(["convert", "org/tiny", str(out), "--to", "ssmkit"]) == 0
    assert (out / "tokenizer.json").is_file()
    assert torch.equal(_logits(LanguageModel.from_pretrained(out)), _logits(LanguageModel.from_pretrained("org/tiny")))


def test_cli_eval_text_by_id(capsys, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("hello world, hello hub\n" * 50)
    assert main(["eval", "text", "--checkpoint", "org/tiny", "--data", str(data), "--seq-len", "16",
                 "--device", "cpu"]) == 0
    assert f"snapshots/{MAIN}" in (out := capsys.readouterr().out) and "val_bpb" in out


def test_cli_serve_loads_by_id(monkeypatch, hub):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    seen = {}
    monkeypatch.setattr("ssmkit.serve.server.serve",
                        lambda model, tokenizer, folder, options: seen.update(folder=folder, options=options,
                                                                              vocab=tokenizer.vocab_size))
    assert main(["serve", "--checkpoint", "org/tiny", "--revision", "v1", "--port", "0"]) == 0
    assert seen["folder"].name == V1 and seen["options"].model_name == "org/tiny" and seen["vocab"] == hub["vocab"]


def test_a_checkpoint_without_tokenizer_is_an_error_unless_given_one_or_ids(capsys, hub):
    assert main(["generate", "--checkpoint", "org/tiny-notok", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert "no tokenizer" in err and "--tokenizer FILE" in err and "--ids" in err
    with pytest.raises(MissingTokenizerError):
        load_tokenizer(resolve_checkpoint("org/tiny-notok"))
    tokenizer = str(hub["tiny"] / "tokenizer.json")
    assert main(["generate", "--checkpoint", "org/tiny-notok", "--prompt", "hi", "--tokenizer", tokenizer,
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("hi")
    assert main(["generate", "--checkpoint", "org/tiny-notok", "--ids", "--prompt", "1 2 3", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    ids = capsys.readouterr().out.split()
    assert len(ids) == 5 and all(0 <= int(i) < hub["vocab"] for i in ids)
    assert main(["generate", "--checkpoint", "org/tiny-notok", "--ids", "--prompt", "1 x"]) == 2
    assert main(["serve", "--checkpoint", "org/tiny-notok", "--port", "0"]) == 1
    assert "no tokenizer" in capsys.readouterr().err
    # info needs no tokenizer
    assert main(["info", "--checkpoint", "org/tiny-notok"]) == 0


def _as_mamba_ssm(model: LanguageModel, folder: Path, config: dict) -> None:
    """``model`` saved as mamba_ssm's MambaLMHeadModel would be, with safetensors weights."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    tensors = {}
    for name, t in model.state_dict().items():
        name = "backbone." + name.replace(".ff_norm.", ".norm2.") if not name.startswith("lm_head") else name
        if ".ff.gate_proj." in name or ".ff.up_proj." in name:
            continue
        tensors[name.replace(".ff.down_proj.", ".mlp.fc2.")] = t.contiguous()
    for i, block in enumerate(model.layers):
        if block.ff is not None:  # mamba_ssm's GatedMLP: fc1 = [value; gate]
            fc1 = torch.cat([block.ff.up_proj.weight, block.ff.gate_proj.weight])
            tensors[f"backbone.layers.{i}.mlp.fc1.weight"] = fc1
    tensors.setdefault("lm_head.weight", model.head_weight.detach().clone())  # mamba_ssm stores the tied head too
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("layer, d_intermediate, tie", [("Mamba1", 0, True), ("Mamba2", 24, False)])
def test_mamba_ssm_checkpoints_with_safetensors_load(tmp_path, layer, d_intermediate, tie):
    ssm_cfg = {"layer": layer, "d_state": 8} if layer == "Mamba1" else {"layer": layer, "d_state": 8, "headdim": 8,
                                                                          "ngroups": 2, "chunk_size": 16}
    raw = {"d_model": 16, "d_intermediate": d_intermediate, "n_layer": 2, "vocab_size": 50, "ssm_cfg": ssm_cfg,
           "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
           "pad_vocab_size_multiple": 8, "tie_embeddings": tie}
    from ssmkit.models.formats.mamba_ssm import config_from_mamba_ssm

    torch.manual_seed(3)
    reference = LanguageModel(config_from_mamba_ssm(raw, Path("config.json")))
    _as_mamba_ssm(reference, tmp_path / "m", raw)
    loaded = LanguageModel.from_pretrained(tmp_path / "m")
    assert loaded.config.padded_vocab_size == 56 and loaded.config.layer_pattern == ("M" if layer == "Mamba1" else "2m")
    assert torch.equal(_logits(loaded), _logits(reference))
    for bad, message in (({"attn_layer_idx": [1]}, "attn_layer_idx"), ({"rms_norm": False}, "rms_norm"),
                         ({"ssm_cfg": {"layer": "Mamba9"}}, "ssm_cfg.layer 'Mamba9'"),
                         ({"ssm_cfg": {"d_stat": 4}}, "not a mamba_ssm config ssmkit can read")):
        (tmp_path / "m" / "config.json").write_text(json.dumps({**raw, **bad}))
        with pytest.raises(ValueError, match=message):
            LanguageModel.from_pretrained(tmp_path / "m")


def test_online_only_json_and_safetensors_are_asked_for(monkeypatch, hub):
    import fnmatch

    import huggingface_hub

    calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    snapshot = hub["cache"] / "models--org--tiny" / "snapshots" / MAIN
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.append(kw) or str(snapshot))
    resolve_checkpoint("org/tiny", revision="main")
    (kw,) = calls
    assert kw["local_files_only"] is False and kw["revision"] == "main" and kw["cache_dir"] == hub["cache"]
    wanted = ["config.json", "tokenizer.json", "model.safetensors", "model.safetensors.index.json",
              "model-00001-of-00002.safetensors", "tokenizer_config.json"]
    refused = ["pytorch_model.bin", "pytorch_model.bin.index.json.bin", "model.ckpt", "model.pt", "tf_model.h5",
               "flax_model.msgpack", "model.pkl"]
    matches = {name: any(fnmatch.fnmatch(name, p) for p in kw["allow_patterns"]) for name in wanted + refused}
    assert all(matches[n] for n in wanted) and not any(matches[n] for n in refused), matches


def test_online_without_network_uses_the_cache_or_says_the_hub_is_unreachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    assert resolve_checkpoint("org/tiny").name == MAIN
    with pytest.raises(FileNotFoundError, match=r"org/missing is not in the Hugging Face cache \(.*\) and the "
                                                "Hugging Face Hub cannot be reached"):
        resolve_checkpoint("org/missing")


def test_a_real_server_serves_a_hub_id(tmp_path):
    httpx = pytest.importorskip("httpx", reason="the test extra (httpx) is not installed")
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    import socket
    import subprocess
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")  # HF_HUB_CACHE, HF_HUB_OFFLINE set above
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ssmkit", "serve", "--checkpoint", "org/tiny", "--revision",
                                 "v1", "--port", str(port), "--sessions-dir", str(tmp_path / "sessions")],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["org/tiny"]
        reply = httpx.post(f"{url}/v1/completions", json={"model": "org/tiny", "prompt": "hello", "max_tokens": 3,
                                                          "temperature": 0}, timeout=30)
        assert reply.status_code == 200, reply.text
        assert isinstance(reply.json()["choices"][0]["text"], str)
    finally:
        proc.terminate()
        proc.wait(15)
