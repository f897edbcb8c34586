"""The serving engine on a CUDA GPU: concurrent requests, decoded in one batch, equal ``generate`` alone.

Run on the device machine: ``python -m pytest -m gpu tests/gpu/test_serve_engine.py -q``.
"""

from __future__ import annotations

import threading

import pytest
import torch

from ssmkit.generation import generate
from ssmkit.generation.sampling import SamplingParams
from ssmkit.models import LanguageModel, get_preset
from ssmkit.serve.batching import Engine, GenerationRequest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("preset", ["byte-small", "debug-hybrid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: `ssmkit serve`'s GPU default
def test_batched_requests_equal_generate_on_cuda(preset, dtype):
    torch.manual_seed(0)
    model = LanguageModel(get_preset(preset), device="cuda", dtype=dtype).eval()
    with torch.no_grad():
        # Peaked logits, as a trained model has: batched and single kernels round differently (TF32 in
        # Triton's dots), which must not decide between two nearly equal tokens here.
        model.embedding.weight.mul_(30)
    vocab = model.config.vocab_size
    engine = Engine(model, max_batch=16)
    engine.start()
    prompts = [[int(t) for t in torch.randint(0, vocab, (n,))] for n in (1, 7, 40, 300, 2, 64, 17, 5)]
    sampling = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_p=0.9)]
    results: list[list[int]] = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def collect(i: int):
        def on_token(token: int) -> bool:
            results[i].append(token)
            return False

        return on_token

    try:
        for i, p in enumerate(prompts):
            engine.submit(GenerationRequest(ids=p, max_new_tokens=32, params=sampling[i % 2], seed=i,
                                            on_token=collect(i), on_done=lambda reason, cache, i=i: done[i].set()))
        assert all(d.wait(120) for d in done)
    finally:
        engine.stop()
    for i, p in enumerate(prompts):
        s = sampling[i % 2]
        expected = generate(model, [p], 32, temperature=s.temperature, top_p=s.top_p, seed=i)[0]
        assert results[i] == expected, i
    assert engine.steps < sum(len(r) for r in results) - len(prompts)
