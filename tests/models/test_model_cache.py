import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ssmkit.models import ModelCache
from ssmkit.layers import Mamba2State, MambaState
from ssmkit.models import LanguageModel, get_preset
from ssmkit.testing import assert_close


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LanguageModel(get_preset("debug-hybrid"))


def read(model, ids, cache):
    with torch.no_grad():
        return model(ids, cache=cache).logits


def test_allocated_cache_layout(model):
    cache = model.allocate_cache(3)
    assert [type(s) for s in cache.states] == [MambaState, Mamba2State, MambaState]
    assert cache.batch_size == 3 and cache.seqlen_offset == 0
    assert all(torch.count_nonzero(t) == 0 for s in cache.states for t in s.tensors().values())
    assert "kinds=['mamba', 'mamba2']" in repr(cache)


def test_nbytes_does_not_depend_on_tokens_read(model):
    cache = model.allocate_cache(2)
    empty = cache.nbytes
    # Mamba: conv (2, 64, 4) + ssm (2, 64, 8); Mamba-2: conv (2, 128, 4) + ssm (2, 4, 16, 16); float32.
    assert empty == 4 * 2 * (2 * (64 * 4 + 64 * 8) + 128 * 4 + 4 * 16 * 16)
    read(model, torch.randint(0, 61, (2, 5)), cache)
    assert cache.nbytes == empty
    read(model, torch.randint(0, 61, (2, 300)), cache)
    assert cache.nbytes == empty and cache.seqlen_offset == 305


def test_clone_is_independent(model):
    cache = model.allocate_cache(1)
    read(model, torch.randint(0, 61, (1, 12)), cache)
    fork = cache.clone()
    nxt = torch.randint(0, 61, (1, 3))
    a = read(model, nxt, cache)
    b = read(model, nxt, fork)
    assert torch.equal(a, b)
    read(model, nxt, fork)
    assert not torch.equal(fork.states[0].ssm, cache.states[0].ssm)
    assert (cache.seqlen_offset, fork.seqlen_offset) == (15, 18)
    cache.copy_(fork)
    assert torch.equal(fork.states[1].ssm, cache.states[1].ssm) and cache.seqlen_offset == 18


def test_save_load_round_trip_continues_exactly(model, tmp_path):
    ids = torch.randint(0, 61, (2, 20))
    full = read(model, ids, None)
    cache = model.allocate_cache(2)
    read(model, ids[:, :13], cache)
    cache.save(tmp_path / "doc.cache")
    assert [p.name for p in tmp_path.iterdir()] == ["doc.cache"]
    loaded = ModelCache.load(tmp_path / "doc.cache")
    assert loaded.seqlen_offset == 13 and [s.kind for s in loaded.states] == ["mamba", "mamba2", "mamba"]
    for mine, theirs in zip(cache.states, loaded.states):
        for name, t in mine.tensors().items():
            assert torch.equal(t, getattr(theirs, name)) and t.dtype == getattr(theirs, name).dtype
    rest = read(model, ids[:, 13:], loaded)
    assert_close(rest, full[:, 13:], rtol=1e-5, atol=0, name="continued from a loaded cache")


def test_reset_rows(model):
    cache = model.allocate_cache(2)
    read(model, torch.randint(0, 61, (2, 8)), cache)
    cache.reset_(torch.tensor([False, True]))
    assert all(torch.count_nonzero(t[1]) == 0 and torch.count_nonzero(t[0]) > 0
               for s in cache.states for t in s.tensors().values())
    cache.reset_()
    assert cache.seqlen_offset == 0 and all(torch.count_nonzero(s.ssm) == 0 for s in cache.states)


def test_load_errors_name_the_file(model, tmp_path):
    path = tmp_path / "c.cache"
    model.allocate_cache(1).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"c.cache: not a readable safetensors file"):
        ModelCache.load(path)
    with pytest.raises(FileNotFoundError, match="missing.cache does not exist"):
        ModelCache.load(tmp_path / "missing.cache")
    save_file({"x": torch.zeros(1)}, path, metadata={"format": "something"})
    with pytest.raises(ValueError, match="c.cache: not an ssmkit cache file"):
        ModelCache.load(path)
    model.allocate_cache(1).save(path)
    tensors = load_file(path)
    del tensors["layers.1.ssm"]
    meta = {"format": "ssmkit-cache", "format_version": "1", "kinds": json.dumps(["mamba", "mamba2", "mamba"]),
            "seqlen_offset": "0"}
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match=r"c.cache: missing tensors layers.1.ssm"):
        ModelCache.load(path)
    save_file(tensors, path, metadata=meta | {"kinds": json.dumps(["mamba", "no-such-kind", "mamba"])})
    with pytest.raises(ValueError, match="layer 1 has state kind 'no-such-kind'"):
        ModelCache.load(path)


def test_state_mismatches_are_refused(model):
    with pytest.raises(ValueError, match="disagree on the batch size"):
        ModelCache([MambaState(torch.zeros(1, 2, 4), torch.zeros(1, 2, 3)),
                    MambaState(torch.zeros(2, 2, 4), torch.zeros(2, 2, 3))])
    small = model.allocate_cache(1)
    with pytest.raises(TypeError, match="cannot copy a Mamba2State into a MambaState"):
        small.states[0].copy_(small.states[1])
    bad = ModelCache([MambaState(torch.zeros(1, 64, 3), torch.zeros(1, 64, 8)) for _ in range(2)])
    with pytest.raises(ValueError, match=r"Mamba \(layer 0\): state.conv has shape \(1, 64, 3\), expected \(1, 64, 4"):
        LanguageModel(get_preset("debug-mamba"))(torch.zeros(1, 3, dtype=torch.long), cache=bad)
