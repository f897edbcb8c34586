"""The engine's batched decode step on CPU: buckets, padded rows, per-row sampling, all equal ``generate`` alone.

The CUDA graph replays exactly the padded eager step tested here (``pad=True``); the capture itself is
tested on a GPU (tests/gpu/test_serve_engine.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

from ssmkit.generation import generate
from ssmkit.generation.decode import step
from ssmkit.generation.sampling import SamplingParams, make_generators, sample_next
from ssmkit.serve.decode_step import (
    BatchedDecoder,
    bucket_for,
    bucket_sizes,
    use_cuda_graph,
)

from .conftest import tiny_model

SETTINGS = [SamplingParams(temperature=0), SamplingParams(temperature=1.0),
            SamplingParams(temperature=0.7, top_k=10, top_p=0.9),
            SamplingParams(temperature=1.0, min_p=0.1, repetition_penalty=1.5),
            SamplingParams(temperature=0, repetition_penalty=1.3)]


def test_buckets():
    assert bucket_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert bucket_sizes(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(300) == (1, 2, 4, 8, 16, 32, 64, 128, 256, 300)
    sizes = bucket_sizes(100)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 5, 64, 65, 100)] == [1, 2, 4, 8, 64, 100, 100]
    with pytest.raises(ValueError, match="exceed the largest bucket"):
        bucket_for(101, sizes)
    with pytest.raises(ValueError):
        bucket_sizes(0)


def test_cuda_graph_choice_on_cpu():
    model = tiny_model()
    assert not use_cuda_graph(model, None) and not use_cuda_graph(model, False)
    with pytest.raises(ValueError, match="cuda_graph=True: the model is not on a CUDA device"):
        use_cuda_graph(model, True)
    with pytest.raises(ValueError, match="pad must be on"):
        BatchedDecoder(model, 8, cuda_graph=True, pad=False)


def first_token(model, prompt, params, seed):
    """The engine's prefill for one request: its cache, first token, stream and seen mask."""
    cache = model.allocate_cache(1)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), cache=cache, logits_to_keep=1).logits[:, -1].clone()
    logits[:, model.config.vocab_size:] = -torch.inf
    gen = None if params.greedy else make_generators(seed, 1, torch.device("cpu"))
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(1, model.config.padded_vocab_size, dtype=torch.bool)
        seen[0, prompt] = True
    token = int(sample_next(logits, params, seen=seen, generators=gen)[0])
    if seen is not None:
        seen[0, token] = True
    return cache, token, gen, seen


@pytest.mark.parametrize("pad", [False, True])
def test_rows_with_their_own_settings_join_and_leave_and_equal_generate_alone(pad):
    model = tiny_model()
    decoder = BatchedDecoder(model, 8, pad=pad)
    slots = decoder.slots
    requests = [([257, *range(30, 30 + n)], SETTINGS[i % len(SETTINGS)], 100 + i, 6 + 3 * i)
                for i, n in enumerate((3, 17, 1, 40, 9, 5, 22))]
    expected = [generate(model, [p], n, seed=seed, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                         min_p=s.min_p, repetition_penalty=s.repetition_penalty)[0] for p, s, seed, n in requests]
    got: dict[int, list[int]] = {}
    row_of: dict[int, int] = {}
    pending = list(range(len(requests)))
    with torch.no_grad():
        while pending or row_of:
            # One request joins per step (joins mid-stream), while others finish (leave mid-stream).
            if pending:
                i = pending.pop(0)
                prompt, params, seed, _ = requests[i]
                cache, token, gen, seen = first_token(model, prompt, params, seed)
                row_of[i] = slots.add(cache, token, params, gen, seen)
                got[i] = [token]
            if pad:  # free rows hold garbage: a padded step must not let it reach the rows in use
                for store in slots._store:
                    for t in store.values():
                        if t.is_floating_point():
                            t[slots.size:].fill_(float("nan"))
            tokens = decoder.step().tolist()
            for i, row in row_of.items():
                got[i].append(tokens[row])
            for i in [i for i in row_of if len(got[i]) == requests[i][3]]:
                row, last = row_of.pop(i), slots.size - 1
                slots.remove(row, keep=False)  # the last row moves into the hole
                row_of = {j: row if r == last else r for j, r in row_of.items()}
    assert [got[i] for i in range(len(requests))] == expected
    assert decoder.rows == sum(n - 1 for *_, n in requests)
    assert (decoder.padded_rows > 0) == pad


def test_eager_step_on_cpu_takes_the_lean_decoder(monkeypatch):
    """On a CPU the engine's eager step decodes through the lean decoder (as generate does), with the same
    tokens as the blocks' own step."""
    from ssmkit.serve import decode_step

    def run(lean: bool) -> tuple[list[list[int]], int]:
        model, taken = tiny_model(), []
        real = decode_step.lean_decoder

        def spy(m, cache):  # the decoder is asked once per batch size; count the steps it makes
            decoder = real(m, cache) if lean else None
            if decoder is None:
                return None

            def counted(token, cache):
                taken.append(True)
                return decoder(token, cache)
            return counted
        monkeypatch.setattr(decode_step, "lean_decoder", spy)
        decoder = BatchedDecoder(model, 4)
        with torch.no_grad():
            for i, prompt in enumerate(([257, 5, 6], [257, 40, 41, 42, 43])):
                cache, token, gen, seen = first_token(model, prompt, SETTINGS[0], i)
                decoder.slots.add(cache, token, SETTINGS[0], gen, seen)
            tokens = [decoder.step().tolist() for _ in range(8)]
        monkeypatch.undo()
        return tokens, sum(taken)

    lean_tokens, lean_steps = run(lean=True)
    layer_tokens, _ = run(lean=False)
    assert lean_steps == 8 and lean_tokens == layer_tokens


class FrozenStep:
    """A 'captured' step on CPU that computes with the parameters of its capture (a copy of the model), as a
    CUDA graph computes with the tensors it read then (the layers' cached decode ``A`` among them)."""

    def __init__(self, model, first, state, **_):
        self.model, self.state, self.token = copy.deepcopy(model), state, first

    def replay(self):
        self.token.copy_(step(self.model, self.token, self.state))


def _edit(model, how: str) -> None:
    """Change every Mamba-2 layer's A (and with load_state_dict everything) the ways users do."""
    with torch.no_grad():
        if how == "load_state_dict":  # copies in place: same storage, versions bumped
            torch.manual_seed(1)
            model.load_state_dict(type(model)(model.config).state_dict())
            return
        for block in model.layers:
            A_log = block.mixer.A_log
            if how == "in_place":
                A_log.sub_(6.0)  # slower decay: the tokens change
            elif how == "data":  # storage swapped, version kept
                A_log.data = A_log.data - 6.0
            else:  # another parameter object
                block.mixer.A_log = torch.nn.Parameter(A_log - 6.0)


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("how", ["in_place", "load_state_dict", "data", "replaced"])
def test_steps_follow_parameters_changed_after_capture(monkeypatch, graph, how):
    """Review concern (issue 22): the graphs kept per bucket read tensors computed from the parameters at
    capture. After an edit every graph is dropped and captured again on first use, so a request decodes with
    the new parameters, as ``generate`` does; with nothing changed no graph is captured again."""
    from ssmkit.serve import decode_step

    if graph:
        monkeypatch.setattr(decode_step, "GraphedStep", FrozenStep)
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    model = tiny_model()
    decoder = BatchedDecoder(model, 4, cuda_graph=graph, pad=True)
    prompt, n = [257, *range(40, 52)], 10

    def decode() -> list[int]:
        with torch.no_grad():
            cache, token, gen, seen = first_token(model, prompt, SETTINGS[0], 0)
            row = decoder.slots.add(cache, token, SETTINGS[0], gen, seen)
            tokens = [token] + [decoder.step()[row].item() for _ in range(n - 1)]
            decoder.slots.remove(row, keep=False)
        return tokens

    before = decode()
    assert before == generate(model, [prompt], n, temperature=0)[0]
    assert decode() == before and decoder.recaptures == 0
    captures = decoder.captures
    _edit(model, how)
    after = generate(model, [prompt], n, temperature=0)[0]
    assert after != before  # else the test shows nothing
    assert decode() == after
    if graph:
        assert decoder.recaptures == 1 and decoder.captures == captures + 1
        assert decode() == after and decoder.recaptures == 1 and decoder.captures == captures + 1
