"""ssmkit/evals/scaling.py: the measurements, the stopping rule, and the --smoke run end to end."""

import json

import pytest
import torch

from ssmkit.cli import main
from ssmkit.evals import scaling
from ssmkit.models import LanguageModel

SSMS = ("mamba", "mamba2", "mamba3", "s4d")


def test_slope_of_a_power_law_is_its_exponent():
    points = [{"length": n, "t": 3.0 * n**2} for n in (256, 512, 1024, 2048)]
    assert scaling._slope(points, "t") == pytest.approx(2.0)
    assert scaling._slope(points[:1], "t") is None


def test_series_stops_before_a_predicted_overrun():
    cpu = torch.device("cpu")
    quadratic = [{"length": n, "train_s": (n / 1024) ** 2, "saved_bytes": n} for n in (1024, 2048)]
    assert "predicted training step" in scaling._predicted_over(quadratic, 4096, 5.0, 1.0, cpu)
    assert scaling._predicted_over(quadratic, 4096, 10.0, 1.0, cpu) == ""
    big = [{"length": n, "train_s": 0.001, "saved_bytes": n * 2**19} for n in (1024, 2048)]
    assert "predicted memory" in scaling._predicted_over(big, 4096, 10.0, 1.0, cpu)


def test_saved_activations_grow_linearly_and_leave_weights_out():
    torch.manual_seed(0)
    model = LanguageModel(scaling.mixer_config("mamba2", 32, 1))
    sizes = [scaling.saved_activation_bytes(model, torch.randint(0, 256, (1, n)), torch.autocast("cpu", enabled=False))
             for n in (512, 1024)]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sizes[1] == pytest.approx(2 * sizes[0], rel=0.05)
    assert sizes[0] < 512 * 32 * 4 * 60 and weights > 0


@pytest.mark.slow
def test_smoke_run_measures_every_mixer(tmp_path, capsys):
    assert main(["bench", "scaling", "--smoke", "--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["lengths"] == [256, 512, 1024, 2048] and result["device"] == "cpu"
    printed = capsys.readouterr().out
    assert all(table in printed for table in result["tables"].values())
    assert (tmp_path / "scaling.png").stat().st_size > 1000
    for mixer, s in result["series"].items():
        points = s["points"]
        assert [p["length"] for p in points] == result["lengths"], s["stopped"]
        assert all(p["train_s"] > 0 and p["infer_s"] > 0 and p["decode_s"] > 0 for p in points)
        saved_bytes = [p["saved_bytes"] for p in points]
        assert saved_bytes == sorted(saved_bytes) and saved_bytes[0] < saved_bytes[-1]
        caches = {p["cache_bytes"] for p in points}
        if mixer in SSMS:
            # The decode state of an SSM is the same size whatever it has read.
            assert len(caches) == 1
            assert s["slopes"]["saved_bytes"] < 1.2
        else:
            # The KV cache grows by as much as it holds (plus a fixed length counter) when L doubles.
            c = [p["cache_bytes"] for p in points]
            assert c[3] - c[2] == 2 * (c[2] - c[1]) == 4 * (c[1] - c[0]) > 0
    for title in ("training step (ms)", "decode after L tokens (ms per token)", "cache after L tokens (KiB)"):
        assert title in result["tables"]
