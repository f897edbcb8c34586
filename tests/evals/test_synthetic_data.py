"""The synthetic task generators: shapes, answers checked against an independent solver, seeds."""

import pytest
import torch

from ssmkit.data.synthetic import (
    IGNORE,
    NEEDLE_QUESTION,
    induction_heads,
    mqar,
    needle_batch,
    needle_prompt,
    selective_copying,
    selective_copying_vocab,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _same(a, b):
    return torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)


@pytest.mark.parametrize("seq_len,n_memorize,n_values", [(32, 4, 4), (100, 16, 16), (16, 16, 3)])
def test_selective_copying_answers_are_the_data_tokens_in_order(seq_len, n_memorize, n_values):
    b = selective_copying(6, seq_len, n_memorize, n_values, generator=_gen(0))
    assert b.inputs.shape == b.targets.shape == (6, seq_len + n_memorize)
    assert b.inputs.dtype == b.targets.dtype == torch.long
    assert int(b.inputs.max()) < selective_copying_vocab(n_values)
    marker = n_values + 1
    for row_in, row_t in zip(b.inputs.tolist(), b.targets.tolist()):
        context = row_in[:seq_len]
        # Solver: the non-noise tokens of the context, in order, are what the markers ask for.
        data = [t for t in context if t != 0]
        assert len(data) == n_memorize and all(1 <= t <= n_values for t in data)
        assert row_in[seq_len:] == [marker] * n_memorize
        assert row_t[:seq_len] == [IGNORE] * seq_len and row_t[seq_len:] == data
    assert b.n_scored == 6 * n_memorize


def test_selective_copying_positions_vary_and_seeds_fix_batches():
    a, b, c = (selective_copying(8, 64, 8, 8, generator=_gen(s)) for s in (1, 1, 2))
    assert _same(a, b) and not _same(a, c)
    positions = {tuple((row[:64] != 0).nonzero().flatten().tolist()) for row in a.inputs}
    assert len(positions) == 8


def test_induction_heads_answer_follows_the_first_trigger():
    vocab, length = 16, 50
    b = induction_heads(32, length, vocab, generator=_gen(3))
    assert b.inputs.shape == b.targets.shape == (32, length)
    trigger = vocab - 1
    for row_in, row_t in zip(b.inputs.tolist(), b.targets.tolist()):
        hits = [i for i, t in enumerate(row_in) if t == trigger]
        assert len(hits) == 2 and hits[1] == length - 1 and hits[0] <= length - 3
        assert row_t[:-1] == [IGNORE] * (length - 1)
        assert row_t[-1] == row_in[hits[0] + 1] != trigger
    assert _same(b, induction_heads(32, length, vocab, generator=_gen(3)))
    assert not _same(b, induction_heads(32, length, vocab, generator=_gen(4)))


@pytest.mark.parametrize("seq_len,n_kv,vocab", [(256, 64, 8192), (256, 4, 8192), (40, 7, 32)])
def test_mqar_answers_match_a_dictionary_lookup(seq_len, n_kv, vocab):
    b = mqar(5, seq_len, n_kv, vocab, generator=_gen(0))
    assert b.inputs.shape == b.targets.shape == (5, seq_len)
    half = vocab // 2
    for row_in, row_t in zip(b.inputs.tolist(), b.targets.tolist()):
        keys, values = row_in[0:2 * n_kv:2], row_in[1:2 * n_kv:2]
        assert len(set(keys)) == n_kv and all(1 <= k < half for k in keys)
        assert all(half <= v < vocab for v in values)
        table = dict(zip(keys, values))
        scored = [p for p, t in enumerate(row_t) if t != IGNORE]
        assert len(scored) == n_kv and min(scored) >= 2 * n_kv
        assert sorted(row_in[p] for p in scored) == sorted(keys)
        for p in scored:
            assert row_t[p] == table[row_in[p]] == row_in[p + 1]
        # Outside the pairs and the queries the sequence is filler.
        used = set(range(2 * n_kv)) | set(scored) | {p + 1 for p in scored}
        assert all(row_in[p] == 0 for p in range(seq_len) if p not in used)
    assert _same(b, mqar(5, seq_len, n_kv, vocab, generator=_gen(0)))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="seq_len=100 is too short for n_kv=64"):
        mqar(1, 100, 64, 8192)
    with pytest.raises(ValueError, match="fewer than n_kv"):
        mqar(1, 256, 20, 16)
    with pytest.raises(ValueError, match="do not fit"):
        selective_copying(1, 8, 9, 4)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        induction_heads(0, 16, 8)
    with pytest.raises(ValueError, match="seq_len >= 3"):
        induction_heads(1, 2, 8)


HAYSTACK = b"".join(b"line %d of the haystack text\n" % i for i in range(400))


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_prompt_hides_the_pair_and_asks_for_it(depth):
    p = needle_prompt(HAYSTACK, 600, depth, generator=_gen(1))
    assert len(p.prompt) == 600
    assert p.answer.isdigit() and len(p.answer) == 5
    key = p.prompt[p.prompt.rindex(b"code of ") + 8:-4]
    assert p.prompt.endswith(NEEDLE_QUESTION % key)
    line = b"\n# the secret code of " + key + b" is " + p.answer + b"\n"
    assert p.prompt[p.needle_offset:p.needle_offset + len(line)] == line
    assert p.prompt.count(key) == 2
    # Inside the text the needle goes between two lines (not cutting one), near the requested depth.
    text_len = 600 - len(line) - len(NEEDLE_QUESTION % key)
    if 0 < depth < 1:
        assert p.prompt[p.needle_offset - 1:p.needle_offset] == b"\n"
    assert abs(p.needle_offset - depth * text_len) <= 32


def test_needle_batch_scores_the_answer_bytes():
    b = needle_batch(HAYSTACK, 3, 300, 0.5, bos_id=257, generator=_gen(2))
    assert b.inputs.shape == b.targets.shape == (3, 1 + 300 + 4)
    assert (b.inputs[:, 0] == 257).all()
    for row_in, row_t in zip(b.inputs.tolist(), b.targets.tolist()):
        text = bytes(row_in[1:])
        answer = bytes(row_t[-5:])
        assert text[:300].endswith(b" is ") and answer.isdigit()
        assert text[300:] == answer[:-1] and row_t[:-5] == [IGNORE] * (len(row_t) - 5)
        assert b"is " + answer + b"\n" in text[:300]
    assert _same(b, needle_batch(HAYSTACK, 3, 300, 0.5, bos_id=257, generator=_gen(2)))


def test_needle_errors():
    with pytest.raises(ValueError, match="too short for the needle"):
        needle_prompt(HAYSTACK, 20, 0.5)
    with pytest.raises(ValueError, match="haystack has"):
        needle_prompt(b"tiny\n", 200, 0.5)
    with pytest.raises(ValueError, match="depth must be in"):
        needle_prompt(HAYSTACK, 200, 1.5)
