import dataclasses
import json
import math

import pytest

from ssmkit.models import LayerSpec, Mamba2Config, MambaConfig, ModelConfig, get_preset, list_presets


def tiny(**kw):
    return ModelConfig(**({"vocab_size": 100, "d_model": 32, "n_layer": 3} | kw))


@pytest.mark.parametrize("name", list_presets())
def test_presets_round_trip_through_json(name):
    cfg = get_preset(name)
    text = json.dumps(cfg.to_dict())
    assert ModelConfig.from_dict(json.loads(text)) == cfg


def test_infinity_is_written_as_a_string_and_read_back():
    cfg = tiny(layer_pattern="2", mamba2=Mamba2Config(headdim=16, dt_limit=(0.0, math.inf)))
    data = cfg.to_dict()
    assert data["mamba2"]["dt_limit"] == [0.0, "inf"]
    json.dumps(data, allow_nan=False)
    assert ModelConfig.from_dict(data).mamba2.dt_limit == (0.0, math.inf)


def test_save_and_load_file(tmp_path):
    cfg = tiny(layer_pattern="M2", mamba=MambaConfig(dt_rank=5, mixer_rms_eps=1e-6),
               mamba2=Mamba2Config(headdim=16, ngroups=2, A_init_range=(2.0, 8.0)), tie_embeddings=False)
    cfg.save(tmp_path / "cfg" / "config.json")
    assert ModelConfig.load(tmp_path / "cfg" / "config.json") == cfg
    assert [p.name for p in (tmp_path / "cfg").iterdir()] == ["config.json"]


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        ModelConfig.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"vocab_size": 10, ')
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON"):
        ModelConfig.load(bad)
    bad.write_text(json.dumps({"vocab_size": 10, "d_model": 8, "n_layer": 1, "colour": "red"}))
    with pytest.raises(ValueError, match=r"bad.json: unknown config key\(s\): colour"):
        ModelConfig.load(bad)


def test_unknown_keys_at_any_level_are_named():
    data = tiny().to_dict()
    data["mamba2"]["headdm"] = 64
    data["mamba"]["extra_thing"] = 1
    with pytest.raises(ValueError, match=r"unknown config key\(s\): mamba\.extra_thing"):
        ModelConfig.from_dict(data)
    del data["mamba"]["extra_thing"]
    with pytest.raises(ValueError, match=r"mamba2\.headdm \(did you mean 'headdim'\?\)"):
        ModelConfig.from_dict(data)
    with pytest.raises(ValueError, match=r"unknown config key\(s\): n_layers \(did you mean 'n_layer'\?\)"):
        ModelConfig.from_dict({"vocab_size": 1, "d_model": 8, "n_layers": 2})


def test_missing_keys_and_wrong_types_are_named():
    with pytest.raises(ValueError, match="missing required config key\\(s\\): n_layer"):
        ModelConfig.from_dict({"vocab_size": 10, "d_model": 8})
    with pytest.raises(ValueError, match="d_model must be an int, got '32'"):
        ModelConfig.from_dict({"vocab_size": 10, "d_model": "32", "n_layer": 1})
    with pytest.raises(ValueError, match="tie_embeddings must be a bool, got 1"):
        ModelConfig.from_dict({"vocab_size": 10, "d_model": 8, "n_layer": 1, "tie_embeddings": 1})
    with pytest.raises(ValueError, match="mamba.dt_rank must be an int or 'auto', got 'big'"):
        ModelConfig.from_dict({"vocab_size": 10, "d_model": 8, "n_layer": 1, "mamba": {"dt_rank": "big"}})
    with pytest.raises(ValueError, match="mamba2.dt_limit must be a list of 2 numbers"):
        ModelConfig.from_dict({"vocab_size": 10, "d_model": 8, "n_layer": 1, "mamba2": {"dt_limit": [0.0]}})
    with pytest.raises(ValueError, match="mamba must be a JSON object"):
        ModelConfig.from_dict({"vocab_size": 10, "d_model": 8, "n_layer": 1, "mamba": 3})


@pytest.mark.parametrize("kw, message", [
    ({"d_model": 0}, "d_model must be > 0"),
    ({"vocab_size": -1}, "vocab_size must be > 0"),
    ({"norm_eps": 0.0}, "norm_eps must be > 0"),
    ({"layer_pattern": "2", "mamba2": Mamba2Config(headdim=48)}, r"headdim=48 must divide d_inner = expand \* d_model"),
    ({"layer_pattern": "2", "mamba2": Mamba2Config(headdim=16, ngroups=3)}, "ngroups=3 must divide the number of heads"),
    ({"layer_pattern": "2", "mamba2": Mamba2Config(headdim=16, dt_limit=(0.5, 0.1))}, "dt_limit"),
    ({"layer_pattern": "2", "mamba2": Mamba2Config(headdim=16, A_init_range=(0.0, 1.0))}, "A_init_range"),
    ({"mamba": MambaConfig(dt_min=0.2, dt_max=0.1)}, "dt_min / dt_max"),
    ({"mamba": MambaConfig(d_state=0)}, "mamba.d_state must be > 0"),
    ({"mamba": MambaConfig(dt_init="zero")}, "mamba.dt_init must be 'random' or 'constant'"),
    ({"layer_pattern": "MX"}, "unknown mixer letter 'X' at position 1"),
    ({"layer_pattern": "Ma"}, "unknown feed-forward letter 'a'"),
    ({"layer_pattern": "Mz"}, "unknown feed-forward letter 'z'"),
    ({"layer_pattern": "mM"}, "unknown mixer letter 'm' at position 0"),
    ({"layer_pattern": ""}, "non-empty string"),
    ({"layer_pattern": "MMMM"}, "describes 4 layers but n_layer is 3"),
])
def test_invalid_values_raise_clear_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kw)


def test_unused_mixer_settings_are_not_validated():
    # headdim 48 does not divide d_inner 64, but no layer is Mamba-2.
    cfg = tiny(layer_pattern="M", mamba2=Mamba2Config(headdim=48))
    assert cfg.layer_specs() == [LayerSpec("mamba", None)] * 3


def test_layer_pattern_repeats_to_n_layer():
    cfg = tiny(n_layer=5, layer_pattern="M2", mamba2=Mamba2Config(headdim=16))
    assert [s.mixer for s in cfg.layer_specs()] == ["mamba", "mamba2", "mamba", "mamba2", "mamba"]


def test_padded_vocab_size():
    assert tiny(vocab_size=50277).padded_vocab_size == 50280
    assert tiny(vocab_size=50280).padded_vocab_size == 50280
    assert tiny(vocab_size=259, pad_vocab_size_multiple=1).padded_vocab_size == 259


def test_multipliers_and_softmax_scale_round_trip_and_are_checked():
    """Granite-4.0's settings: multipliers, attention.softmax_scale and the MoE's top-k softmax and shared
    expert survive JSON; configs written before them take the old function (all 1, None, "all", 0)."""
    from ssmkit.models.config import AttentionConfig, MoEConfig

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, layer_pattern="2eAe", embedding_multiplier=12.0,
                      residual_multiplier=0.22, logits_multiplier=1 / 6, attention=AttentionConfig(softmax_scale=0.125),
                      moe=MoEConfig(router_softmax="top_k", shared_d_intermediate=24))
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.moe.router_softmax == "top_k" and again.attention.softmax_scale == 0.125
    old = cfg.to_dict()
    for key in ("embedding_multiplier", "residual_multiplier", "logits_multiplier"):
        del old[key]
    del old["attention"]["softmax_scale"], old["moe"]["router_softmax"], old["moe"]["shared_d_intermediate"]
    legacy = ModelConfig.from_dict(old)
    assert (legacy.embedding_multiplier, legacy.residual_multiplier, legacy.logits_multiplier) == (1.0, 1.0, 1.0)
    assert (legacy.attention.softmax_scale, legacy.moe.router_softmax, legacy.moe.shared_d_intermediate) == (
        None, "all", 0)
    for bad, match in (({"residual_multiplier": math.nan}, "residual_multiplier"),
                       ({"logits_multiplier": math.inf}, "logits_multiplier"),
                       ({"attention": AttentionConfig(softmax_scale=-1.0)}, "softmax_scale"),
                       ({"moe": MoEConfig(router_softmax="sigmoid")}, "router_softmax"),
                       ({"moe": MoEConfig(shared_d_intermediate=-2)}, "shared_d_intermediate")):
        with pytest.raises(ValueError, match=match):
            ModelConfig.from_dict({**cfg.to_dict(), **{k: v if not hasattr(v, "__dataclass_fields__") else
                                                        dataclasses.asdict(v) for k, v in bad.items()}})
