"""ssmkit/evals/_merge.py: ``ssmkit eval TASK --merge DIR ...`` puts runs made apart (one model each) together.

The reference is one process training every model: with the same settings and seeds, on CPU, each model's
numbers do not depend on which other models the process trains, so the merge of single-model runs must
give the very table and result of the run of all of them.
"""

import argparse
import copy
import json
import os
import sysconfig
from pathlib import Path

import pytest
import torch

from ssmkit.cli import _subparser, build_parser, main

SMALL_TEXT = str(Path(sysconfig.get_paths()["stdlib"]) / "json")
MERGEABLE = ("selective-copying", "induction-heads", "mqar", "needle", "byte-lm", "smnist")
# Tiny versions of each task's --smoke run, with two models each.
TINY = {
    "selective-copying": ["--steps", "3", "--eval-batches", "1"],
    "induction-heads": ["--models", "mamba", "mamba2", "--steps", "3", "--max-log2-len", "5", "--eval-sequences", "4"],
    "needle": ["--models", "mamba", "mamba2", "--steps", "2", "--eval-prompts", "2", "--data", SMALL_TEXT],
    "smnist": ["--models", "s4d", "mamba", "--epochs", "1", "--d-model", "8", "--batch-size", "64"],
    "byte-lm": ["--models", "mamba", "transformer", "--tokens", "2048", "--evals", "1", "--eval-tokens", "1024"],
}
PLOTS = {"selective-copying": "selective_copying.png", "induction-heads": "induction_heads.png", "mqar": "mqar.png",
         "needle": "needle.png", "smnist": "accuracy.png", "byte-lm": "bpb_vs_flops.png"}


def _read(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


def _eval(capsys, *argv) -> str:
    status = main(["eval", *map(str, argv)])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    return printed.out


def _fails(capsys, argv, *needles) -> str:
    assert main(["eval", *map(str, argv)]) == 1
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


def _without_seconds(value):
    """Timings differ between processes; everything else must not."""
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if k not in ("seconds", "train_seconds")}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


@pytest.fixture(scope="module")
def mqar_runs(tmp_path_factory):
    """MQAR trained in one process with both models, and each model in a run of its own."""
    root = tmp_path_factory.mktemp("mqar")
    torch.set_num_threads(1)
    tiny = ["--smoke", "--device", "cpu", "--steps", "6", "--eval-sequences", "16"]
    for name, models in (("both", ["mamba", "hybrid"]), ("mamba", ["mamba"]), ("hybrid", ["hybrid"])):
        assert main(["eval", "mqar", *tiny, "--models", *models, "--out", str(root / name)]) == 0
    return root


def test_merged_runs_give_the_table_and_numbers_of_one_run_of_both(mqar_runs, tmp_path, capsys):
    out = tmp_path / "merged"
    printed = _eval(capsys, "mqar", "--merge", mqar_runs / "mamba", mqar_runs / "hybrid", "--out", out)
    merged, both = _read(out), _read(mqar_runs / "both")
    parts = [_read(mqar_runs / "mamba"), _read(mqar_runs / "hybrid")]
    assert list(merged["models"]) == ["mamba", "hybrid"] and merged["settings"]["models"] == ["mamba", "hybrid"]
    # Each model's entry is its part's, unchanged; and what one process training both got, timings aside.
    assert merged["models"] == {**parts[0]["models"], **parts[1]["models"]}
    assert _without_seconds(merged["models"]) == _without_seconds(both["models"])
    assert merged["table"] == both["table"] and merged["table"] in printed
    assert merged["merged_from"] == [str(mqar_runs / "mamba"), str(mqar_runs / "hybrid")]
    for key in ("task", "smoke", "settings", "chance", "device", "torch"):
        assert merged[key] == both[key], key
    assert (out / "mqar.png").stat().st_size > 1000
    # The merged result.json is a result like any other: merging it alone gives it back.
    again = tmp_path / "again"
    _eval(capsys, "mqar", "--merge", out, "--out", again)
    assert _read(again) == {**merged, "merged_from": [str(out)]}


@pytest.mark.parametrize("task", sorted(TINY))
def test_every_task_merges_its_single_model_parts_into_the_run_of_all(task, tmp_path, capsys):
    whole = tmp_path / "whole"
    _eval(capsys, task, "--smoke", "--device", "cpu", *TINY[task], "--out", whole)
    result = _read(whole)
    runs_key = "runs" if task in ("byte-lm", "smnist") else "models"
    names = result["settings"]["models"]
    assert len(names) == 2
    parts = []
    for i, name in enumerate(names):
        part = copy.deepcopy(result)
        part["settings"]["models"] = [name]
        part[runs_key] = ([result[runs_key][i]] if runs_key == "runs" else {name: result[runs_key][name]})
        part["table"] = "(the table of this part alone)"
        parts.append(tmp_path / name)
        parts[-1].mkdir()
        (parts[-1] / "result.json").write_text(json.dumps(part))
    out = tmp_path / "merged"
    printed = _eval(capsys, task, "--merge", *parts, "--out", out)
    merged = _read(out)
    assert merged.pop("merged_from") == [str(p) for p in parts]
    if task == "byte-lm":
        # The training folders stay in the parts: run_dir leads there from --out.
        for run, part in zip(result["runs"], parts):
            run["run_dir"] = os.path.relpath(part / run["run_dir"], out)
    assert merged == result
    assert result["table"] in printed and (out / PLOTS[task]).stat().st_size > 1000


@pytest.fixture
def parts(mqar_runs, tmp_path):
    """Copies of the single-model MQAR runs, free to be spoiled."""
    for name in ("mamba", "hybrid"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_bytes((mqar_runs / name / "result.json").read_bytes())
    return tmp_path / "mamba", tmp_path / "hybrid"


def _edit(folder: Path, change) -> None:
    result = _read(folder)
    change(result)
    (folder / "result.json").write_text(json.dumps(result))


def test_runs_of_other_experiments_are_refused_naming_the_file(parts, tmp_path, capsys):
    mamba, hybrid = parts
    out = ["--out", tmp_path / "out"]
    _edit(hybrid, lambda r: r.update(task="needle"))
    _fails(capsys, ["mqar", "--merge", mamba, hybrid, *out], f"{hybrid / 'result.json'} is a result of 'needle'")
    _edit(hybrid, lambda r: r.update(task="mqar"))
    _edit(hybrid, lambda r: r["settings"].update(lr=0.25, steps=7))
    _fails(capsys, ["mqar", "--merge", mamba, hybrid, *out], f"{hybrid / 'result.json'} is not a run of the same",
           "settings.steps 7 (vs 6)", "settings.lr 0.25 (vs 0.005)", "Only --models may differ")
    _edit(hybrid, lambda r: r["settings"].update(lr=0.005, steps=6, models=["attention"]))
    _edit(hybrid, lambda r: r.update(smoke=False))
    _fails(capsys, ["mqar", "--merge", mamba, hybrid, *out], "smoke False (vs True)")
    assert not (tmp_path / "out" / "result.json").exists()


def test_a_model_twice_and_bad_folders_are_refused(parts, tmp_path, capsys):
    mamba, hybrid = parts
    out = ["--out", tmp_path / "out"]
    _fails(capsys, ["mqar", "--merge", mamba, hybrid, mamba, *out],
           f"model 'mamba' is in both {mamba} and {mamba}; give each model once")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, ["mqar", "--merge", mamba, empty, *out], f"{empty / 'result.json'} not found")
    (empty / "result.json").write_text('{"task": "mqar", "models": ')
    _fails(capsys, ["mqar", "--merge", mamba, empty, *out], f"{empty / 'result.json'} is not valid JSON")
    (empty / "result.json").write_bytes(b"\xff\xfe\x00")
    _fails(capsys, ["mqar", "--merge", mamba, empty, *out], f"{empty / 'result.json'} is not valid JSON")
    for foreign in ('[1, 2]', '{"val_bpb": 1.5}'):
        (empty / "result.json").write_text(foreign)
        _fails(capsys, ["mqar", "--merge", mamba, empty, *out], f"{empty / 'result.json'} is not the result of")
    (empty / "result.json").write_text('{"task": "mqar", "smoke": true, "settings": {"models": ["s4d"]}}')
    _fails(capsys, ["mqar", "--merge", mamba, empty, *out], "lacks the fields of a 'mqar' result")
    # The merge may not overwrite one of its own parts.
    _fails(capsys, ["mqar", "--merge", mamba, hybrid, "--out", hybrid], "is one of the merged folders")
    assert not (tmp_path / "out" / "result.json").exists()


def test_every_option_but_out_is_refused_with_merge_and_only_per_model_tasks_have_it(capsys):
    parser = build_parser()
    for task in MERGEABLE:
        sub = _subparser(parser, argparse.Namespace(command="eval", task=task))
        flags = [a for a in sub._actions if a.option_strings and a.dest not in ("help", "out", "merge")]
        assert len(flags) > 5
        for action in flags:
            flag = action.option_strings[0]
            # Zero for numbers: a given 0 counts as given.
            number = getattr(action.type, "kind", action.type) in (int, float)  # the CLI wraps them in ranges
            value = [] if action.nargs == 0 else ["0" if number else "x"]
            _fails(capsys, [task, "--merge", "a", "b", flag, *value],
                   f"--merge trains nothing and takes the settings from the merged runs; drop {flag}")
    for task in ("text",):
        sub = _subparser(parser, argparse.Namespace(command="eval", task=task))
        assert "--merge" not in sub.format_help()
