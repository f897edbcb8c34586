"""`ssmkit eval dis --smoke` end to end (8x8 digits, a few steps): table, result.json, plots, --merge."""

from __future__ import annotations

import json

import pytest

from ssmkit.cli import main

pytest.importorskip("sklearn", reason="the smoke run uses scikit-learn's bundled 8x8 digits")
pytest.importorskip("matplotlib", reason="the eval draws PNG plots")


def _run(tmp_path, capsys, name, *argv):
    out = tmp_path / name
    assert main(["eval", "dis", "--smoke", "--device", "cpu", "--out", str(out), *argv]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert result["table"] in printed
    # the wall-clock time since the start (what a GPU slot must fit) covers each model's training and sampling
    assert result["runs"][-1]["elapsed_seconds"] >= sum(r["train_seconds"] + r["sample_seconds"]
                                                        for r in result["runs"])
    return result, out


def test_dis_smoke_parts_merge_into_one_run(tmp_path, capsys):
    mamba_part, _ = _run(tmp_path, capsys, "mamba", "--models", "mamba")
    attention_part, _ = _run(tmp_path, capsys, "attention", "--models", "attention")
    out = tmp_path / "merged"
    assert main(["eval", "dis", "--merge", str(tmp_path / "mamba"), str(tmp_path / "attention"),
                 "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["table"] in capsys.readouterr().out
    assert [r["model"] for r in result["runs"]] == ["mamba", "attention"]
    assert result["runs"] == [mamba_part["runs"][0], attention_part["runs"][0]]
    mamba, attention = result["runs"]
    # Same size (the attention part matched Mamba's without training it) and about the same counted FLOPs.
    assert abs(attention["params"] - mamba["params"]) / mamba["params"] < 0.02
    assert abs(attention["train_flops"] - mamba["train_flops"]) / mamba["train_flops"] < 0.2
    for r in result["runs"]:
        assert 0 <= r["accuracy"] <= 1 and r["frechet"] >= 0 and len(r["per_class_accuracy"]) == 10
        assert list(r["sampling_time"]) == ["16", "64"]  # patches at sides 8 and 16 with patch 2
        assert r["grid_plot"] == f"digits_{r['model']}.png" and (out / r["grid_plot"]).stat().st_size > 1000
    assert result["plots"] == ["training_loss.png", "sampling_time.png"]
