"""Greedy decoding under every launch variant (``ssmkit.ops.decode_launch``) picks the parallel forward's tokens.

In Triton's CPU interpreter, with every small-batch decode kernel forced on (the norm + linear GEMVs, Mamba's
out_proj GEMV, the fused decode steps and the fused greedy head): Mamba and Mamba-2 models, batch 1 and 4 with
prompts of mixed lengths, each row's tokens against the argmax of its own parallel forward. On the torch path
(CPU, no interpreter) the fused head is checked bit for bit against the logits' argmax, eos rule included, and
the cases it must leave to the logits path."""

from __future__ import annotations

import sys

import pytest
import torch

from ssmkit.generation.decode import DecodeState, greedy_head_applies, step
from ssmkit.generation.sampling import RowSampling, SamplingParams, make_generators
from ssmkit.models import LanguageModel, get_preset
from ssmkit.ops import decode_launch
from ssmkit.testing import raise_dt_bias, report_checks, run_checks_in_interpreter

PROMPTS = [[5, 9, 2, 33, 7, 7, 1, 40, 12], [3, 4], [60, 2, 2, 9, 17], [8]]
GREEDY = SamplingParams(temperature=0)


def _state(model, cache, batch, params=GREEDY, eos=(), seen=None):
    return DecodeState(cache, params, model.config.vocab_size, make_generators(0, batch, torch.device("cpu")),
                       torch.tensor(eos, dtype=torch.long), torch.zeros(batch, dtype=torch.bool), seen)


def _model(preset: str) -> LanguageModel:
    torch.manual_seed(0)
    return raise_dt_bias(LanguageModel(get_preset(preset)).eval())


def _forced(monkeypatch_targets: list[tuple[object, str]], calls: dict[str, int]) -> dict:
    """Every target function with backend="triton", counting calls; returns the originals."""
    originals = {}
    for module, name in monkeypatch_targets:
        original = getattr(module, name)
        originals[(module, name)] = original

        def forced(*args, _fn=original, _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **{**kw, "backend": "triton"})

        setattr(module, name, forced)
    return originals


def check_variant(preset: str, batch: int, variant: str, steps: int = 4) -> None:
    from ssmkit import ops
    from ssmkit.generation import decode
    from ssmkit.generation.generate import _left_pad
    from ssmkit.ops import decode_step

    calls: dict[str, int] = {}
    targets = [(ops, "rms_norm_linear"), (decode, "rms_norm_linear_argmax"),
               (decode_step, "conv1d_selective_state_update"), (decode_step, "mamba_inner_step")]
    originals = _forced(targets, calls)
    try:
        model = _model(preset)
        rows = [torch.tensor(p) for p in PROMPTS[:batch]]
        ids, seq_idx = _left_pad(rows)
        with torch.no_grad(), decode_launch.use(variant):
            cache = model.allocate_cache(batch)
            token = model(ids, seq_idx=seq_idx, cache=cache).logits[:, -1].argmax(-1)
            state = _state(model, cache, batch)
            tokens = [token]
            for _ in range(steps):
                token = step(model, token, state)
                tokens.append(token)
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)
    settings = decode_launch.VARIANTS[variant]
    assert calls.get("rms_norm_linear_argmax", 0) == (steps if settings.greedy_head else 0), calls
    assert calls.get("rms_norm_linear", 0) >= steps * len(model.layers), calls
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS[:batch]):
            picked = [int(t[i]) for t in tokens]
            logits = model(torch.tensor(prompt + picked[:-1])[None]).logits[0, len(prompt) - 1:]
            assert logits.argmax(-1).tolist() == picked, f"row {i}: {picked} vs {logits.argmax(-1).tolist()}"


CHECKS = {f"{preset}_b{batch}_{variant}": (check_variant, (preset, batch, variant))
          for preset in ("debug-mamba", "debug-mamba2") for batch in (1, 4) for variant in ("best",)}


def test_every_kernel_of_the_best_variant_decodes_the_parallel_forwards_tokens_in_interpreter():
    pytest.importorskip("triton")
    run_checks_in_interpreter(__file__, "all")


@pytest.mark.parametrize("preset", ["debug-mamba", "debug-mamba2"])
def test_fused_head_on_the_torch_path_is_the_logits_argmax_bit_for_bit(preset):
    """Off a GPU the greedy head runs the unfused ops: the same tokens as pick(), the eos rule included."""
    model = _model(preset)
    ids = torch.tensor([PROMPTS[0], PROMPTS[2] + [1, 1, 1, 1]])
    runs = []
    for variant in ("plain", "greedy_head"):
        with torch.no_grad(), decode_launch.use(variant):
            cache = model.allocate_cache(2)
            token = model(ids, cache=cache).logits[:, -1].argmax(-1)
            state = _state(model, cache, 2, eos=(int(token[1]),))
            assert greedy_head_applies(model, state) == (variant == "greedy_head")
            out = [step(model, token, state) for _ in range(5)]
            runs.append((torch.stack(out), state.done.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_fused_head_is_left_to_the_logits_path_where_it_does_not_apply():
    model = _model("debug-mamba2")
    cache = model.allocate_cache(1)
    with decode_launch.use("greedy_head"):
        assert greedy_head_applies(model, _state(model, cache, 1))
        assert greedy_head_applies(model, _state(model, cache, 1, RowSampling.uniform(GREEDY, 1, torch.device("cpu"))))
        assert not greedy_head_applies(model, _state(model, cache, 1, SamplingParams(temperature=0.7)))
        penalty = SamplingParams(temperature=0, repetition_penalty=1.3)
        assert not greedy_head_applies(model, _state(model, cache, 1, penalty, seen=torch.zeros(1, 64, dtype=torch.bool)))
        assert greedy_head_applies(model, _state(model, cache, 1, penalty))  # no seen mask: no penalty applied
        assert not greedy_head_applies(model, _state(model, model.allocate_cache(9), 9))  # past MAX_ROWS
        model.config.logits_multiplier = 0.5
        assert not greedy_head_applies(model, _state(model, cache, 1))
    model.config.logits_multiplier = 1.0
    assert greedy_head_applies(model, _state(model, cache, 1))  # the default settings turn it on
    with decode_launch.use("plain"):
        assert not greedy_head_applies(model, _state(model, cache, 1))


if __name__ == "__main__":
    assert sys.argv[1] == "all"
    report_checks(CHECKS)
