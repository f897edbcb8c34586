"""The fused norm + linear kernel on a CUDA GPU against the float64 definition, and a Mamba-2 model's decode
steps through it against its parallel forward.

Run on the device machine: ``python -m pytest -m gpu tests/gpu/test_norm_linear.py -q``.
"""

from __future__ import annotations

import pytest
import torch

from ssmkit.models import LanguageModel, get_preset
from ssmkit.ops.norm_linear import rms_norm_linear
from ssmkit.testing import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# (k, n, group_size, gate): mamba2-130m's pre-norm + in_proj and gated norm + out_proj, then odd sizes.
SHAPES = [(768, 3352, None, None), (1536, 768, None, "after"), (1536, 768, 768, "before"), (100, 37, 25, "after"),
          (8192, 40, 2048, "after")]


def _inputs(rows, k, n, group_size, gate, dtype, residual, bias):
    dev = "cuda"
    return dict(
        x=torch.randn(rows, k, device=dev, dtype=torch.float32 if residual == "float32" and gate is None else dtype),
        norm_weight=(1 + 0.1 * torch.randn(k, device=dev)).to(dtype),
        weight=(torch.randn(n, k, device=dev) / k ** 0.5).to(dtype),
        bias=torch.randn(n, device=dev, dtype=dtype) if bias else None,
        z=torch.randn(rows, k, device=dev, dtype=dtype) if gate else None,
        group_size=group_size,
        norm_before_gate=gate == "before",
        residual=torch.randn(rows, n, device=dev, dtype=getattr(torch, residual)) if residual else None,
    )


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("residual", [None, "float32"])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(dtype, shape, rows, residual, bias):
    inp = _inputs(rows, *shape, dtype, residual, bias)
    got = rms_norm_linear(**inp, backend="triton")
    unfused = rms_norm_linear(**inp, backend="chunked")
    exp = rms_norm_linear(**{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inp.items()},
                          backend="reference")
    assert got.dtype == unfused.dtype and got.shape == unfused.shape
    assert_close(got, exp, dtype, name="vs float64")
    assert_close(got, unfused, dtype, name="vs unfused")


def test_auto_picks_the_kernel_for_few_rows_only():
    inp = _inputs(4, 768, 3352, None, None, torch.bfloat16, "float32", False)
    assert torch.equal(rms_norm_linear(**inp), rms_norm_linear(**inp, backend="triton"))
    many = _inputs(64, 768, 3352, None, None, torch.bfloat16, "float32", False)
    assert torch.equal(rms_norm_linear(**many), rms_norm_linear(**many, backend="chunked"))


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_mamba2_decode_steps_match_the_parallel_forward(batch):
    """bf16 weights: batch 1 and 4 take the fused kernels, 16 the unfused ops; logits agree with forward."""
    torch.manual_seed(0)
    model = LanguageModel(get_preset("debug-mamba2")).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, 24), device="cuda")
    with torch.no_grad():
        full = model(ids).logits.float()
        cache = model.allocate_cache(batch)
        steps = []
        for t in range(ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], cache=cache).logits.float())
    assert_close(torch.cat(steps, dim=1), full, torch.bfloat16, rtol=3e-2, atol=3e-2, name="step logits")
