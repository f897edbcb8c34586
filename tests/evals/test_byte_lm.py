"""ssmkit/evals/byte_lm.py: equal-size configs, FLOP counts, and the --smoke run end to end."""

import argparse
import json
import math

import pytest

from ssmkit.cli import main
from ssmkit.evals import byte_lm


def _args(tmp_path, **overrides):
    parser = argparse.ArgumentParser()
    byte_lm.add_arguments(parser)
    args = parser.parse_args([])
    args.smoke, args.device, args.out = True, "cpu", tmp_path
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


@pytest.mark.parametrize("target, n_layer", [(500_000, 4), (1_000_000, 4)])
def test_families_are_sized_to_the_same_parameter_count(target, n_layer):
    for family in byte_lm.FAMILIES:
        config = byte_lm.sized_config(family, target, n_layer)
        params = byte_lm.count_parameters(config)
        assert abs(params - target) / target < 0.1, (family, params)
        if family == "transformer":
            assert config.layer_pattern == "Am" and config.n_layer == n_layer // 2
        else:
            assert config.n_layer == n_layer


def test_transformer_flops_per_token_grow_with_length_and_ssm_flops_do_not():
    ratios = {}
    for family in ("mamba", "transformer"):
        config = byte_lm.family_config(family, 64, 2)
        short, long = (byte_lm.training_flops_per_token(config, n) for n in (128, 1024))
        assert short > 6 * byte_lm.count_parameters(config) * 0.3
        ratios[family] = long / short
    # Attention scores cost L x L, so per token they grow with L; the SSM's cost per token is flat.
    assert ratios["mamba"] == pytest.approx(1.0, abs=0.05)
    assert ratios["transformer"] > 1.3


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--models"):
        byte_lm.run(_args(tmp_path, models=["mamba", "rnn"]), tmp_path)
    with pytest.raises(ValueError, match="unknown model family 'rnn'"):
        byte_lm.family_config("rnn", 64, 2)


@pytest.mark.slow
def test_smoke_run_trains_every_family_below_chance_bits_per_byte(tmp_path, capsys):
    result = _cli(tmp_path, "eval", "byte-lm")
    assert result["table"] in capsys.readouterr().out and result["device"] == "cpu"
    assert (tmp_path / "bpb_vs_flops.png").stat().st_size > 1000
    runs = {r["family"]: r for r in result["runs"]}
    assert set(runs) == set(byte_lm.FAMILIES)
    chance = math.log2(256)
    for r in runs.values():
        # Same bytes, same budget: every model saw the same number of tokens.
        assert r["tokens"] == runs["mamba"]["tokens"] > 0
        assert r["val_bpb"] < chance - 1, r
        flops = [p["flops"] for p in r["curve"]]
        assert len(flops) >= 2 and flops == sorted(flops) and flops[-1] == pytest.approx(r["train_flops"])
    params = [r["params"] for r in runs.values()]
    assert max(params) / min(params) < 1.25


def _cli(tmp_path, kind, task, *extra):
    """Run ``ssmkit KIND TASK --smoke`` on CPU into tmp_path; its result.json."""
    assert main([kind, task, "--smoke", "--device", "cpu", "--out", str(tmp_path), *extra]) == 0
    return json.loads((tmp_path / "result.json").read_text())
