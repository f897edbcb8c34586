"""ssmkit/evals/_common.py: matched model sizes, chunked inference, option defaults, tables."""

import argparse

import pytest
import torch

from ssmkit.data.synthetic import IGNORE, SyntheticBatch, induction_heads, mqar
from ssmkit.evals import _common as common
from ssmkit.models import LanguageModel


@pytest.mark.parametrize("d_model", [32, 64])
def test_model_kinds_have_matched_sizes(d_model):
    sizes = {}
    for kind in common.MODEL_KINDS:
        config = common.model_config(kind, 50, d_model, 4, 8)
        sizes[kind] = common.n_params(LanguageModel(config))
        assert config.n_layer == 4
    assert common.model_config("hybrid", 50, d_model, 4, 8).layer_pattern == "MAmMM"
    for kind, n in sizes.items():
        assert abs(n - sizes["mamba"]) / sizes["mamba"] < 0.15, sizes
    with pytest.raises(ValueError, match="unknown model kind 'gru'"):
        common.model_config("gru", 50, 32, 2, 8)


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "s4d", "hybrid"])
def test_chunked_inference_predicts_what_one_pass_does(kind):
    torch.manual_seed(0)
    model = LanguageModel(common.model_config(kind, 16, 32, 2, 8)).eval()
    generator = torch.Generator().manual_seed(1)
    batch = induction_heads(3, 100, 16, generator=generator)
    # Score many positions, across chunk borders, to compare more than one prediction per row.
    targets = torch.where(torch.rand(batch.targets.shape, generator=generator) < 0.3, batch.inputs, IGNORE)
    batch = SyntheticBatch(batch.inputs, targets)
    device = torch.device("cpu")
    whole, want = common.predict_scored(model, batch, device)
    chunked, want_chunked = common.predict_scored(model, batch, device, chunk_len=32)
    assert torch.equal(want, want_chunked)
    # Row-major order: row by row, left to right.
    rows, cols = (targets != IGNORE).nonzero(as_tuple=True)
    assert torch.equal(want, targets[rows, cols])
    with torch.no_grad():
        logits = model(batch.inputs).logits[..., :16]
    assert torch.equal(whole, logits[rows, cols].argmax(-1))
    # Chunked reading sums in another order: allow a rare flip between near-tied logits.
    assert (chunked == whole).float().mean() >= 0.98


def test_accuracy_of_a_perfect_and_a_wrong_predictor():
    batch = mqar(4, 32, 4, 64, generator=torch.Generator().manual_seed(0))

    class Oracle(torch.nn.Module):
        """Logits that put all weight on the value that follows each position (the answer at queries)."""

        config = common.model_config("mamba", 64, 16, 1, 4)

        def forward(self, ids, cache=None):
            nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
            return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, 64).float()})()

    device = torch.device("cpu")
    assert common.accuracy(Oracle(), [batch], device) == 1.0
    shifted = SyntheticBatch(batch.inputs, torch.where(batch.targets == IGNORE, IGNORE, (batch.targets + 1) % 64))
    assert common.accuracy(Oracle(), [shifted], device) == 0.0


def test_settings_take_given_options_then_full_or_smoke_defaults():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    full, smoke = dict(steps=100, sizes=[1, 2]), dict(steps=5, sizes=[3])
    common.add_options(parser, full, smoke, dict(steps="steps", sizes="sizes"))
    assert common.settings(parser.parse_args([]), full, smoke) == full
    assert common.settings(parser.parse_args(["--smoke"]), full, smoke) == smoke
    assert common.settings(parser.parse_args(["--smoke", "--steps", "7", "--sizes", "4", "5"]), full, smoke) == \
        dict(steps=7, sizes=[4, 5])
    assert "(default: 100; with --smoke: 5)" in parser.format_help()


def test_format_table_aligns_columns():
    table = common.format_table(["model", "params", "accuracy"], [["mamba", 1234, 0.5], ["s4d", 99, 1.0]])
    lines = table.splitlines()
    assert lines[0].split() == ["model", "params", "accuracy"]
    assert lines[2].split() == ["mamba", "1,234", "0.5000"] and lines[3].split() == ["s4d", "99", "1.0000"]
    assert len({len(line) for line in lines}) == 1


def test_device_choice():
    if torch.cuda.is_available():
        assert common.resolve_device("auto").type == common.resolve_device("cuda").type == "cuda"
    else:
        assert common.resolve_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="no CUDA GPU"):
            common.resolve_device("cuda")
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        common.resolve_device("tpu")
