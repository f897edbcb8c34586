"""byte-lm, smnist, scaling and snapshots on a CUDA GPU: each --smoke configuration with --device cuda.

Run on the device machine before the full runs: ``python -m pytest -m gpu tests/gpu/test_evals_lm_bench.py -q``.
"""

from __future__ import annotations

import json

import pytest
import torch

from ssmkit.cli import main

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _smoke(tmp_path, kind, task):
    out = tmp_path / task
    assert main([kind, task, "--smoke", "--device", "cuda", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["device"].startswith("cuda")
    assert any(p.suffix == ".png" for p in out.iterdir())
    return result


def test_byte_lm_smoke_on_cuda(tmp_path):
    result = _smoke(tmp_path, "eval", "byte-lm")
    assert all(r["val_bpb"] < 7 for r in result["runs"]), result["table"]


def test_smnist_smoke_on_cuda(tmp_path):
    result = _smoke(tmp_path, "eval", "smnist")
    assert result["runs"][0]["test_accuracy"] > 0.4


def test_scaling_smoke_on_cuda_measures_gpu_memory(tmp_path):
    result = _smoke(tmp_path, "bench", "scaling")
    assert result["precision"] == "bf16"
    for mixer, s in result["series"].items():
        assert len(s["points"]) == 4, (mixer, s["stopped"])
        assert all(p["train_peak_bytes"] > 0 for p in s["points"])
        if mixer != "attention":
            assert len({p["cache_bytes"] for p in s["points"]}) == 1


def test_snapshots_smoke_on_cuda_answers_identically(tmp_path):
    figures = _smoke(tmp_path, "bench", "snapshots")["figures"]
    assert figures["identical_answers"] is True and figures["identical_states"] is True
