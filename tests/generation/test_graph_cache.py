"""Kept decode graphs (``ssmkit/generation/graph_cache.py``), on CPU through an eager stand-in for the capture.

The stand-in has a CUDA graph's contract: it reads and writes only the buffers of the decode state it was
made with. So a kept entry that failed to copy a caller's state in (or its cache back out) gives other
tokens or another cache than the eager loop, which these tests compare against.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from ssmkit.generation import graph_cache, stream
from ssmkit.generation.decode import step
from ssmkit.models import LanguageModel, get_preset

# The module, not the package's ``generate`` function of the same name.
generate_module = importlib.import_module("ssmkit.generation.generate")


class EagerStep:
    """A 'captured' step: the token buffer and the decode state fixed at construction, as in a graph."""

    captures = 0

    def __init__(self, model, first, state):
        EagerStep.captures += 1
        self.model, self.state, self.token = model, state, first.clone()

    def replay(self):
        self.token.copy_(step(self.model, self.token, self.state))


@pytest.fixture
def graphed(monkeypatch):
    """generate's graph path on CPU, captures counted."""
    monkeypatch.setattr(generate_module, "_use_graph", lambda model, device, cuda_graph, n: cuda_graph is not False)
    monkeypatch.setattr(graph_cache, "GraphedStep", EagerStep)
    EagerStep.captures = 0
    graph_cache.clear_graph_cache()
    yield
    graph_cache.clear_graph_cache()


def make(name="debug-hybrid"):
    torch.manual_seed(0)
    return LanguageModel(get_preset(name)).eval()


def run(model, prompts, n, **kw):
    return [t.tolist() for t in stream(model, prompts, n, **kw)]


SAMPLING = {"temperature": 0.9, "top_p": 0.9, "repetition_penalty": 1.2, "eos_token_id": [7, 9]}


def test_a_kept_graph_gives_the_eager_tokens_for_other_prompts_and_seeds(graphed):
    model = make()
    for prompts, seed in (([[1, 2, 3], [4, 5]], 3), ([[9, 8, 7, 6], [2]], 4), ([[5, 5], [6, 6, 6]], 5)):
        got = run(model, prompts, 12, seed=seed, **SAMPLING)
        assert got == run(model, prompts, 12, seed=seed, cuda_graph=False, **SAMPLING)
    assert EagerStep.captures == 1 and graph_cache.cached_graphs(model) == 1


def test_other_structures_capture_their_own_and_the_oldest_idle_go(graphed):
    model = make("debug-mamba2")
    for batch in range(1, 7):
        run(model, [[1, 2]] * batch, 3, temperature=0)
    assert EagerStep.captures == 6 and graph_cache.cached_graphs(model) == graph_cache.MAX_PER_MODEL
    run(model, [[3]] * 6, 3, temperature=0)  # the newest are kept
    run(model, [[3]], 3, temperature=0)  # the oldest went
    assert EagerStep.captures == 7
    run(model, [[3]] * 6, 3, temperature=1.0, seed=0)  # sampling: another step
    assert EagerStep.captures == 8


def test_new_parameter_storage_means_a_new_capture(graphed):
    model = make("debug-mamba")
    run(model, [[1, 2, 3]], 4, temperature=0)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    run(model, [[1, 2, 3]], 4, temperature=0)
    assert EagerStep.captures == 2


def test_a_callers_cache_is_continued_and_left_as_the_eager_loop_leaves_it(graphed):
    model = make()
    caches = []
    for graph in (None, False):
        cache = model.allocate_cache(1)
        model(torch.tensor([[3, 1, 4, 1, 5]]), cache=cache)
        cache.seqlen_offset = 5
        tokens = []
        for tok in stream(model, [[9, 2]], 10, temperature=0, cache=cache, cuda_graph=graph):
            tokens.append(tok.item())
            if len(tokens) == 6:
                break  # the consumer stops early: the cache holds what was read up to here
        caches.append((tokens, cache))
    (tokens, cache), (want_tokens, want) = caches
    assert tokens == want_tokens and cache.seqlen_offset == want.seqlen_offset
    for mine, theirs in zip(cache.states, want.states):
        for name, t in mine.tensors().items():
            # Not bit for bit: on CPU the eager loop steps through the lean decoder, a graph the blocks' step.
            torch.testing.assert_close(t, theirs.tensors()[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_call_while_the_kept_graph_is_in_use_captures_its_own(graphed):
    model = make("debug-mamba2")
    first = stream(model, [[1, 2]], 8, temperature=0)
    next(first)  # holds the kept entry until it finishes
    assert run(model, [[1, 2]], 8, temperature=0) == run(model, [[1, 2]], 8, temperature=0, cuda_graph=False)
    assert EagerStep.captures == 2 and graph_cache.cached_graphs(model) == 1
    first.close()
    run(model, [[1, 2]], 8, temperature=0)
    assert EagerStep.captures == 2


def test_calls_inside_and_outside_inference_mode_each_work(graphed):
    """An entry made under torch.inference_mode holds inference tensors, which a later call outside it could
    not copy into: each mode has its own entries, and both give the eager tokens."""
    model = make("debug-mamba2")
    want = run(model, [[1, 2, 3]], 6, temperature=0, cuda_graph=False)
    with torch.inference_mode():
        assert run(model, [[1, 2, 3]], 6, temperature=0) == want
    assert run(model, [[1, 2, 3]], 6, temperature=0) == want
    with torch.inference_mode():
        assert run(model, [[1, 2, 3]], 6, temperature=0) == want
    assert EagerStep.captures == 2


def test_another_autocast_dtype_means_a_new_capture(graphed):
    """A captured step's kernels run in the autocast dtype of its capture: a call under another one must not
    replay it."""
    model = make("debug-mamba2")
    was = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    try:
        torch.set_autocast_enabled("cuda", True)  # CPU ops are unaffected: only the key is at stake here
        for dtype in (torch.bfloat16, torch.float16, torch.bfloat16):
            torch.set_autocast_dtype("cuda", dtype)
            run(model, [[1, 2, 3]], 4, temperature=0)
    finally:
        torch.set_autocast_enabled("cuda", was[0])
        torch.set_autocast_dtype("cuda", was[1])
    assert EagerStep.captures == 2


def test_parameters_changed_in_place_mean_a_new_capture(graphed):
    """In-place updates (load_state_dict, an optimizer step between the trainer's samples) keep the storage
    but not what the capture computed from the parameters outside the graph (the layers' decode A cached
    from A_log): a kept graph would decode with the old values. The parameters' versions are in the key."""
    model = make("debug-mamba2")
    run(model, [[1, 2, 3]], 4, temperature=0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)
    assert run(model, [[1, 2, 3]], 4, temperature=0) == run(model, [[1, 2, 3]], 4, temperature=0, cuda_graph=False)
    assert EagerStep.captures == 2
    run(model, [[1, 2, 3]], 4, temperature=0)  # unchanged since: the kept graph
    assert EagerStep.captures == 2
    # The graph of the old values can never be used again: it is dropped, not kept until the LRU limit.
    assert graph_cache.cached_graphs(model) == 1


def test_an_entry_goes_with_the_parameter_storage_it_read(graphed):
    """Replaced parameters (load_state_dict(assign=True), model.to() and back) free the storage a kept graph
    read. The key holds only addresses, and a freed address can come back for a new tensor, while the graph
    also read tensors cached from the old ones (the layers' decode A), freed since: such an entry is dropped."""
    model = make("debug-mamba")
    run(model, [[1, 2, 3]], 4, temperature=0)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert graph_cache.cached_graphs(model) == 0
    run(model, [[1, 2, 3]], 4, temperature=0)
    assert EagerStep.captures == 2 and graph_cache.cached_graphs(model) == 1
