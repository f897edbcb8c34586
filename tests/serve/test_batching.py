"""The engine in-process: batched decode gives each request the tokens and final state of ``generate`` alone."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from ssmkit.generation import generate
from ssmkit.generation.sampling import SamplingParams
from ssmkit.models import LanguageModel, get_preset
from ssmkit.serve import decode_step
from ssmkit.serve.batching import Engine, EngineBusy, GenerationRequest
from ssmkit.serve.decode_step import BatchedDecoder
from ssmkit.testing import assert_close

from .conftest import tiny_model


class Collector:
    """on_token / on_done callbacks that record what the engine reports."""

    def __init__(self, stop_after: int | None = None, fail_after: int | None = None) -> None:
        self.tokens: list[int] = []
        self.reason: str | None = None
        self.cache = None
        self.done = threading.Event()
        self.stop_after, self.fail_after = stop_after, fail_after

    def on_token(self, token: int) -> bool:
        self.tokens.append(token)
        if self.fail_after is not None and len(self.tokens) >= self.fail_after:
            raise RuntimeError("callback failed")
        return self.stop_after is not None and len(self.tokens) >= self.stop_after

    def on_done(self, reason, cache) -> None:
        self.reason, self.cache = reason, cache
        self.done.set()


def submit(engine: Engine, ids, n, sampling, *, seed=0, cache=None, keep_state=False, eos=(258,),
           **collector) -> Collector:
    c = Collector(**collector)
    c.request = GenerationRequest(ids=ids, max_new_tokens=n, params=SamplingParams(**sampling), seed=seed,
                                  on_token=c.on_token, on_done=c.on_done, eos_ids=eos, cache=cache,
                                  keep_state=keep_state)
    engine.submit(c.request)
    return c


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(params=["exact", "padded", "serial"])
def engine(model, request):
    # serial: each step's tokens read before the next is launched (overlap off, a CPU's default)
    engine = Engine(model, max_batch=4, max_requests=16, prefill_chunk_size=16, overlap=request.param != "serial")
    assert engine.overlap == (request.param != "serial")
    if request.param == "padded":  # the bucketed step a CUDA graph replays, run eagerly
        engine.decoder = BatchedDecoder(model, 4, pad=True)
    engine.start()
    yield engine
    engine.stop()


SAMPLINGS = [{"temperature": 0}, {"temperature": 1.0}, {"temperature": 0.7, "top_k": 10, "top_p": 0.9},
             {"temperature": 1.0, "min_p": 0.1, "repetition_penalty": 1.5}]


def test_concurrent_requests_equal_generate_alone(model, engine):
    prompts = [[257, *range(40, 40 + n)] for n in (3, 30, 1, 17, 9, 50)]
    runs = [(p, 12 + i, SAMPLINGS[i % 4], 100 + i) for i, p in enumerate(prompts)]
    collectors = [submit(engine, p, n, s, seed=seed) for p, n, s, seed in runs]
    for c in collectors:
        assert c.done.wait(60)
    for (p, n, s, seed), c in zip(runs, collectors):
        expected = generate(model, [p], n, eos_token_id=258, seed=seed, **s)[0]
        assert c.tokens == expected
        assert c.reason == ("stop" if expected[-1] == 258 else "length")
    produced = sum(len(c.tokens) for c in collectors)
    assert engine.tokens == produced
    # Six requests on four rows: far fewer steps than tokens.
    assert engine.steps < produced - len(runs)


def test_kept_state_equals_the_cache_generate_leaves(model, engine):
    start = model.allocate_cache(1)
    generate(model, [[257, 5, 6, 7]], 1, temperature=0, cache=start)
    # Other requests run meanwhile, so the kept row comes out of a shared batch.
    others = [submit(engine, [257, 1, 2], 20, {"temperature": 1.0}, seed=i) for i in range(3)]
    c = submit(engine, [9, 10, 11], 6, {"temperature": 1.0}, seed=4, cache=start.clone(), keep_state=True)
    assert c.done.wait(60) and all(o.done.wait(60) for o in others)
    reference = start.clone()
    tokens = generate(model, [[9, 10, 11]], 6, temperature=1.0, seed=4, cache=reference, eos_token_id=258)[0]
    assert c.tokens == tokens
    assert c.cache.seqlen_offset == reference.seqlen_offset
    for mine, theirs in zip(c.cache.states, reference.states):
        for name, t in mine.tensors().items():
            assert_close(t, theirs.tensors()[name])


def test_zero_tokens_only_reads_and_keeps_the_state(model, engine):
    c = submit(engine, [257, 1, 2, 3], 0, {"temperature": 0}, keep_state=True)
    assert c.done.wait(60) and c.tokens == [] and c.reason == "length"
    reference = model.allocate_cache(1)
    with torch.no_grad():
        model(torch.tensor([[257, 1, 2, 3]]), cache=reference)
    assert c.cache.seqlen_offset == 4
    for mine, theirs in zip(c.cache.states, reference.states):
        assert_close(mine.ssm, theirs.ssm)


def test_stop_cancel_and_errors_end_only_their_request(engine):
    stopped = submit(engine, [257, 1], 50, {"temperature": 1.0}, stop_after=3)
    failing = submit(engine, [257, 2], 50, {"temperature": 1.0}, fail_after=2)
    slow = submit(engine, [257, 3], 10**6, {"temperature": 1.0})
    healthy = submit(engine, [257, 4], 20, {"temperature": 1.0})
    for c in (stopped, failing, healthy):
        assert c.done.wait(60)
    assert stopped.reason == "stop" and len(stopped.tokens) == 3
    assert failing.reason.startswith("error") and "callback failed" in failing.reason
    assert healthy.reason == "length" and len(healthy.tokens) == 20
    assert not slow.done.is_set() and engine.alive
    slow.request.cancel()
    assert slow.done.wait(60) and slow.reason == "cancelled"
    assert engine.in_flight == 0


def test_cancel_busy_and_full_attention_models():
    model = LanguageModel(get_preset("jamba-tiny")).eval()
    engine = Engine(model, max_batch=2, max_requests=2)
    assert not engine.batched  # a full-attention KV cache grows: requests decode one by one
    engine.start()
    try:
        slow = submit(engine, [1, 2], 10**6, {"temperature": 0}, eos=())
        quick = submit(engine, [3, 4, 5], 8, {"temperature": 1.0}, seed=3, eos=())
        with pytest.raises(EngineBusy):
            submit(engine, [1], 1, {"temperature": 0}, eos=())
        assert quick.done.wait(60)
        assert quick.tokens == generate(model, [[3, 4, 5]], 8, temperature=1.0, seed=3)[0]
        slow.request.cancel()
        assert slow.done.wait(60) and slow.reason == "cancelled" and slow.cache is None
        assert engine.in_flight == 0
    finally:
        engine.stop()


def test_new_prompts_are_read_together_and_still_equal_generate(model):
    # The oldest prompt reads 16 tokens a turn; the rest of the budget goes to the others.
    engine = Engine(model, max_batch=4, max_requests=16, prefill_chunk_size=16, prefill_budget=64)
    engine.start()
    batches = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append((args[0].shape, kwargs.get("seq_idx") is not None)),
        with_kwargs=True)
    try:
        # A long prompt read in chunks of 16 keeps the engine busy while the short ones arrive.
        long = submit(engine, [257, *([7] * 600)], 4, {"temperature": 1.0}, seed=1)
        prompts = [[257, *range(1, 1 + n)] for n in (5, 9, 2, 9, 14)]
        shorts = [submit(engine, p, 10, {"temperature": 1.0}, seed=50 + i) for i, p in enumerate(prompts)]
        assert long.done.wait(60) and all(c.done.wait(60) for c in shorts)
    finally:
        hook.remove()
        engine.stop()
    assert any(padded and shape[0] > 1 for shape, padded in batches), batches
    for i, (p, c) in enumerate(zip(prompts, shorts)):
        assert c.tokens == generate(model, [p], 10, temperature=1.0, seed=50 + i, eos_token_id=258)[0]


def test_a_zamba2_state_kept_after_a_prompt_continues_like_generate():
    """Zamba2 (each hybrid layer's state: its shared-block call's KV beside Mamba-2's) through the engine: the
    state kept after a prompt, continued with more tokens, gives generate's tokens on the whole prompt."""
    torch.manual_seed(0)
    model = LanguageModel(get_preset("zamba2-tiny")).eval()
    engine = Engine(model, max_batch=2, max_requests=2)
    assert not engine.batched  # its KV caches grow
    engine.start()
    try:
        kept = submit(engine, [3, 4, 5, 6, 7], 0, {"temperature": 0}, eos=(), keep_state=True)
        assert kept.done.wait(60) and kept.cache.seqlen_offset == 5
        more = submit(engine, [8, 9], 10, {"temperature": 0}, cache=kept.cache, eos=())
        assert more.done.wait(60)
        assert more.tokens == generate(model, [[3, 4, 5, 6, 7, 8, 9]], 10, temperature=0)[0]
    finally:
        engine.stop()


def test_granite_hybrid_is_served_like_generate():
    """Granite-4.0-H (multipliers, MoE with a shared expert, NoPE attention): what the engine serves equals
    generate(), greedy and sampled."""
    torch.manual_seed(0)
    model = LanguageModel(get_preset("granite-hybrid-tiny")).eval()
    engine = Engine(model, max_batch=2, max_requests=4)
    engine.start()
    try:
        greedy = submit(engine, [1, 2, 3], 12, {"temperature": 0}, eos=())
        sampled = submit(engine, [4, 5], 12, {"temperature": 1.0}, seed=7, eos=())
        assert greedy.done.wait(60) and sampled.done.wait(60)
        assert greedy.tokens == generate(model, [[1, 2, 3]], 12, temperature=0)[0]
        assert sampled.tokens == generate(model, [[4, 5]], 12, temperature=1.0, seed=7)[0]
    finally:
        engine.stop()


def test_a_long_prompt_is_read_between_the_decode_steps_of_running_streams(model, monkeypatch):
    engine = Engine(model, max_batch=4, max_requests=16, prefill_chunk_size=16, prefill_budget=16)
    calls: list[tuple[int, int]] = []  # (rows, tokens) of every forward: prefill chunks and decode steps
    hook = model.embedding.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    # A decode step on CPU goes through the lean decoder, which reads the embedding without the module's hooks.
    eager_step = decode_step.step

    def counted_step(model, tokens, *args):
        calls.append((len(tokens), 1))
        return eager_step(model, tokens, *args)
    monkeypatch.setattr(decode_step, "step", counted_step)
    engine.start()
    try:
        running = submit(engine, [257, 1, 2], 10**6, {"temperature": 1.0}, seed=3, eos=())
        while len(running.tokens) < 3:
            assert not running.done.wait(0.01)
        before = len(running.tokens)
        long_prompt = [257, *([9] * 300)]
        long = submit(engine, long_prompt, 5, {"temperature": 0}, eos=())
        assert long.done.wait(60)
        running.request.cancel()
        assert running.done.wait(60) and running.reason == "cancelled"
    finally:
        hook.remove()
        engine.stop()
    chunks = [i for i, shape in enumerate(calls) if shape == (1, 16)]
    assert len(chunks) == len(long_prompt) // 16
    # Every chunk of the long prompt is followed by a decode step of the running stream before the next.
    assert all(any(calls[k][1] == 1 for k in range(a + 1, b)) for a, b in itertools.pairwise(chunks))
    assert len(running.tokens) - before >= len(chunks)
    assert long.tokens == generate(model, [long_prompt], 5, temperature=0, prefill_chunk_size=16)[0]
