"""Weight-only int8: the layer against float math, a quantised model's decode against its parallel forward,
save and load, the CLI's --dtype int8."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ssmkit.layers.quantized import MAX_KERNEL_ROWS, Int8Linear, quantize_rows
from ssmkit.models import LanguageModel, get_preset


@pytest.mark.parametrize("rows", [1, MAX_KERNEL_ROWS, 3 * MAX_KERNEL_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_dequantised_weights(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    linear = nn.Linear(96, 40, bias=bias)
    q = Int8Linear.from_linear(linear)
    x = torch.randn(rows, 96)
    # Against the dequantised weights in float64: only the activations' bfloat16 rounding remains.
    exact = x.double() @ q.weight.double().T + (linear.bias.double() if bias else 0)
    got = q(x)
    assert got.dtype == x.dtype and got.shape == (rows, 40)
    assert ((got.double() - exact).abs().max() / exact.abs().max()).item() < 2e-2
    # Against the float weights: at most half a step per weight.
    assert (q.weight - linear.weight).abs().max() <= q.scales.max() / 2 + 1e-7


def test_quantize_rows_symmetric_and_zero_rows() -> None:
    w = torch.tensor([[0.0, 0.0], [-2.0, 1.0]])
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and q[1, 0] == -127 and s[0] == 1.0 and torch.all(q[0] == 0)


@pytest.mark.parametrize("preset", ["debug-mamba", "debug-mamba2"])
def test_quantised_model_decode_matches_forward_and_reloads(tmp_path: Path, preset: str) -> None:
    torch.manual_seed(0)
    model = LanguageModel(get_preset(preset)).eval()
    q = copy.deepcopy(model).quantize("int8")
    assert isinstance(q.lm_head, Int8Linear) and isinstance(q.layers[0].mixer.in_proj, Int8Linear)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        ref, full = model(ids).logits, q(ids).logits
        assert ((full - ref).abs().max() / ref.abs().max()).item() < 5e-2
        cache = q.allocate_cache(2)
        q(ids[:, :16], cache=cache)
        steps = torch.cat([q(ids[:, t:t + 1], cache=cache).logits for t in range(16, 24)], dim=1)
    # Decode runs the int8 kernel (bfloat16 activations), the prompt the dequantised matmul: both round
    # the activations to bfloat16, so they agree to that precision.
    assert ((steps - full[:, 16:]).abs().max() / full.abs().max()).item() < 2e-2
    q.save_pretrained(tmp_path / "q")
    record = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert record["method"] == "int8" and "lm_head" in record["modules"]
    loaded = LanguageModel.from_pretrained(tmp_path / "q").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, full, rtol=0, atol=0)
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < 0.75 * _saved_size(model, tmp_path / "f")


def _saved_size(model: LanguageModel, path: Path) -> int:
    model.save_pretrained(path)
    return (path / "model.safetensors").stat().st_size


def test_bad_quantisation_record(tmp_path: Path) -> None:
    torch.manual_seed(0)
    LanguageModel(get_preset("debug-mamba")).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["quantization"] = {"method": "int4", "modules": []}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="quantization"):
        LanguageModel.from_pretrained(tmp_path)


def test_cli_load_int8(tmp_path: Path) -> None:
    from ssmkit.models.loading import load_model

    torch.manual_seed(0)
    LanguageModel(get_preset("debug-mamba2")).save_pretrained(tmp_path)
    model, _, _ = load_model(str(tmp_path), "cpu", "int8", need_tokenizer=False)
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    out = model.generate([[1, 2, 3]], max_new_tokens=4, temperature=0)
    assert len(out[0]) >= 4
