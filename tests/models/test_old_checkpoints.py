"""Checkpoints written by an earlier ssmkit (tests/fixtures/old_checkpoints, made at commit 376b692 by
tests/fixtures/write_old_checkpoints.py) keep loading through every public path and compute the logits
that ssmkit computed from them then."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssmkit.cli import main
from ssmkit.models import ModelCache
from ssmkit.models import LanguageModel

OLD = Path(__file__).parents[1] / "fixtures" / "old_checkpoints"
EXPECTED = load_file(OLD / "expected.safetensors")
IDS = EXPECTED["input_ids"]


@pytest.mark.parametrize("folder, key", [
    ("moe_hybrid", "moe_hybrid"),            # Mamba (inner norms) + MLP, attention + MoE, sliding window, Mamba-2
    ("lti_mamba3", "lti_mamba3"),            # Mamba-3, S4D, S4, Hyena
    ("transformers_mamba2", "mamba2"),       # transformers' mamba2 format
    ("transformers_mamba", "transformers_mamba"),
    ("run/model", "run"),                    # a training run's final model
    ("run/checkpoints/step_0000002", "run"),  # a training run's resumable checkpoint
])
def test_old_checkpoint_logits(folder, key):
    model = LanguageModel.from_pretrained(OLD / folder).eval()
    want = EXPECTED[f"{key}.logits"]
    with torch.no_grad():
        got = model(IDS).logits[..., :want.shape[-1]]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_old_checkpoint_decodes_like_a_forward():
    """A cache built step by step on the old weights gives the logits of one parallel pass."""
    model = LanguageModel.from_pretrained(OLD / "moe_hybrid").eval()
    cache = model.allocate_cache(IDS.shape[0])
    assert isinstance(cache, ModelCache)
    with torch.no_grad():
        steps = torch.cat([model(IDS[:, t:t + 1], cache=cache).logits for t in range(IDS.shape[1])], dim=1)
    torch.testing.assert_close(steps, EXPECTED["moe_hybrid.logits"], rtol=1e-4, atol=1e-4)


def test_old_run_folder_through_the_cli(tmp_path, capsys):
    """`ssmkit info` and `ssmkit convert` accept the old run folder itself (its model/ is found)."""
    run = tmp_path / "run"
    shutil.copytree(OLD / "run", run)
    assert main(["info", "--checkpoint", str(run)]) == 0
    assert "parameters: 2,734" in capsys.readouterr().out
    assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "transformers"]) == 0
    model = LanguageModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        got = model(IDS).logits[..., :32]
    torch.testing.assert_close(got, EXPECTED["run.logits"], rtol=1e-5, atol=1e-5)
