"""The decode launch variants on a CUDA GPU: every kernel under programmatic dependent launch and the other
settings against the float64 definitions, and greedy decoding (eager and CUDA graph) under each variant
against the default one and the parallel forward.

Run on the device machine: ``python -m pytest -m gpu tests/gpu/test_decode_launch.py -q``.
"""

from __future__ import annotations

import pytest
import torch

from ssmkit.generation import clear_graph_cache
from ssmkit.generation.decode import DecodeState, GraphedStep, step
from ssmkit.generation.sampling import SamplingParams, make_generators
from ssmkit.models import LanguageModel, ModelConfig, get_preset
from ssmkit.models.config import Mamba2Config
from ssmkit.ops import decode_launch
from ssmkit.ops.norm_linear import rms_norm_linear, rms_norm_linear_argmax
from ssmkit.testing import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

VARIANTS = list(decode_launch.VARIANTS)


def _f64(*tensors):
    return [None if t is None else t.double() for t in tensors]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rows", [1, 5])
def test_gemv_kernels_match_the_definition(variant, rows):
    dev, bf = "cuda", torch.bfloat16
    x, nw, w = torch.randn(rows, 768, device=dev), (1 + 0.1 * torch.randn(768, device=dev)).to(bf), \
        (torch.randn(3352, 768, device=dev) / 28).to(bf)
    y, z, nw2 = torch.randn(rows, 1536, device=dev).to(bf), torch.randn(rows, 1536, device=dev).to(bf), \
        torch.ones(1536, device=dev, dtype=bf)
    w2, r = (torch.randn(768, 1536, device=dev) / 40).to(bf), torch.randn(rows, 768, device=dev)
    with decode_launch.use(variant):
        # Chained on one stream, as in a decode step (each reads its predecessor's output under PDL).
        h = rms_norm_linear(x, nw, w, backend="triton")
        out = rms_norm_linear(y, nw2, w2, z=z, residual=r, backend="triton")
        plain = rms_norm_linear(y, None, w2, residual=out, backend="triton")
        torch.cuda.synchronize()
    assert_close(h, rms_norm_linear(*_f64(x, nw, w), backend="reference"), bf, name="in_proj")
    exp = rms_norm_linear(*_f64(y, nw2, w2), z=z.double(), residual=r.double(), backend="reference")
    assert_close(out, exp, bf, name="out_proj")
    assert_close(plain, rms_norm_linear(*_f64(y, None, w2), residual=out.double(), backend="reference"), bf,
                 name="no norm")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("vocab", [50277, 300])
def test_greedy_head_is_the_argmax_of_the_logits(variant, vocab):
    dev, bf = "cuda", torch.bfloat16
    x, nw = torch.randn(3, 768, device=dev), (1 + 0.1 * torch.randn(768, device=dev)).to(bf)
    w = (torch.randn(vocab + 11, 768, device=dev) / 28).to(bf)
    with decode_launch.use(variant):
        got = rms_norm_linear_argmax(x, nw, w, vocab_size=vocab, backend="triton")
    logits = rms_norm_linear(*_f64(x, nw, w), backend="reference")[:, :vocab]
    best, picked = logits.max(-1).values, logits.gather(1, got[:, None]).squeeze(1)
    assert bool((got < vocab).all()) and bool((picked >= best - 0.03 * best.abs().clamp(min=1)).all())
    assert (got == rms_norm_linear_argmax(x, nw, w, vocab_size=vocab, backend="chunked")).float().mean() >= 2 / 3


def _models() -> dict[str, ModelConfig]:
    return {"mamba": get_preset("debug-mamba"),
            "mamba2": ModelConfig(vocab_size=300, d_model=64, n_layer=3, layer_pattern="2",
                                  mamba2=Mamba2Config(d_state=32, headdim=16, ngroups=2, chunk_size=16))}


def _decode(model: LanguageModel, prompt: torch.Tensor, steps: int, graph: bool) -> torch.Tensor:
    cache = model.allocate_cache(prompt.shape[0])
    first = model(prompt, cache=cache).logits[:, -1].argmax(-1)
    b = prompt.shape[0]
    state = DecodeState(cache, SamplingParams(temperature=0), model.config.vocab_size,
                        make_generators(0, b, prompt.device), torch.zeros(0, dtype=torch.long, device=prompt.device),
                        torch.zeros(b, dtype=torch.bool, device=prompt.device), None)
    tokens = [first]
    if graph:
        graphed = GraphedStep(model, first, state)
        for _ in range(steps):
            graphed.replay()
            tokens.append(graphed.token.clone())
    else:
        for _ in range(steps):
            tokens.append(step(model, tokens[-1], state))
    return torch.stack(tokens, 1)


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_greedy_decoding_under_every_variant_follows_the_parallel_forward(name, batch, graph):
    torch.manual_seed(0)
    model = LanguageModel(_models()[name], device="cuda", dtype=torch.float32).eval()
    prompt = torch.randint(0, model.config.vocab_size, (batch, 7), device="cuda")
    with torch.no_grad():
        for variant in VARIANTS:
            with decode_launch.use(variant):
                clear_graph_cache()
                tokens = _decode(model, prompt, 6, graph)
            full = torch.cat([prompt, tokens[:, :-1]], 1)
            expected = model(full).logits[:, prompt.shape[1] - 1:].argmax(-1)
            assert torch.equal(tokens, expected), f"{variant}: {tokens.tolist()} vs {expected.tolist()}"
