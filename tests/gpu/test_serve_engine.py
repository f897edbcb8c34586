"""The serving engine on a CUDA GPU: batched decode steps replayed from CUDA graphs (one per batch-size
bucket), each request's tokens equal to ``generate`` alone, and the graph step equal to the eager one.

Run on the device machine: ``python -m pytest -m gpu tests/gpu/test_serve_engine.py -q``.
"""

from __future__ import annotations

import threading

import pytest
import torch

from ssmkit.generation import generate
from ssmkit.generation.sampling import SamplingParams, make_generators, sample_next
from ssmkit.models import LanguageModel, get_preset
from ssmkit.serve.batching import Engine, GenerationRequest
from ssmkit.serve.decode_step import BatchedDecoder

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SETTINGS = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_p=0.9),
            SamplingParams(temperature=0.8, top_k=20, min_p=0.02, repetition_penalty=1.2),
            SamplingParams(temperature=0, repetition_penalty=1.3)]


def _peaked(preset: str, dtype: torch.dtype) -> LanguageModel:
    torch.manual_seed(0)
    model = LanguageModel(get_preset(preset), device="cuda", dtype=dtype).eval()
    with torch.no_grad():
        # Peaked logits, as a trained model has: batched and single kernels round differently (TF32 in
        # Triton's dots), which must not decide between two nearly equal tokens here.
        model.embedding.weight.mul_(30)
    return model


def _run(engine: Engine, prompts, settings, n_new) -> list[list[int]]:
    results: list[list[int]] = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def collect(i: int):
        def on_token(token: int) -> bool:
            results[i].append(token)
            return False

        return on_token

    for i, p in enumerate(prompts):
        engine.submit(GenerationRequest(ids=p, max_new_tokens=n_new[i], params=settings[i], seed=i,
                                        on_token=collect(i), on_done=lambda reason, cache, i=i: done[i].set()))
    assert all(d.wait(120) for d in done)
    return results


@pytest.mark.parametrize("preset", ["byte-small", "debug-hybrid", "samba-tiny"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: `ssmkit serve`'s GPU default
def test_batched_requests_equal_generate_on_cuda(preset, dtype):
    model = _peaked(preset, dtype)
    vocab = model.config.vocab_size
    # A budget above the prompts' total: every prompt is read in generate's chunks of 64 (the interleaving
    # with a smaller budget is tested on CPU, tests/serve/test_batching.py).
    engine = Engine(model, max_batch=16, prefill_chunk_size=64, prefill_budget=4096)
    assert engine.cuda_graph  # every layer of these models can be captured
    engine.start()
    lengths = (1, 7, 40, 300, 2, 64, 17, 5, 130, 3)
    prompts = [[int(t) for t in torch.randint(0, vocab, (n,))] for n in lengths]
    settings = [SETTINGS[i % len(SETTINGS)] for i in range(len(prompts))]
    n_new = [8 + 5 * i for i in range(len(prompts))]  # requests leave at different steps
    try:
        results = _run(engine, prompts, settings, n_new)
    finally:
        engine.stop()
    for i, (p, s) in enumerate(zip(prompts, settings)):
        expected = generate(model, [p], n_new[i], temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                            min_p=s.min_p, repetition_penalty=s.repetition_penalty, seed=i, prefill_chunk_size=64)[0]
        assert results[i] == expected, i
    assert engine.steps < sum(len(r) for r in results) - len(prompts)
    assert engine.decoder.captures > 0 and engine.decoder.padded_rows > 0


def _rows(model, prompts, settings):
    """Per request: prefilled cache, first token, stream, seen mask (as the engine hands them to its slots)."""
    out = []
    for i, (p, s) in enumerate(zip(prompts, settings)):
        cache = model.allocate_cache(1)
        with torch.no_grad():
            logits = model(torch.tensor([p], device="cuda"), cache=cache, logits_to_keep=1).logits[:, -1].clone()
        logits[:, model.config.vocab_size:] = -torch.inf
        gen = None if s.greedy else make_generators(i, 1, torch.device("cuda"))
        seen = None
        if s.repetition_penalty != 1.0:
            seen = torch.zeros(1, model.config.padded_vocab_size, dtype=torch.bool, device="cuda")
            seen[0, p] = True
        token = int(sample_next(logits, s, seen=seen, generators=gen)[0])
        if seen is not None:
            seen[0, token] = True
        out.append((cache, token, s, gen, seen))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_step_equals_the_padded_eager_step(dtype):
    """The captured step replays exactly the padded eager step, through joins, leaves and bucket changes;
    free rows filled with NaN change nothing."""
    model = _peaked("byte-small", dtype)
    prompts = [[int(t) for t in torch.randint(0, 256, (n,))] for n in (3, 50, 1, 9, 33, 12, 70, 5, 2, 18)]
    settings = [SETTINGS[i % len(SETTINGS)] for i in range(len(prompts))]
    rows = _rows(model, prompts, settings)
    graph, eager = BatchedDecoder(model, 8, cuda_graph=True), BatchedDecoder(model, 8, pad=True)
    live: list[int] = []
    pending = list(range(len(prompts)))
    steps = 0
    with torch.no_grad():
        while pending or live:
            while pending and len(live) < 8 and (steps % 3 == 0 or not live):
                i = pending.pop(0)
                cache, token, s, gen, seen = rows[i]
                for d in (graph, eager):
                    d.slots.add(cache, token, s, gen, seen)
                live.append(i)
            for store in graph.slots._store:
                for t in store.values():
                    if t.is_floating_point():
                        t[graph.slots.size:].fill_(float("nan"))
            a, b = graph.step().tolist(), eager.step().tolist()
            assert a == b, steps
            steps += 1
            if steps % 4 == 0:  # the oldest leaves: the last row moves into its place
                for d in (graph, eager):
                    d.slots.remove(0, keep=False)
                live[0] = live[-1]
                live.pop()
    assert graph.captures >= 3 and graph.padded_rows == eager.padded_rows > 0


def test_engine_graphs_without_cuda_graph_flag_decode_eagerly():
    model = _peaked("byte-small", torch.bfloat16)
    engine = Engine(model, max_batch=4, cuda_graph=False)
    assert not engine.cuda_graph and not engine.decoder.pad
    engine.start()
    try:
        results = _run(engine, [[1, 2, 3], [4, 5]], [SETTINGS[0], SETTINGS[1]], [10, 10])
    finally:
        engine.stop()
    assert results[0] == generate(model, [[1, 2, 3]], 10, temperature=0)[0]
    assert engine.decoder.captures == 0


def test_graphs_are_captured_while_other_threads_use_the_gpu():
    """A server's request threads copy states on the GPU (session saves, prefix snapshots) while the engine
    captures its graphs: the captures must not fail, nor the copies."""
    model = _peaked("byte-small", torch.bfloat16)
    engine = Engine(model, max_batch=32)
    stop, errors = threading.Event(), []
    state = model.allocate_cache(1)

    def copier() -> None:
        try:
            while not stop.is_set():
                state.clone().states[0].ssm.cpu()
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    thread = threading.Thread(target=copier)
    thread.start()
    engine.start()
    try:
        n = 20  # requests leaving one by one pass through the buckets 32 .. 1, each captured on first use
        prompts = [[1 + i, 2, 3] for i in range(n)]
        n_new = [10 + 2 * i for i in range(n)]
        results = _run(engine, prompts, [SETTINGS[i % 2] for i in range(n)], n_new)
    finally:
        stop.set()
        thread.join()
        engine.stop()
    assert not errors and [len(r) for r in results] == n_new
    assert engine.decoder.captures >= 5


def test_kept_state_prefix_hits_and_cancel_under_graphs():
    """Sessions (a kept state), prefix-cache hits and a cancel mid-stream on the graph path."""
    from ssmkit.serve.prefix_cache import PrefixCache

    model = _peaked("byte-small", torch.float32)
    engine = Engine(model, max_batch=8, prefill_chunk_size=64)
    prefix = PrefixCache(model, memory_budget=1 << 30, interval=48)
    doc = [int(t) for t in torch.randint(0, 256, (150,))]
    kept: dict[str, object] = {}
    events = {k: threading.Event() for k in ("session", "slow", "cold", "warm")}
    tokens: dict[str, list[int]] = {k: [] for k in events}

    def request(name: str, ids, n, **kw) -> GenerationRequest:
        def on_token(t: int) -> bool:
            tokens[name].append(t)
            return False

        def on_done(reason: str, cache) -> None:
            kept[name] = (reason, cache)
            events[name].set()

        req = GenerationRequest(ids=ids, max_new_tokens=n, params=SETTINGS[0], seed=0, on_token=on_token,
                                on_done=on_done, **kw)
        engine.submit(req)
        return req

    engine.start()
    try:
        slow = request("slow", [7, 8, 9], 10**6)
        request("session", [1, 2, 3, 4], 12, keep_state=True)
        request("cold", doc + [5, 6], 10, prefix=prefix.plan(doc + [5, 6]))
        assert events["cold"].wait(60) and events["session"].wait(60)
        request("warm", doc + [5, 6, 7], 10, prefix=prefix.plan(doc + [5, 6, 7]))
        assert events["warm"].wait(60)
        slow.cancel()
        assert events["slow"].wait(60) and kept["slow"][0] == "cancelled"
    finally:
        engine.stop()
    assert prefix.stats()["hits"] >= 1
    assert tokens["warm"] == generate(model, [doc + [5, 6, 7]], 10, temperature=0)[0]
    assert tokens["cold"] == generate(model, [doc + [5, 6]], 10, temperature=0)[0]
    reference = model.allocate_cache(1)
    assert tokens["session"] == generate(model, [[1, 2, 3, 4]], 12, temperature=0, cache=reference)[0]
    reason, cache = kept["session"]
    assert reason == "length" and cache.seqlen_offset == reference.seqlen_offset
    for mine, theirs in zip(cache.states, reference.states):
        for name, t in mine.tensors().items():
            torch.testing.assert_close(t, theirs.tensors()[name], rtol=1e-4, atol=1e-5)
    assert engine.decoder.captures > 0


@pytest.mark.parametrize("overlap", [True, False])
def test_start_captures_every_bucket_and_a_burst_captures_no_more(overlap):
    """The graphs of greedy, sampled and mixed batches are captured at start, so a burst of such requests
    (rows joining and leaving through every bucket) never waits for a capture; each launched step is read
    once, and the tokens are generate's, with the step overlapped or not."""
    from ssmkit.serve.batching import CAPTURE_AT_START
    from ssmkit.serve.decode_step import LaunchedStep, bucket_sizes

    model = _peaked("byte-small", torch.bfloat16)
    engine = Engine(model, max_batch=16, overlap=overlap)
    engine.start()
    reads = [0]
    original = LaunchedStep.tokens

    def counted(self):
        reads[0] += 1
        return original(self)

    LaunchedStep.tokens = counted
    try:
        assert engine.decoder.captures == len(CAPTURE_AT_START) * len(bucket_sizes(16))
        before = engine.decoder.captures
        n = 24
        prompts = [[1 + i, 2, 3, *range(4, 4 + i)] for i in range(n)]
        settings = [SamplingParams(temperature=0) if i % 3 == 0 else SamplingParams(temperature=1.0) for i in range(n)]
        n_new = [5 + 3 * i for i in range(n)]
        results = _run(engine, prompts, settings, n_new)
    finally:
        LaunchedStep.tokens = original
        engine.stop()
    assert engine.decoder.captures == before
    assert reads[0] == engine.steps == engine.decoder.steps
    for i, (p, s) in enumerate(zip(prompts, settings)):
        assert results[i] == generate(model, [p], n_new[i], temperature=s.temperature, seed=i)[0], i


def _remembering(seed: int) -> LanguageModel:
    """debug-mamba2 with the byte vocabulary and larger Δ biases (a state that remembers), float32 on CUDA."""
    config = get_preset("debug-mamba2")
    config.vocab_size = 259
    torch.manual_seed(seed)
    model = LanguageModel(config, device="cuda").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("dt_bias"):
                p.add_(2.0)
    return model


@pytest.mark.parametrize("how", ["in_place", "load_state_dict"])
def test_graphs_follow_parameters_edited_in_place(how):
    """Review concern (issue 22): the graphs captured at the engine's start read the layers' decode ``A``
    (``-exp(A_log)``, cached while ``A_log`` keeps its version). After ``A_log`` is edited in place, or the
    weights are loaded with ``load_state_dict``, the engine drops its graphs and captures them again: its
    tokens are those of ``generate`` on the edited model."""
    model = _remembering(0)
    engine = Engine(model, max_batch=8, prefill_chunk_size=64, prefill_budget=4096)
    assert engine.cuda_graph
    engine.start()
    torch.manual_seed(5)
    prompts = [[int(t) for t in torch.randint(0, 259, (n,))] for n in (13, 40, 2)]
    settings = [SETTINGS[0], SETTINGS[1], SETTINGS[0]]
    n_new = [16, 16, 16]
    try:
        before = _run(engine, prompts, settings, n_new)
        captures = engine.decoder.captures
        with torch.no_grad():
            if how == "in_place":
                for block in model.layers:
                    block.mixer.A_log.sub_(6.0)  # slower decay: other tokens
            else:
                model.load_state_dict(_remembering(1).state_dict())
        after = _run(engine, prompts, settings, n_new)
    finally:
        engine.stop()
    expected = [generate(model, [p], n_new[i], temperature=s.temperature, top_p=s.top_p, seed=i,
                         prefill_chunk_size=64)[0] for i, (p, s) in enumerate(zip(prompts, settings))]
    assert after != before  # else the test shows nothing
    assert after == expected
    assert engine.decoder.recaptures == 1 and engine.decoder.captures > captures
