"""Decoding through the fused decode-step kernels (``ssmkit.ops.decode_step``, Triton in the CPU interpreter)
equals the parallel forward: Mamba and Mamba-2 models, batch 1 and 4 with prompts of mixed lengths
(left-padded, as generate() batches them), logits of every decoded token against each row run alone."""

from __future__ import annotations

import functools
import sys

import pytest
import torch

from ssmkit.testing import raise_dt_bias, report_checks, run_checks_in_interpreter

PROMPTS = [[5, 9, 2, 33, 7, 7, 1, 40, 12], [3, 4], [60, 2, 2, 9, 17], [8]]


def check_decode_equals_parallel(preset: str, batch: int, steps: int = 5) -> None:
    # The blocks' own step: on CPU, forward_one takes the lean step, which has no Triton kernels.
    from ssmkit.generation.decode import forward_one_layers as forward_one
    from ssmkit.generation.generate import _left_pad
    from ssmkit.models import LanguageModel, get_preset
    from ssmkit.ops import decode_step

    calls = {"n": 0}
    originals = {name: getattr(decode_step, name) for name in ("conv1d_selective_state_update", "mamba_inner_step")}
    try:
        _run(preset, batch, steps, calls, decode_step, originals, forward_one, _left_pad, LanguageModel, get_preset)
    finally:
        for name, fn in originals.items():
            setattr(decode_step, name, fn)


def _run(preset, batch, steps, calls, decode_step, originals, forward_one, _left_pad, LanguageModel, get_preset):
    for name in originals:
        fused = functools.partial(originals[name], backend="triton")

        def counted(*args, _fused=fused, **kw):
            calls["n"] += 1
            return _fused(*args, **kw)

        setattr(decode_step, name, counted)

    torch.manual_seed(0)
    model = raise_dt_bias(LanguageModel(get_preset(preset)).eval())
    with torch.no_grad():
        rows = [torch.tensor(p) for p in PROMPTS[:batch]]
        ids, seq_idx = _left_pad(rows)
        cache = model.allocate_cache(batch)
        logits = model(ids, seq_idx=seq_idx, cache=cache).logits[:, -1]
        decoded, tokens = [logits], []
        for _ in range(steps):
            token = logits.argmax(-1)
            tokens.append(token)
            logits = forward_one(model, token, cache)
            decoded.append(logits)
        assert calls["n"] == steps * len(model.layers), f"the fused step ran {calls['n']} times"
        for i, prompt in enumerate(PROMPTS[:batch]):
            full = torch.tensor(prompt + [int(t[i]) for t in tokens])[None]
            expected = model(full).logits[0, len(prompt) - 1 :]
            got = torch.stack([d[i] for d in decoded])
            err = (got - expected).abs().max().item()
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), f"row {i}: logits differ by {err:.3g}"


CHECKS = {f"{preset}_b{batch}": (check_decode_equals_parallel, (preset, batch))
          for preset in ("debug-mamba", "debug-mamba2") for batch in (1, 4)}


def test_decode_through_fused_kernels_equals_parallel_forward_in_interpreter():
    pytest.importorskip("triton")
    run_checks_in_interpreter(__file__, "all")


if __name__ == "__main__":
    assert sys.argv[1] == "all"
    report_checks(CHECKS)
