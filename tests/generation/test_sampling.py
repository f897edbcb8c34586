import pytest
import torch

from ssmkit.generation.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    make_generators,
    sample_next,
)


def kept(logits):
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


def test_greedy_is_argmax_after_the_repetition_penalty():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.2]])
    assert sample_next(logits, SamplingParams(temperature=0)).tolist() == [1, 0]
    seen = torch.tensor([[False, True, False], [True, False, False]])
    # 3 / 2 = 1.5 < 2: token 2 wins; 0.5 / 2 = 0.25 > 0.2 keeps token 0.
    assert sample_next(logits, SamplingParams(temperature=0, repetition_penalty=2.0), seen=seen).tolist() == [2, 0]


def test_repetition_penalty_formula():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 4.0).tolist() == [[0.5, -8.0, 1.0]]


def test_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))
    assert kept(filter_logits(logits, SamplingParams(top_k=2))) == {0, 1}
    assert kept(filter_logits(logits, SamplingParams(top_p=0.5))) == {0}
    assert kept(filter_logits(logits, SamplingParams(top_p=0.7))) == {0, 1}
    assert kept(filter_logits(logits, SamplingParams(top_p=0.9))) == {0, 1, 2}
    assert kept(filter_logits(logits, SamplingParams(top_p=1.0))) == {0, 1, 2, 3, 4}
    # min_p keeps tokens at least min_p times as likely as the best one (0.5 * 0.3 = 0.15).
    assert kept(filter_logits(logits, SamplingParams(min_p=0.3))) == {0, 1, 2}
    assert kept(filter_logits(logits, SamplingParams(top_k=3, top_p=0.7))) == {0, 1}
    # Temperature scales before the filters.
    assert torch.allclose(filter_logits(logits, SamplingParams(temperature=2.0)), logits / 2)


def test_sampling_follows_the_distribution_and_the_seed():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log()[None].repeat(4000, 1)
    gens = make_generators(5, 4000, torch.device("cpu"))
    tokens = sample_next(logits, SamplingParams(), generators=gens)
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)
    again = sample_next(logits, SamplingParams(), generators=make_generators(5, 4000, torch.device("cpu")))
    assert torch.equal(tokens, again)
    # Row i with seed s + i draws what row 0 draws with seed s + i.
    row7 = sample_next(logits[:1], SamplingParams(), generators=make_generators(12, 1, torch.device("cpu")))
    assert row7.item() == tokens[7].item()
    with pytest.raises(ValueError, match="one random stream per row"):
        sample_next(logits[:2], SamplingParams())
    # Each draw advances the row's stream: a second draw differs, and is reproducible.
    second = sample_next(logits, SamplingParams(), generators=gens)
    assert not torch.equal(second, tokens)
    gens2 = make_generators(5, 4000, torch.device("cpu"))
    sample_next(logits, SamplingParams(), generators=gens2)
    assert torch.equal(sample_next(logits, SamplingParams(), generators=gens2), second)


def test_random_streams_are_uniform_and_independent():
    gens = make_generators(1000, 50, torch.device("cpu"))
    noise = gens.exponential(20000)
    assert gens.draws.tolist() == [1] * 50 and bool((noise > 0).all()) and bool(torch.isfinite(noise).all())
    uniform = torch.exp(-noise)
    # Uniform: each of 10 bins holds 10% of the values (binomial sd 0.07% per row).
    bins = torch.stack([torch.histc(row, 10, 0, 1) for row in uniform]) / 20000
    assert torch.allclose(bins, torch.full_like(bins, 0.1), atol=0.01)
    # Rows (adjacent seeds) and successive draws are uncorrelated (sd of a correlation: 1/sqrt(20000) = 0.007).
    both = torch.cat([uniform, torch.exp(-gens.exponential(20000))])
    corr = torch.corrcoef(both)
    assert corr[~torch.eye(100, dtype=torch.bool)].abs().max() < 0.05


def test_generators_from_seeds():
    cpu = torch.device("cpu")
    assert make_generators([3, 9], 2, cpu).seeds.tolist() == [3, 9]
    torch.manual_seed(1)
    b = make_generators(None, 2, cpu).seeds.tolist()
    torch.manual_seed(1)
    assert b == make_generators(None, 2, cpu).seeds.tolist()
    with pytest.raises(ValueError, match=r"seeds must be in \[0, 2\*\*62\)"):
        make_generators(-1, 2, cpu)
    with pytest.raises(ValueError, match="seed has 1 values for 2 prompts"):
        make_generators([1], 2, cpu)
    with pytest.raises(TypeError, match="seed must be an int"):
        make_generators(1.5, 2, cpu)


@pytest.mark.parametrize("kw, message", [
    ({"temperature": -1.0}, "temperature must be a number >= 0"),
    ({"top_k": -2}, "top_k must be an int >= 0"),
    ({"top_k": 1.5}, "top_k must be an int >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"min_p": -0.1}, r"min_p must be in \[0, 1\]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be a number > 0"),
    ({"temperature": float("nan")}, "temperature must be a number"),
])
def test_invalid_params(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)


def test_rows_with_their_own_settings_pick_what_each_picks_alone():
    """sample_rows: every row of a mixed batch gets the token sample_next gives it alone (same stream),
    whatever the other rows' settings make the step compute."""
    from ssmkit.generation.sampling import RowSampling, SamplingKinds, sample_rows

    settings = [SamplingParams(temperature=0), SamplingParams(), SamplingParams(temperature=0.7, top_k=5),
                SamplingParams(top_p=0.8), SamplingParams(temperature=1.3, min_p=0.05, repetition_penalty=1.4),
                SamplingParams(temperature=0, repetition_penalty=2.0), SamplingParams(top_k=3, top_p=0.5)]
    torch.manual_seed(0)
    vocab = 50
    cpu = torch.device("cpu")
    for trial in range(20):
        logits = torch.randn(len(settings), vocab) * 3
        seen = torch.rand(len(settings), vocab) < 0.3
        rows = RowSampling.empty(len(settings), cpu)
        for i, p in enumerate(settings):
            rows.set_row(i, p)
        rows.kinds = SamplingKinds.of(settings)
        gens = make_generators([100 + i for i in range(len(settings))], len(settings), cpu)
        gens.draws.fill_(trial)
        batched = sample_rows(logits, rows, seen=seen, generators=gens)
        assert gens.draws.tolist() == [trial + 1] * len(settings)
        for i, p in enumerate(settings):
            alone = make_generators(100 + i, 1, cpu)
            alone.draws.fill_(trial)
            penalty_seen = seen[i:i + 1] if p.repetition_penalty != 1.0 else None
            assert sample_next(logits[i:i + 1], p, seen=penalty_seen, generators=alone).item() == batched[i].item()
    kinds = SamplingKinds.of([SamplingParams(temperature=0, top_k=4)])
    assert not kinds.sample and not kinds.top_k and kinds.greedy  # a greedy row filters nothing
