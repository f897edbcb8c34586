"""`ssmkit eval forecasting --smoke` end to end (GDP, a few steps): table, result.json and the fan plot."""

from __future__ import annotations

import json

import pytest

from ssmkit.cli import main

pytest.importorskip("statsmodels", reason="the series and the ARIMA/ETS baselines are statsmodels'")
pytest.importorskip("matplotlib", reason="the eval draws PNG plots")


def test_forecasting_smoke(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "forecasting", "--smoke", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["table"] in capsys.readouterr().out
    gdp = result["datasets"]["gdp"]
    assert list(gdp["models"]) == ["s4d", "mamba", "arima", "ets", "kalman", "snaive", "naive"]
    assert len(gdp["origins"]) == 10 and gdp["origins"][-1] == gdp["length"] - gdp["horizon"]
    for name, entry in gdp["models"].items():
        assert entry["mase"] > 0 and entry["smape"] > 0, name
        assert len(entry["point"]) == 10 and len(entry["point"][0]) == 8
    # GDP is not seasonal: the seasonal naive forecast is the naive one.
    assert gdp["models"]["snaive"]["point"] == gdp["models"]["naive"]["point"]
    assert gdp["models"]["arima"]["details"]["order"][1] == 1
    assert (out / "forecast_fans.png").stat().st_size > 1000


def test_unknown_series_is_an_error(tmp_path, capsys):
    assert main(["eval", "forecasting", "--smoke", "--datasets", "airline", "--out", str(tmp_path)]) != 0
    assert "airline" in capsys.readouterr().err


def test_validation_mode_scores_only_before_the_first_test_origin(tmp_path):
    out = tmp_path / "val"
    assert main(["eval", "forecasting", "--smoke", "--validation", "--device", "cpu", "--classical", "snaive",
                 "naive", "--models", "s4d", "--steps", "5", "--out", str(out)]) == 0
    full = json.loads((tmp_path / "val" / "result.json").read_text())
    gdp = full["datasets"]["gdp"]
    # The test layout of gdp (10 origins every 4 quarters, the last at 203 - 8) starts at 159: validation cuts
    # the series there and lays the same layout over the first 159 values.
    assert full["settings"]["validation"] and gdp["length"] == 159 and gdp["origins"][-1] == 159 - 8
    assert len(gdp["values"]) == 159 and gdp["origins"][0] == 159 - 8 - 4 * 9


def test_runs_of_different_series_merge_into_one_table(tmp_path, capsys):
    quick = ["--smoke", "--device", "cpu", "--classical", "snaive", "naive", "--models", "s4d", "--steps", "3"]
    for name in ("gdp", "co2"):
        assert main(["eval", "forecasting", *quick, "--datasets", name, "--out", str(tmp_path / name)]) == 0
    assert main(["eval", "forecasting", "--merge", str(tmp_path / "gdp"), str(tmp_path / "co2"),
                 "--out", str(tmp_path / "all")]) == 0
    merged = json.loads((tmp_path / "all" / "result.json").read_text())
    assert list(merged["datasets"]) == ["gdp", "co2"] == merged["settings"]["datasets"]
    assert "co2" in merged["table"] and "gdp" in merged["table"] and (tmp_path / "all" / "forecast_fans.png").exists()
    assert main(["eval", "forecasting", "--merge", str(tmp_path / "gdp"), str(tmp_path / "gdp"),
                 "--out", str(tmp_path / "twice")]) != 0
    assert "more than one" in capsys.readouterr().err


def test_a_series_own_settings_yield_to_the_command_line():
    from ssmkit.cli import build_parser
    from ssmkit.evals.forecasting import given_options, series_settings

    parse = lambda *a: build_parser().parse_args(["eval", "forecasting", *a])
    assert series_settings("co2", given_options(parse())) == {}
    assert series_settings("gdp", given_options(parse())) == {"ensemble": 3}
    assert series_settings("gdp", given_options(parse("--ensemble", "1"))) == {}
    own = series_settings("sunspots", given_options(parse()))
    assert own["season_embedding"] == 0 and own["seasonal_skip"] and own["transform"] == "sqrt"
    overridden = series_settings("sunspots", given_options(parse("--no-seasonal-skip", "--steps", "50")))
    assert "seasonal_skip" not in overridden and "steps" not in overridden and overridden["ensemble"] == 3
