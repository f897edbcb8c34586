import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from ssmkit.cli import main
from ssmkit.data import ByteTokenizer
from ssmkit.models import LanguageModel, get_preset

ROOT = Path(__file__).resolve().parents[1]
DATA = str(Path(sysconfig.get_paths()["stdlib"]) / "json")
TINY = ["--preset", "debug-mamba2", "--data", DATA, "--data.separator", "\n\n", "--data.seq_len", "32",
        "--train.batch_size", "2", "--train.eval_tokens", "128", "--train.sample_tokens", "0",
        "--train.progress", "false", "--train.warmup_steps", "1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--out", str(out), "--steps", "3", *TINY]) == 0
    return out


def _fails(capsys, argv, status, *needles):
    assert main(argv) == status
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


def test_train_help_lists_sections_with_field_docs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Peak learning rate of AdamW" in out and "--model.d_model" in out and "--data.batching" in out


def test_train_flag_errors(capsys, tmp_path):
    out = str(tmp_path / "x")
    _fails(capsys, ["train", "--out", out, "--train.lrr", "1"], 2, "unrecognized argument '--train.lrr'",
           "did you mean --train.lr")
    _fails(capsys, ["train", "--out", out, "--train.lr", "fast"], 2, "--train.lr must be a number, got 'fast'")
    _fails(capsys, ["train", "--out", out, "--model.d_state", "4"], 2, "unrecognized argument '--model.d_state'",
           "--model.mamba.d_state")
    _fails(capsys, ["train", "--out", out, "--preset", "nope"], 2, "unknown preset 'nope'", "byte-small")
    _fails(capsys, ["train", "--out", out, "--train.precision", "fp8"], 1, "train.precision must be")
    _fails(capsys, ["train", "--out", out, "--data", str(tmp_path / "missing")], 1, "data path not found",
           "missing")
    _fails(capsys, ["train", "--out", out, "--model.vocab_size", "100"], 2, "smaller than the tokenizer's 259")
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", out, "--steps", "3", "--time", "1"])
    assert e.value.code == 2
    _fails(capsys, ["train", "--out", out, "--resume"], 1, "run.json not found")


def test_resume_refuses_a_different_model_and_fresh_runs_refuse_an_existing_one(capsys, run_dir):
    _fails(capsys, ["train", "--out", str(run_dir), "--resume", *TINY, "--model.d_model", "64"], 2,
           "--resume continues the saved model", "d_model")
    _fails(capsys, ["train", "--out", str(run_dir), "--steps", "3", *TINY], 1, "pass --resume")


def test_resume_with_the_same_command_continues(capsys, run_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert main(["train", "--out", str(run), "--resume", "--steps", "4", *TINY]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert (run / "checkpoints" / "step_0000004").is_dir()


def test_generate_streams_a_deterministic_continuation(capsys, run_dir):
    argv = ["generate", "--checkpoint", str(run_dir), "--prompt", "def ", "--max-new-tokens", "20", "--seed", "1"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("def ") and len(first) > len("def \n")
    assert main(argv) == 0
    assert capsys.readouterr().out == first


def test_generate_with_bfloat16_weights(capsys, run_dir, monkeypatch):
    """--dtype bfloat16 loads the matmul weights in bf16 and still streams a continuation."""
    from ssmkit.models import LanguageModel as Loaded

    loaded = []
    original = Loaded.from_pretrained.__func__
    monkeypatch.setattr(Loaded, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loaded.append(original(cls, *a, **k)) or loaded[-1]))
    argv = ["generate", "--checkpoint", str(run_dir), "--prompt", "def ", "--max-new-tokens", "12", "--seed", "1"]
    assert main([*argv, "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def ") and len(out) > len("def \n")
    # The matmul weights in bf16; A_log, D and dt_bias stay float32 by design.
    assert {p.dtype for n, p in loaded[-1].named_parameters() if n.endswith("proj.weight")} == {torch.bfloat16}
    assert main(argv) == 0  # auto on a CPU: float32
    capsys.readouterr()
    assert {p.dtype for p in loaded[-1].parameters()} == {torch.float32}
    # int8: weight-only int8 mixer projections and head (ssmkit.layers.quantized), still a continuation.
    assert main([*argv, "--dtype", "int8"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert {b.dtype for n, b in loaded[-1].named_buffers() if n.endswith("qweight")} == {torch.int8}
    with pytest.raises(SystemExit) as e:
        main([*argv, "--dtype", "int4"])
    assert e.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err


def test_generate_errors(capsys, run_dir, tmp_path):
    _fails(capsys, ["generate", "--checkpoint", str(tmp_path / "none")], 1, "checkpoint not found")
    _fails(capsys, ["generate", "--checkpoint", str(tmp_path)], 1, "no model in")
    _fails(capsys, ["generate", "--checkpoint", str(run_dir), "--prompt-file", str(tmp_path / "p.txt")], 1,
           "cannot read --prompt-file")
    # A byte tokenizer next to a model with a 64-token vocabulary: not a pair.
    folder = tmp_path / "mismatch"
    LanguageModel(get_preset("debug-mamba2")).save_pretrained(folder)
    ByteTokenizer().save(folder)
    _fails(capsys, ["generate", "--checkpoint", str(folder)], 1, "does not belong to this model")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "gpt2"}')
    _fails(capsys, ["generate", "--checkpoint", str(bad)], 1, "model_type 'gpt2' is not supported")


def test_eval_on_the_run_validation_and_on_given_data(capsys, run_dir, tmp_path):
    assert main(["eval", "--checkpoint", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "val_bpb" in out and "seq_len 32" in out
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x\n" * 20)
    assert main(["eval", "--checkpoint", str(run_dir / "model"), "--data", str(text), "--seq-len", "64"]) == 0
    assert "1 documents, 460 bytes" in capsys.readouterr().out
    folder = tmp_path / "plain"
    config = get_preset("debug-mamba2")
    config.vocab_size = 259
    LanguageModel(config).save_pretrained(folder)
    _fails(capsys, ["eval", "--checkpoint", str(folder)], 2, "not part of a training run")


def test_info_and_list(capsys, run_dir):
    assert main(["info", "--preset", "byte-small"]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "cache for one sequence" in out and "FLOPs per token" in out
    assert main(["info", "--checkpoint", str(run_dir)]) == 0
    assert '"vocab_size": 259' in capsys.readouterr().out
    assert main(["info", "--list"]) == 0
    assert "mamba2-130m" in capsys.readouterr().out


def test_info_of_a_52b_preset_allocates_nothing(capsys):
    """jamba-v0.1 is built on the meta device: its published parameter count, no 200 GB allocation."""
    assert main(["info", "--preset", "jamba-v0.1", "--context", "4096"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 51,570,323,328" in out
    assert "at 4,096 tokens" in out and "from the layer registry" in out
    # Jamba-v0.1's 12B active parameters (two of 16 experts per MoE layer) at 2 FLOPs each, plus the scans
    # and attention: about 24 GFLOPs per token.
    mflops = float(re.search(r"FLOPs per token, forward: ([\d,.]+) M", out).group(1).replace(",", ""))
    assert 23_500 < mflops < 25_500


def test_convert_round_trip(capsys, run_dir, tmp_path):
    hf, back = tmp_path / "hf", tmp_path / "back"
    assert main(["convert", str(run_dir), str(hf), "--to", "transformers"]) == 0
    assert main(["convert", str(hf), str(back), "--to", "ssmkit"]) == 0
    a, b = LanguageModel.from_pretrained(run_dir / "model"), LanguageModel.from_pretrained(back)
    ids = torch.randint(0, 259, (1, 17))
    assert torch.equal(a(ids).logits, b(ids).logits)
    _fails(capsys, ["convert", str(run_dir), str(hf), "--to", "ssmkit"], 1, "exists and is not empty")


def test_python_dash_m_entry_point():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "ssmkit", "info", "--list", "--bogus"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "unrecognized argument '--bogus'" in done.stderr
