"""The size estimate from a config alone, and the refusal of configs too big to build (issue 19, items 10, 12)."""

import dataclasses
import json
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.models import LanguageModel, ModelConfig, get_preset, list_presets
from ssmkit.layers import registry
from ssmkit.models.config import MAX_CONFIG_INT, MAX_LAYERS
from ssmkit.models.size import (
    LIMIT_ENV,
    ModelTooLargeError,
    check_model_size,
    estimate_size,
)


def _built(config):
    model = LanguageModel(config, device="meta")
    buffers = sum(b.numel() for b in model.buffers())
    return sum(p.numel() for p in model.parameters()), buffers


@pytest.mark.parametrize("name", list_presets())
def test_estimate_is_exact_for_every_preset(name):
    config = get_preset(name)
    if config.n_layer > 64:  # building 100+ layers on meta is slow and adds nothing
        config = dataclasses.replace(config, n_layer=len(config.layer_pattern))
    estimate = estimate_size(config)
    assert (estimate.parameters, estimate.buffers) == _built(config)


MIXER_OPTIONS = {
    "M": st.fixed_dictionaries({"mamba": st.fixed_dictionaries({
        "d_state": st.integers(1, 9), "d_conv": st.integers(1, 5), "expand": st.integers(1, 3),
        "dt_rank": st.sampled_from(["auto", 1, 3]), "conv_bias": st.booleans(), "bias": st.booleans(),
        "inner_layernorms": st.booleans(), "mixer_rms_eps": st.sampled_from([None, 1e-6])})}),
    "2": st.fixed_dictionaries({"mamba2": st.fixed_dictionaries({
        "d_state": st.integers(1, 9), "d_conv": st.integers(1, 5), "expand": st.sampled_from([2, 4]),
        "headdim": st.sampled_from([4, 8]), "ngroups": st.sampled_from([1, 2]), "conv_bias": st.booleans(),
        "bias": st.booleans(), "rmsnorm": st.booleans(), "D_has_hdim": st.booleans(),
        "d_inner": st.sampled_from([None, 48]), "out_proj_bias": st.sampled_from([None, True, False]),
        "in_proj_multipliers": st.sampled_from([[1.0] * 5, [0.5, 1.0, 2.0, 1.0, 0.25]])})}),
    "3": st.fixed_dictionaries({"mamba3": st.fixed_dictionaries({
        "d_state": st.sampled_from([4, 8, 12]), "expand": st.sampled_from([2, 4]), "headdim": st.sampled_from([4, 8]),
        "ngroups": st.sampled_from([1, 2]), "rope_fraction": st.sampled_from([0.5, 1.0]),
        "is_outproj_norm": st.booleans(), "is_mimo": st.booleans(), "mimo_rank": st.integers(1, 3)})}),
    "A": st.fixed_dictionaries({"attention": st.fixed_dictionaries({
        "num_heads": st.sampled_from([2, 4]), "num_heads_kv": st.sampled_from([None, 1, 2]),
        "head_dim": st.sampled_from([None, 6]), "rotary_emb_dim": st.sampled_from([0, 2]), "bias": st.booleans()})}),
    "S": st.fixed_dictionaries({"s4d": st.fixed_dictionaries({"d_state": st.sampled_from([2, 6])})}),
    "4": st.fixed_dictionaries({"s4": st.fixed_dictionaries({
        "d_state": st.sampled_from([2, 6]), "measure": st.sampled_from(["legs", "legt", "fourier"])})}),
    "H": st.fixed_dictionaries({"hyena": st.fixed_dictionaries({
        "order": st.integers(2, 3), "l_max": st.integers(2, 40), "filter_order": st.integers(1, 8),
        "emb_dim": st.sampled_from([3, 5]), "short_filter_order": st.integers(1, 4),
        "num_inner_mlps": st.integers(0, 2)})}),
}
MIXER_OPTIONS["W"] = MIXER_OPTIONS["A"]
# Z layers share the model's transformer blocks (counted once) and read the mamba2 section.
MIXER_OPTIONS["Z"] = st.fixed_dictionaries({
    "shared_transformer": st.fixed_dictionaries({
        "num_blocks": st.integers(1, 3), "num_heads": st.sampled_from([2, 4]),
        "num_heads_kv": st.sampled_from([None, 1, 2]), "head_dim": st.sampled_from([None, 6]),
        "d_intermediate": st.sampled_from([None, 10]), "mlp_bias": st.booleans(), "adapter_rank": st.integers(1, 4),
        "attention_adapters": st.booleans()}),
    "mamba2": st.fixed_dictionaries({"d_state": st.integers(1, 9), "headdim": st.sampled_from([4, 8]),
                                     "bias": st.booleans()})})
MIXER_OPTIONS["F"] = st.fixed_dictionaries({"parallel_hybrid": st.fixed_dictionaries({
    "attention": MIXER_OPTIONS["A"].map(lambda o: o["attention"]),
    "mamba2": MIXER_OPTIONS["2"].map(lambda o: o["mamba2"])})})


def test_every_mixer_letter_has_a_formula_under_test():
    assert set(MIXER_OPTIONS) == {k.letter for k in registry.kinds() if not k.feed_forward}


@given(letter=st.sampled_from(sorted(MIXER_OPTIONS)), data=st.data(), ff=st.sampled_from(["", "m", "e"]),
       n_layer=st.integers(1, 5), vocab=st.integers(1, 40), tie=st.booleans())
def test_estimate_matches_the_built_model_for_every_layer_kind(letter, data, ff, n_layer, vocab, tie):
    options = data.draw(MIXER_OPTIONS[letter])
    raw = {"vocab_size": vocab, "d_model": 24, "n_layer": n_layer, "layer_pattern": letter + ff + "M"[:n_layer > 1],
           "tie_embeddings": tie, "mlp": {"d_intermediate": 10}, "moe": {"num_experts": 3, "d_intermediate": 5},
           **options}
    config = ModelConfig.from_dict(raw)
    estimate = estimate_size(config)
    assert (estimate.parameters, estimate.buffers) == _built(config)


def test_estimate_takes_no_time_and_no_memory_for_absurd_sizes():
    config = ModelConfig(vocab_size=MAX_CONFIG_INT, d_model=2**30, n_layer=MAX_LAYERS, layer_pattern="MmA4SH2e3")
    start = time.perf_counter()
    estimate = estimate_size(config)
    assert time.perf_counter() - start < 1.0
    assert estimate.parameters > 10**23


@pytest.mark.parametrize("kw", [{"n_layer": 400, "d_model": 8192}, {"d_model": 10_000_000, "n_layer": 2},
                                {"vocab_size": 2_000_000_000, "d_model": 64, "n_layer": 1}])
def test_a_model_too_big_for_the_machine_is_refused_before_allocating(kw, monkeypatch):
    monkeypatch.delenv(LIMIT_ENV, raising=False)
    config = ModelConfig(**{"vocab_size": 256, "layer_pattern": "M", **kw})
    allocated = []
    monkeypatch.setattr(torch.nn.Embedding, "__init__", lambda *a, **k: allocated.append(1))
    with pytest.raises(ModelTooLargeError, match=f"more than the memory of the cpu device.*{LIMIT_ENV}"):
        LanguageModel(config)
    assert not allocated


def test_the_limit_can_be_raised_or_lowered(monkeypatch):
    config = get_preset("debug-mamba2")
    nbytes = estimate_size(config).nbytes(torch.float32)
    monkeypatch.setenv(LIMIT_ENV, str(nbytes - 1))
    with pytest.raises(ModelTooLargeError, match=LIMIT_ENV):
        LanguageModel(config)
    monkeypatch.setenv(LIMIT_ENV, f"{nbytes}")
    LanguageModel(config)
    with pytest.raises(ModelTooLargeError, match="max_bytes"):
        LanguageModel(config, max_bytes=nbytes // 2)
    monkeypatch.setenv(LIMIT_ENV, "lots")
    with pytest.raises(ValueError, match=f"{LIMIT_ENV}='lots'"):
        LanguageModel(config)
    monkeypatch.delenv(LIMIT_ENV)
    assert check_model_size(config, max_bytes=10**9) == nbytes
    # Shapes on the meta device cost nothing: no limit (ssmkit info of a 52B preset).
    LanguageModel(get_preset("jamba-v0.1"), device="meta")


def test_from_pretrained_checks_the_config_before_reading_weights(tmp_path, monkeypatch):
    monkeypatch.delenv(LIMIT_ENV, raising=False)
    ckpt = tmp_path / "absurd"
    ckpt.mkdir()
    # An ssmkit config of 1.6e11 parameters beside no weights at all: the size error comes first.
    config = ModelConfig(vocab_size=256, d_model=8192, n_layer=400)
    (ckpt / "config.json").write_text(json.dumps({"format": "ssmkit", "format_version": 1,
                                                  "architecture": "LanguageModel", "config": config.to_dict()}))
    with pytest.raises(ModelTooLargeError, match=r"absurd/config\.json: this model would have 168,"):
        LanguageModel.from_pretrained(ckpt)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8192,
                                                "num_hidden_layers": 400, "vocab_size": 50280}))
    with pytest.raises(ModelTooLargeError, match=r"hf/config\.json: this model would have"):
        LanguageModel.from_pretrained(hf)


@pytest.mark.parametrize("raw, message", [
    ({"n_layer": 1_000_000}, "n_layer must be at most 100,000, got 1,000,000"),
    ({"d_model": 2**40}, "d_model must be at most 2,147,483,647"),
    ({"d_model": -3}, "d_model must be > 0"),
    ({"vocab_size": 0}, "vocab_size must be > 0"),
    ({"s4": {"l_max": -1}}, "s4.l_max must be >= 0, got -1"),  # a kind the pattern does not use
    ({"layer_pattern": "4", "s4": {"d_state": 100_000}}, "s4.d_state must be at most 4096"),
    ({"mamba": {"d_state": 2**62}}, "mamba.d_state must be at most"),
    ({"d_model": "x" * 10_000}, "d_model must be an int, got 'xxxx"),
])
def test_config_integers_have_sane_bounds_and_errors_name_the_field(raw, message):
    data = {"vocab_size": 256, "d_model": 64, "n_layer": 2, **raw}
    with pytest.raises(ValueError, match=message) as e:
        ModelConfig.from_dict(data)
    assert len(str(e.value)) < 400


@pytest.mark.parametrize("fields, message", [
    ({"num_hidden_layers": 10**12}, "'num_hidden_layers' = 1000000000000: expected an integer from 1 to 100,000"),
    ({"hidden_size": 10**30}, "'hidden_size'"),
    ({"hidden_size": -5}, "'hidden_size' = -5"),
    ({"state_size": "many"}, "'state_size' = 'many'"),
])
def test_transformers_configs_with_absurd_integers_name_the_field(tmp_path, fields, message):
    from ssmkit.interop import CheckpointError, read_transformers_config

    for model_type in ("mamba", "mamba2", "jamba"):
        if model_type == "jamba" and "state_size" in fields:
            fields = {"mamba_d_state": fields["state_size"]}
            message = "'mamba_d_state' = 'many'"
        folder = tmp_path / model_type
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"model_type": model_type, **fields}))
        with pytest.raises(CheckpointError, match=r"config\.json") as e:
            read_transformers_config(folder)
        assert message.split(":")[0] in str(e.value), (model_type, str(e.value))


def test_the_sequence_classifier_is_checked_too(monkeypatch):
    from ssmkit.models.classifier import SequenceClassifier

    monkeypatch.delenv(LIMIT_ENV, raising=False)
    with pytest.raises(ModelTooLargeError):
        SequenceClassifier(ModelConfig(vocab_size=256, d_model=8192, n_layer=400, layer_pattern="S"), num_classes=2)


def test_weights_larger_than_the_config_implies_are_refused_before_reading(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from ssmkit.models.size import weights_limit

    big, small = get_preset("debug-mamba2"), dataclasses.replace(get_preset("debug-mamba2"), n_layer=1)
    for fmt in ("ssmkit", "transformers"):
        folder = tmp_path / fmt
        LanguageModel(big).save_pretrained(folder, format=fmt)
        weights = folder / "model.safetensors"
        tensors = load_file(weights)
        tensors["padding"] = torch.zeros(weights_limit(small) // 4 + 1)  # more than the small config can fill
        save_file(tensors, str(weights))
        raw = json.loads((folder / "config.json").read_text())
        if fmt == "ssmkit":
            raw["config"]["n_layer"] = 1
        else:
            raw["num_hidden_layers"] = 1
        (folder / "config.json").write_text(json.dumps(raw))
        read = []
        for module in ("ssmkit.models.formats.files", "ssmkit.io.files"):
            monkeypatch.setattr(f"{module}.safe_open", lambda *a, seen=read, **k: seen.append(a))
        with pytest.raises(ValueError, match="more than the config's parameters can fill"):
            LanguageModel.from_pretrained(folder)
        assert not read
        monkeypatch.undo()
