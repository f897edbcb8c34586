"""ssmkit/evals/snapshots.py: answers from a saved document state match re-reading the document."""

import argparse
import json

import pytest
import torch

from ssmkit.cli import main
from ssmkit.evals import snapshots
from ssmkit.models import LanguageModel, get_preset


def _args(tmp_path, **overrides):
    parser = argparse.ArgumentParser()
    snapshots.add_arguments(parser)
    args = parser.parse_args([])
    args.smoke, args.device, args.out = True, "cpu", tmp_path
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def test_document_is_the_requested_number_of_stdlib_bytes():
    text = snapshots.document_bytes(10_000)
    assert len(text) == 10_000 and b"def " in text


@pytest.mark.slow
def test_smoke_run_answers_from_clones_exactly_as_from_rereading(tmp_path, capsys):
    result = _cli(tmp_path, "bench", "snapshots")
    assert result["table"] in capsys.readouterr().out and result["device"] == "cpu"
    assert (tmp_path / "snapshots.png").stat().st_size > 1000
    f = result["figures"]
    assert f["identical_answers"] is True and f["identical_states"] is True
    assert f["queries"] == len(result["answers"]) == len(f["snapshot_answer_s"]) == 3
    # The state of a pure SSM does not grow with the document; a transformer's KV cache does.
    model = LanguageModel(get_preset("byte-small").__class__.from_dict(result["model"]), device="meta")
    assert f["state_bytes"] == model.cache_nbytes(1) == model.cache_nbytes(f["document_tokens"])
    assert f["state_file_bytes"] >= f["state_bytes"]
    assert f["transformer_kv_cache_bytes"] > 10 * f["state_bytes"]
    assert (tmp_path / "document_state.safetensors").stat().st_size == f["state_file_bytes"]


def test_non_byte_checkpoint_is_refused(tmp_path):
    torch.manual_seed(0)
    LanguageModel(get_preset("debug-mamba2")).save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="not a byte vocabulary"):
        snapshots.ENTRY.run(_args(tmp_path, checkpoint=str(tmp_path / "model")), tmp_path / "out")


def _cli(tmp_path, kind, task, *extra):
    """Run ``ssmkit KIND TASK --smoke`` on CPU into tmp_path; its result.json."""
    assert main([kind, task, "--smoke", "--device", "cpu", "--out", str(tmp_path), *extra]) == 0
    return json.loads((tmp_path / "result.json").read_text())
