"""Careless-user inputs to the CLI end in one clear line, never a traceback (issue 19, items 10-15)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssmkit.cli import build_parser, main
from ssmkit.models import ModelConfig, get_preset
from ssmkit.models.size import LIMIT_ENV
from ssmkit.train.checkpoint import CorruptCheckpoint, verify

ROOT = Path(__file__).resolve().parents[1]


def _usage_error(capsys, argv, *needles):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("argv, message", [
    (["serve", "--checkpoint", "x", "--port", "70000"],
     "argument --port: must be an integer from 0 to 65535, got '70000'"),
    (["serve", "--checkpoint", "x", "--max-batch", "0"], "argument --max-batch: must be an integer from 1"),
    (["serve", "--checkpoint", "x", "--request-timeout", "inf"], "argument --request-timeout: must be a number > 0"),
    (["serve", "--checkpoint", "x", "--session-memory-mb", "nan"],
     "argument --session-memory-mb: must be a number >= 0"),
    (["generate", "--checkpoint", "x", "--top-p", "1.5"], "argument --top-p: must be a number > 0 and <= 1"),
    (["generate", "--checkpoint", "x", "--max-new-tokens", "-1"], "argument --max-new-tokens: must be an integer"),
    (["generate", "--checkpoint", "x", "--temperature", "-0.5"], "argument --temperature: must be a number >= 0"),
    (["info", "--preset", "debug-mamba2", "--context", "99999999999"], "argument --context: must be an integer"),
    (["train", "--out", "o", "--steps", "0"], "argument --steps: must be an integer from 1"),
    (["eval", "mqar", "--smoke", "--kv-counts", "4", "-2"], "argument --kv-counts: must be an integer from 0"),
])
def test_numeric_options_out_of_range_are_usage_errors(capsys, argv, message):
    _usage_error(capsys, argv, message)


def test_every_numeric_option_has_a_range():
    def walk(parser):
        for action in parser._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for sub in action.choices.values():
                    yield from walk(sub)
            else:
                yield action

    assert not [a.option_strings for a in walk(build_parser()) if a.type in (int, float)]


def test_train_time_zero_is_refused_not_a_thousand_steps(capsys, tmp_path):
    out = tmp_path / "run"
    _usage_error(capsys, ["train", "--out", str(out), "--time", "0"], "--time: must be a number > 0",
                 "give --steps N")
    assert not out.exists()


@pytest.mark.parametrize("content, message", [
    ("{not json", "run.json: not valid JSON"),
    ('{"model": {}, "train": 3}', "run.json: not a training run record (no 'train' object)"),
    ('{"model": {"d_model": 8}, "train": {}, "data": {}}', "run.json: missing required config key"),
    ("", "run.json: not valid JSON"),
    (json.dumps({"model": get_preset("debug-mamba2").to_dict(), "train": {"steps": "many"}, "data": {}}), "run.json: "),
    (json.dumps({"model": get_preset("debug-mamba2").to_dict(), "train": {"stepz": 3}, "data": {}}),
     "run.json: train: unknown key(s) stepz"),
])
def test_a_corrupt_run_json_names_the_file(capsys, tmp_path, content, message):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(content)
    assert main(["train", "--out", str(out), "--resume", "--train.progress", "false"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_model_options_too_large_are_refused_before_any_data_is_read(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv(LIMIT_ENV, raising=False)
    missing = tmp_path / "no-such-data"  # reading it would fail: the size check must come first
    assert main(["train", "--out", str(tmp_path / "run"), "--data", str(missing), "--model.d_model", "10000000"]) == 1
    err = capsys.readouterr().err
    assert "would have" in err and LIMIT_ENV in err and "--model" in err, err
    assert main(["train", "--out", str(tmp_path / "run"), "--model.vocab_size", "99999999999999"]) == 2
    assert "vocab_size must be at most 2,147,483,647" in capsys.readouterr().err


def test_generate_with_an_absurd_config_is_one_line(tmp_path):
    ckpt = tmp_path / "absurd"
    ckpt.mkdir()
    config = ModelConfig(vocab_size=50280, d_model=8192, n_layer=400)
    (ckpt / "config.json").write_text(json.dumps({"format": "ssmkit", "format_version": 1,
                                                  "architecture": "LanguageModel", "config": config.to_dict()}))
    # A child process: a regression would be the OOM killer, which must not take the test runner with it.
    proc = subprocess.run([sys.executable, "-m", "ssmkit", "generate", "--checkpoint", str(ckpt), "--prompt", "a"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "SSMKIT_MAX_MODEL_BYTES": "4G"})
    assert proc.returncode == 1, proc.stderr
    assert "absurd/config.json: this model would have" in proc.stderr and "Traceback" not in proc.stderr
    (ckpt / "config.json").write_text(json.dumps({"model_type": "mamba", "num_hidden_layers": 1_000_000}))
    assert main(["generate", "--checkpoint", str(ckpt)]) == 1


def test_a_checkpoint_state_cannot_name_files_outside_its_folder(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps({"files": {"../../etc/passwd": [1, "x"]}}))
    with pytest.raises(CorruptCheckpoint, match="not a file of this folder"):
        verify(tmp_path)


def test_preset_sizes_pass_the_check():
    # Every preset this package ships fits in the memory of the machine it is meant for: the check only
    # refuses what cannot be built anyway. (jamba-v0.1 is 52B: on meta only.)
    from ssmkit.models.size import estimate_size

    assert estimate_size(get_preset("mamba-130m")).nbytes() < 1e9


def test_prompt_files_are_size_checked_before_reading(capsys, tmp_path, monkeypatch):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("x" * 100)
    monkeypatch.setenv("SSMKIT_MAX_FILE_BYTES", "10")
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt-file", str(prompt)]) == 1
    err = capsys.readouterr().err
    assert "cannot read --prompt-file" in err and "100 bytes, larger than the 10 bytes" in err, err
