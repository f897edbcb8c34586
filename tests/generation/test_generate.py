import pytest
import torch

from ssmkit.generation import generate, stream
from ssmkit.models import LanguageModel, get_preset
from ssmkit.testing import raise_dt_bias

PRESETS = ["debug-mamba", "debug-mamba2", "debug-hybrid"]


def make(name):
    torch.manual_seed(0)
    return raise_dt_bias(LanguageModel(get_preset(name)))


@pytest.fixture(scope="module", params=PRESETS)
def model(request):
    return make(request.param)


# Lengths 13, 2 and 9: left padding of 0, 11 and 4; with chunks of 4 the third prompt starts exactly
# at a chunk boundary and the second in the middle of a chunk.
PROMPTS = [list(range(1, 14)), [40, 41], [7, 3, 9, 22, 5, 5, 5, 30, 2]]


def test_greedy_matches_argmax_of_the_full_forward(model):
    out = generate(model, torch.tensor([PROMPTS[0]]), 10, temperature=0)
    assert out.shape == (1, 23) and out[0, :13].tolist() == PROMPTS[0]
    logits = model(out).logits[0, 12:-1]
    assert out[0, 13:].tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "top_p": 0.95, "seed": 11},
                                      {"temperature": 0.8, "top_k": 20, "min_p": 0.05,
                                       "repetition_penalty": 1.3, "seed": 4}])
def test_padded_batch_equals_each_row_alone(model, sampling):
    batch = generate(model, PROMPTS, 12, **sampling)
    for i, prompt in enumerate(PROMPTS):
        alone_kw = dict(sampling, seed=sampling["seed"] + i) if "seed" in sampling else sampling
        assert generate(model, [prompt], 12, **alone_kw)[0] == batch[i], f"row {i}"


@pytest.mark.parametrize("chunk", [1, 4, 5])
def test_chunked_prefill_equals_one_shot(model, chunk):
    one_shot = generate(model, PROMPTS, 8, temperature=0)
    assert generate(model, PROMPTS, 8, temperature=0, prefill_chunk_size=chunk) == one_shot
    cache_a, cache_b = model.allocate_cache(1), model.allocate_cache(1)
    generate(model, [PROMPTS[0]], 1, temperature=0, cache=cache_a)
    generate(model, [PROMPTS[0]], 1, temperature=0, cache=cache_b, prefill_chunk_size=chunk)
    for a, b in zip(cache_a.states, cache_b.states):
        torch.testing.assert_close(a.ssm, b.ssm, rtol=1e-5, atol=1e-6)


def test_seeds_make_sampling_reproducible(model):
    a = generate(model, PROMPTS, 10, temperature=1.0, seed=3)
    assert generate(model, PROMPTS, 10, temperature=1.0, seed=3) == a
    assert generate(model, PROMPTS, 10, temperature=1.0, seed=4) != a
    torch.manual_seed(7)
    b = generate(model, PROMPTS, 10)
    torch.manual_seed(7)
    assert generate(model, PROMPTS, 10) == b


def test_eos_stops_rows(model):
    free = generate(model, PROMPTS, 10, temperature=0)
    eos = free[1][3]
    out = generate(model, PROMPTS, 10, temperature=0, eos_token_id=eos)
    for row, full in zip(out, free):
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:cut]
    unused = next(t for t in range(model.config.vocab_size) if t not in free[1])
    tensor_out = generate(model, torch.tensor([PROMPTS[1]]), 10, temperature=0, eos_token_id=[unused, eos])
    assert tensor_out[0, 2:].tolist() == free[1][: free[1].index(eos) + 1]
    both = generate(model, torch.tensor([PROMPTS[1], PROMPTS[1][::-1]]), 10, temperature=0, eos_token_id=eos)
    assert both.shape[1] <= 12 and both[0, 2:].tolist()[: len(out[1])] == out[1]
    assert all(t == eos for t in both[0, 2 + len(out[1]):].tolist())


def test_stream_yields_one_step_at_a_time(model):
    steps = model.stream(PROMPTS, 6, temperature=0)
    first = next(steps)
    assert first.shape == (3,) and first.dtype == torch.long
    rest = list(steps)
    assert len(rest) == 5
    table = torch.stack([first] + rest, 1).tolist()
    assert table == model.generate(PROMPTS, 6, temperature=0)
    assert list(stream(model, PROMPTS, 0)) == []
    assert generate(model, torch.tensor([PROMPTS[1]]), 0).tolist() == [PROMPTS[1]]


def test_generate_from_a_saved_document_state(model, tmp_path):
    document, question = PROMPTS[0], PROMPTS[2]
    expected = generate(model, [document + question], 8, temperature=0)
    cache = model.allocate_cache(1)
    with torch.no_grad():
        model(torch.tensor([document]), cache=cache)
    cache.save(tmp_path / "doc.cache")
    from ssmkit.models import ModelCache

    for _ in range(2):  # the saved state answers any number of questions
        fork = ModelCache.load(tmp_path / "doc.cache")
        assert generate(model, [question], 8, temperature=0, cache=fork) == expected


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], 3)
    with pytest.raises(TypeError, match="flat list of ints"):
        generate(model, [1, 2, 3], 3)
    with pytest.raises(TypeError, match="prompts must hold integer token ids"):
        generate(model, torch.ones(1, 3), 3)
    with pytest.raises(ValueError, match=r"shape \(batch, length\)"):
        generate(model, torch.ones(3, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="prompts are empty"):
        generate(model, torch.ones(1, 0, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="prompt 0 must be a list of int token ids"):
        generate(model, [["a", "b"]], 3)
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match=r"input_ids has token ids outside \[0, "):
        generate(model, [[1, 10_000]], 3)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        generate(model, [[1]], -1)
    with pytest.raises(ValueError, match="eos_token_id must be token id"):
        generate(model, [[1]], 3, eos_token_id=10_000)
    with pytest.raises(ValueError, match="prefill_chunk_size must be a positive int"):
        generate(model, [[1]], 3, prefill_chunk_size=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        model.generate([[1]], 3, top_p=2.0)
    with pytest.raises(ValueError, match="all prompts must have the same length"):
        generate(model, PROMPTS, 3, cache=model.allocate_cache(3))
    with pytest.raises(ValueError, match="cache has 2 rows for 1 prompts"):
        generate(model, [[1, 2]], 3, cache=model.allocate_cache(2))
    # Errors come when stream is called, not at the first next().
    with pytest.raises(ValueError, match="temperature must be"):
        stream(model, [[1]], 3, temperature=-1)
