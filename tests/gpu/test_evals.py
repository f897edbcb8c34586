"""The synthetic-task evals on a CUDA GPU: each --smoke configuration with --device cuda (Triton kernels, bf16
autocast in training), and chunked inference through the cache against one pass.

Run on the device machine before the full runs: ``python -m pytest -m gpu tests/gpu/test_evals.py -q``.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from ssmkit.cli import main
from ssmkit.data.synthetic import IGNORE, SyntheticBatch, induction_heads
from ssmkit.evals import _common as common
from ssmkit.models import LanguageModel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("task,extra", [("selective-copying", []), ("induction-heads", []), ("mqar", []),
                                        ("needle", ["--data", str(Path(sysconfig.get_paths()["stdlib"]) / "json")])])
def test_smoke_on_cuda(tmp_path, task, extra):
    out = tmp_path / task
    assert main(["eval", task, *extra, "--smoke", "--device", "cuda", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["device"].startswith("cuda")
    assert any(p.suffix == ".png" for p in out.iterdir())


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "s4d", "hybrid"])
def test_chunked_inference_on_cuda(kind):
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = LanguageModel(common.model_config(kind, 16, 64, 2, 16)).to(device).eval()
    generator = torch.Generator().manual_seed(1)
    batch = induction_heads(4, 3000, 16, generator=generator)
    targets = torch.where(torch.rand(batch.targets.shape, generator=generator) < 0.1, batch.inputs, IGNORE)
    batch = SyntheticBatch(batch.inputs, targets)
    whole, want = common.predict_scored(model, batch, device)
    chunked, want_chunked = common.predict_scored(model, batch, device, chunk_len=1024)
    assert torch.equal(want, want_chunked)
    assert (chunked == whole).float().mean() >= 0.98
