import math

import pytest
import torch
import torch.nn.functional as F

from ssmkit.models import LanguageModel, ModelConfig, get_preset, no_weight_decay_param_names, param_groups
from ssmkit.testing import assert_close

PRESETS = ["debug-mamba", "debug-mamba2", "debug-hybrid"]


def model_for(name, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    cfg = get_preset(name)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = LanguageModel(cfg).to(dtype)
    # Stronger Δ and convolutions than the init, so that state carried across calls matters.
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if name_.endswith(("dt_bias", "dt_proj.bias")):
                p.add_(2.0)
            elif name_.endswith("conv1d.weight"):
                p.mul_(3.0)
    return model


@pytest.mark.parametrize("name", PRESETS)
def test_prefill_then_decode_equals_full_forward(name):
    model = model_for(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 23))
    full = model(ids).logits
    cache = model.allocate_cache(2)
    parts = [model(ids[:, :15], cache=cache).logits]
    parts += [model(ids[:, t:t + 1], cache=cache).logits for t in range(15, 23)]
    assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=0, name="prefill + decode")
    assert cache.seqlen_offset == 23


@pytest.mark.parametrize("name", PRESETS)
def test_multi_token_steps_from_an_existing_state(name):
    model = model_for(name, torch.float64)
    ids = torch.randint(0, model.config.vocab_size, (2, 30))
    full = model(ids).logits
    cache = model.allocate_cache(2)
    parts = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 7), (7, 8), (8, 19), (19, 21), (21, 30))]
    assert_close(torch.cat(parts, 1), full, name="chunks with a cache")


@pytest.mark.parametrize("name", PRESETS)
def test_packed_documents_equal_documents_alone(name):
    model = model_for(name, torch.float64)
    a, b = torch.randint(0, 60, (1, 18)), torch.randint(0, 60, (1, 5))
    seq_idx = torch.tensor([[0] * 18 + [1] * 5])
    out = model(torch.cat([a, b], 1), seq_idx=seq_idx).logits
    assert_close(out[:, :18], model(a).logits, name="first document")
    assert_close(out[:, 18:], model(b).logits, name="second document")


def test_loss_is_shifted_mean_cross_entropy_with_ignore_index():
    model = model_for("debug-mamba2")
    ids = torch.randint(0, 64, (2, 12))
    labels = ids.clone()
    labels[0, 5:8] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    assert_close(out.loss, expected, name="loss")
    assert out.loss.shape == ()
    out.loss.backward()
    assert model.embedding.weight.grad is not None


def test_loss_does_not_cross_document_boundaries():
    model = model_for("debug-mamba")
    ids = torch.randint(0, 64, (1, 10))
    seq_idx = torch.tensor([[0] * 6 + [1] * 4])
    packed = model(ids, labels=ids, seq_idx=seq_idx)
    labels = ids.clone()
    labels[0, 6] = -100
    assert_close(packed.loss, model(ids, labels=labels, seq_idx=seq_idx).loss, name="boundary target dropped")
    assert math.isnan(model(ids[:, :1], labels=ids[:, :1]).loss.item())


def test_state_dict_names_follow_the_contract():
    tied = LanguageModel(get_preset("debug-hybrid"))
    names = set(tied.state_dict())
    assert "embedding.weight" in names and "norm_f.weight" in names and "lm_head.weight" not in names
    assert {"layers.0.norm.weight", "layers.0.mixer.x_proj.weight", "layers.0.mixer.dt_proj.bias",
            "layers.1.mixer.dt_bias", "layers.1.mixer.norm.weight", "layers.1.mixer.in_proj.weight"} <= names
    assert tied.head_weight is tied.embedding.weight
    cfg = get_preset("debug-mamba")
    cfg.tie_embeddings = False
    untied = LanguageModel(cfg)
    assert "lm_head.weight" in untied.state_dict()
    assert untied.head_weight.data_ptr() != untied.embedding.weight.data_ptr()


def test_initialisation_rescales_out_proj_and_zeroes_biases():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layer=16, layer_pattern="M")
    cfg.mamba.bias = True
    model = LanguageModel(cfg)
    out_proj = model.layers[3].mixer.out_proj
    # kaiming_uniform(a=√5) on fan_in 128 has bound 1/√128; rescaled by 1/√16.
    bound = 1 / math.sqrt(128) / 4
    assert out_proj.weight.abs().max() <= bound and out_proj.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(out_proj.bias) == 0 and torch.count_nonzero(model.layers[0].mixer.in_proj.bias) == 0
    assert torch.count_nonzero(model.layers[0].mixer.dt_proj.bias) == 128
    assert abs(model.embedding.weight.std().item() - 0.02) < 0.002


def test_no_weight_decay_groups():
    model = LanguageModel(get_preset("debug-hybrid"))
    skip = no_weight_decay_param_names(model)
    assert {"layers.0.mixer.A_log", "layers.0.mixer.D", "layers.0.mixer.dt_proj.bias", "layers.1.mixer.dt_bias",
            "layers.1.mixer.A_log", "layers.1.mixer.norm.weight", "layers.0.norm.weight", "norm_f.weight",
            "layers.0.mixer.conv1d.bias"} <= skip
    assert "layers.0.mixer.in_proj.weight" not in skip and "embedding.weight" not in skip
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_bfloat16_model_runs_with_float32_states():
    model = model_for("debug-hybrid", torch.bfloat16)
    ids = torch.randint(0, 61, (2, 9))
    full = model(ids).logits
    assert full.dtype == torch.bfloat16
    cache = model.allocate_cache(2)
    assert all(s.ssm.dtype == torch.float32 and s.conv.dtype == torch.bfloat16 for s in cache.states)
    steps = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(9)], 1)
    assert_close(steps, full, torch.bfloat16, name="bf16 decode")


def test_logits_to_keep():
    model = model_for("debug-mamba2")
    ids = torch.randint(0, 64, (2, 10))
    assert_close(model(ids, logits_to_keep=3).logits, model(ids).logits[:, -3:], name="last logits")
    with pytest.raises(ValueError, match="do not pass logits_to_keep with labels"):
        model(ids, labels=ids, logits_to_keep=1)
    with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
        model(ids, logits_to_keep=-1)


def test_bad_inputs_raise_clear_errors():
    model = LanguageModel(get_preset("debug-hybrid"))
    ids = torch.randint(0, 61, (2, 5))
    with pytest.raises(ValueError, match=r"outside \[0, 61\) \(vocab_size\): min 0, max 61"):
        model(torch.tensor([[0, 61]]))
    with pytest.raises(ValueError, match="min -1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="input_ids must be an integer tensor .* got torch.float32"):
        model(ids.float())
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor"):
        model([[1, 2]])
    with pytest.raises(ValueError, match="input_ids is empty"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids is empty"):
        model(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(batch, length\)"):
        model(ids[0])
    with pytest.raises(ValueError, match=r"seq_idx must have the shape of input_ids \(2, 5\), got \(2, 4\)"):
        model(ids, seq_idx=torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="seq_idx must be an integer tensor"):
        model(ids, seq_idx=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        model(ids, labels=ids[:, :3])
    with pytest.raises(ValueError, match=r"labels must be token ids in \[0, 61\) or -100, got 70"):
        model(ids, labels=torch.full_like(ids, 70))
    with pytest.raises(ValueError, match="cache was allocated for batch size 3, input_ids has 2"):
        model(ids, cache=model.allocate_cache(3))
    other = LanguageModel(get_preset("debug-mamba")).allocate_cache(2)
    with pytest.raises(ValueError, match="cache has 2 layer states, the model has 3 layers"):
        model(ids, cache=other)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        model.allocate_cache(0)
