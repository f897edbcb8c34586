import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.data import (IGNORE, BatchLoader, BucketedRows, ByteTokenizer, DataConfig, Document, EvalSet, PackedRows,
                         encode_documents, eval_batches, waste)
from ssmkit.models import LanguageModel, get_preset
from ssmkit.testing import assert_close

TOK = ByteTokenizer()


def _docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [Document(f"d{i}", bytes(rng.integers(32, 127, n).astype(np.uint8))) for i, n in enumerate(lengths)]


def _scored(rows):
    """(input token, label) pairs of every scored position, in row order."""
    batch = rows.batch(np.arange(len(rows)))
    keep = batch.targets != IGNORE
    return batch, list(zip(batch.input_ids[keep].tolist(), batch.targets[keep].tolist()))


def test_encode_documents_frames_each_document():
    stream = encode_documents(_docs([3, 0, 2]), TOK)
    assert stream.starts.tolist() == [0, 5, 7, 11]
    assert stream.tokens[[0, 4, 5, 6, 7, 10]].tolist() == [TOK.bos_id, TOK.eos_id] * 3
    assert stream.n_bytes == 5


@given(st.lists(st.integers(0, 40), min_size=1, max_size=8), st.integers(2, 17))
def test_packing_scores_every_token_once_and_never_across_documents(lengths, seq_len):
    docs = _docs(lengths)
    stream = encode_documents(docs, TOK)
    rows = PackedRows(stream, seq_len)
    batch, pairs = _scored(rows)
    # Every token but each document's bos is predicted exactly once, from the token before it.
    expected = []
    for d in docs:
        framed = [TOK.bos_id, *d.data, TOK.eos_id]
        expected += list(zip(framed[:-1], framed[1:]))
    assert pairs == expected
    assert batch.input_ids.shape == (len(rows), min(seq_len, len(stream.tokens) - 1))
    # seq_idx starts at 0 in each row and steps up exactly at each document start.
    for r in range(len(rows)):
        n = int(rows.row_lengths[r])
        idx, ids = batch.seq_idx[r, :n], batch.input_ids[r, :n]
        assert idx[0] == 0
        steps = (idx[1:] - idx[:-1]).tolist()
        assert set(steps) <= {0, 1}
        assert [i + 1 for i, s in enumerate(steps) if s] == [i for i in range(1, n) if ids[i] == TOK.bos_id]
        assert (batch.targets[r, n:] == IGNORE).all() and (batch.input_ids[r, n:] == TOK.pad_id).all()
    assert rows.padding_waste(4) < 1 / len(rows) + 1e-12


@pytest.mark.parametrize("preset", ["debug-mamba", "debug-mamba2"])
def test_packed_row_logits_equal_each_document_alone(preset):
    """The packing contract: a model never carries state or convolution across documents of a row."""
    config = get_preset(preset)
    config.vocab_size = TOK.vocab_size
    model = LanguageModel(config).double().eval()
    docs = _docs([7, 1, 30, 12], seed=1)
    rows = PackedRows(encode_documents(docs, TOK), seq_len=60)
    assert len(rows) == 1
    batch = rows.batch(np.array([0]))
    with torch.no_grad():
        packed = model(batch.input_ids, seq_idx=batch.seq_idx).logits[0]
        without = model(batch.input_ids).logits[0]
        for k in range(len(docs)):
            where = (batch.seq_idx[0] == k).nonzero().flatten()
            alone = model(batch.input_ids[:, where]).logits[0]
            assert_close(packed[where], alone, name=f"{preset} document {k}")
    # Without seq_idx the later documents do see the earlier ones: the test can tell the difference.
    last = (batch.seq_idx[0] == len(docs) - 1).nonzero().flatten()
    assert (packed[last] - without[last]).abs().max() > 1e-6


def test_waste_by_hand():
    lengths = np.array([5, 2, 3, 2])
    # In order: [5, 2] -> 10 computed, [3, 2] -> 6; 12 real of 16.
    assert waste(lengths, 2, sort=False) == pytest.approx(1 - 12 / 16)
    # Sorted: [5, 3] -> 10, [2, 2] -> 4; 12 real of 14.
    assert waste(lengths, 2, sort=True) == pytest.approx(1 - 12 / 14)
    assert waste(np.array([], dtype=np.int64), 4, sort=True) == 0.0


def test_bucketing_rows_batches_and_waste():
    # Documents of 4, 1 and 9 bytes are 6, 3 and 11 tokens framed; 5, 2 and 10 scored positions.
    stream = encode_documents(_docs([4, 1, 9]), TOK)
    rows = BucketedRows(stream, seq_len=6)
    assert sorted(rows.row_lengths.tolist()) == [2, 4, 5, 6]  # the 9-byte document is cut into 6 + 4
    assert rows.padding_waste(2) == pytest.approx(1 - 17 / (6 * 2 + 4 * 2))
    batches = rows.units(2)
    assert [rows.row_lengths[b].tolist() for b in batches] == [[6, 5], [4, 2]]
    batch = rows.batch(batches[1])
    assert batch.seq_idx is None and batch.input_ids.shape == (2, 4) and batch.n_tokens == 6
    assert (batch.targets[1, 2:] == IGNORE).all() and (batch.targets[0] != IGNORE).all()
    # Both batchings score exactly the same (input, label) pairs.
    _, packed_pairs = _scored(PackedRows(stream, 6))
    bucket_batch = rows.batch(np.arange(len(rows)))
    keep = bucket_batch.targets != IGNORE
    bucket_pairs = list(zip(bucket_batch.input_ids[keep].tolist(), bucket_batch.targets[keep].tolist()))
    assert sorted(bucket_pairs) == sorted(packed_pairs)


def test_loader_order_is_seeded_resumable_and_split_across_ranks():
    rows = PackedRows(encode_documents(_docs([50] * 20), TOK), seq_len=8)
    steps = 2 * len(rows) // 4 + 3  # crosses epoch boundaries

    def run(loader, n):
        return [torch.cat([b.input_ids for b in loader.next()]) for _ in range(n)]

    full = run(BatchLoader(rows, 4, seed=3), steps)
    assert not torch.equal(full[0], run(BatchLoader(rows, 4, seed=4), 1)[0])
    resumed = BatchLoader(rows, 4, seed=3)
    run(resumed, 7)
    state = resumed.state_dict()
    again = BatchLoader(rows, 4, seed=3)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(run(again, steps - 7), full[7:]))
    ranks = [BatchLoader(rows, 4, seed=3, rank=r, world_size=2, micro_batches=2) for r in range(2)]
    for expected in full[:5]:
        parts = [ranks[r].next() for r in range(2)]
        assert all(len(p) == 2 and p[0].input_ids.shape[0] == 1 for p in parts)
        assert torch.equal(torch.cat([b.input_ids for p in parts for b in p]), expected)


def test_loader_errors_name_the_setting():
    rows = PackedRows(encode_documents(_docs([10]), TOK), seq_len=4)
    with pytest.raises(ValueError, match="multiple of world size"):
        BatchLoader(rows, 3, seed=0, world_size=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchLoader(rows, 64, seed=0)
    loader = BatchLoader(rows, 1, seed=0)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="does not fit this data"):
        BatchLoader(rows, 1, seed=1).load_state_dict(state)


def test_eval_batches_cover_every_row_once_with_equal_counts_per_rank():
    rows = PackedRows(encode_documents(_docs([30] * 7), TOK), seq_len=8)  # 28 rows -> 10 batches of 3
    per_rank = [list(eval_batches(rows, np.arange(len(rows)), 3, rank=r, world_size=4)) for r in range(4)]
    assert {len(p) for p in per_rank} == {3}
    counted = [tuple(row) for p in per_rank for b, c in p if c for row in b.input_ids.tolist()]
    everything = [tuple(rows.batch(np.array([r])).input_ids[0].tolist()) for r in range(len(rows))]
    assert sorted(counted) == sorted(everything)


@pytest.mark.parametrize("batching", ["pack", "bucket"])
def test_eval_set_bytes_are_exact_in_full_and_rows_spread_under_a_budget(batching):
    stream = encode_documents(_docs([40, 3, 77, 20, 5]), TOK)
    config = DataConfig(seq_len=8, batching=batching)
    full = EvalSet.build(stream, config, 0)
    targets = sum(b.n_targets for b, _ in eval_batches(full.rows, full.index, 4))
    assert targets * full.bytes_per_target == pytest.approx(stream.n_bytes)
    capped = EvalSet.build(stream, config, 24)
    assert len(capped.index) == 3 and capped.index[0] == 0 and capped.index[-1] == len(full.rows) - 1
