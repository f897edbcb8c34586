"""`ssmkit eval dis --smoke` end to end (8x8 digits, a few steps): table, result.json, plots, --merge."""

from __future__ import annotations

import json

import pytest
import torch

from ssmkit.cli import main
from ssmkit.evals.dis import loss_by_time
from ssmkit.models.diffusion import GaussianDiffusion

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
        assert list(r["held_out_loss_by_t"]) == ["1", "5", "20", "50", "90"]  # 0.01 .. 0.9 of T = 100
        assert 0 <= r["accuracy"] <= 1 and r["frechet"] >= 0 and len(r["per_class_accuracy"]) == 10
        assert list(r["sampling_time"]) == ["16", "64"]  # patches at sides 8 and 16 with patch 2
        assert r["grid_plot"] == f"digits_{r['model']}.png" and (out / r["grid_plot"]).stat().st_size > 1000
    assert result["plots"] == ["training_loss.png", "sampling_time.png"]


def test_train_seconds_cuts_the_steps_to_fit_and_the_record_says_so(tmp_path, capsys):
    """A budget far below what the steps need: training stops near it, with the cosine planned for the steps
    run (its last step at zero learning rate), and the table, FLOPs and loss history count those steps."""
    result, _ = _run(tmp_path, capsys, "budget", "--models", "mamba", "--steps", "100000", "--train-seconds", "2")
    run = result["runs"][0]
    assert result["settings"]["steps"] == 100000 and result["settings"]["train_seconds"] == 2
    assert 25 <= run["steps_run"] < 100000
    assert run["history"][-1]["step"] == run["steps_run"]
    assert run["train_flops"] == run["flops_per_step"] * run["steps_run"]
    assert run["train_seconds"] < 20  # stopped near the budget, not after 100,000 steps
    row = result["table"].splitlines()[2]  # the model's row: its steps column after params
    assert [cell.strip() for cell in row.split("|")][3] == str(run["steps_run"])


class _PointDenoiser(torch.nn.Module):
    """The exact ε of data that is one image ``x0``: (x_t - √ᾱ_t x0) / √(1 - ᾱ_t); ``wrong`` adds 0.5."""

    def __init__(self, diffusion, x0, wrong=False):
        super().__init__()
        self.diffusion, self.x0, self.wrong = diffusion, x0, wrong
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # loss_by_time reads the device from the parameters

    def forward(self, x, t, y):
        abar = self.diffusion.alphas_cumprod[t].to(x.dtype).view(-1, 1, 1, 1)
        return (x - abar.sqrt() * self.x0) / (1 - abar).sqrt() + 0.5 * self.wrong


def test_loss_by_time_is_zero_for_the_exact_denoiser_and_keyed_by_step():
    diffusion = GaussianDiffusion(1000, null_class=10)
    x0 = torch.rand(1, 1, 6, 6) * 2 - 1
    x, y = x0.expand(40, 1, 6, 6), torch.zeros(40, dtype=torch.int64)
    exact = loss_by_time(_PointDenoiser(diffusion, x0), diffusion, x, y, seed=0)
    assert list(exact) == ["10", "50", "200", "500", "900"]
    assert max(exact.values()) < 1e-8
    off = loss_by_time(_PointDenoiser(diffusion, x0, wrong=True), diffusion, x, y, seed=0)
    assert all(abs(v - 0.25) < 1e-4 for v in off.values())
    assert list(loss_by_time(_PointDenoiser(diffusion, x0), diffusion, x, y, seed=0, max_images=3,
                             fractions=(0.999,))) == ["999"]
