import pytest
import torch

from ssmkit.models import LanguageModel, ModelConfig, get_preset, list_presets
from ssmkit.models.presets import BYTE_EOS, BYTE_VOCAB_SIZE


def n_params(cfg: ModelConfig) -> int:
    model = LanguageModel(cfg, device="meta")
    return sum(p.numel() for p in model.parameters())


def test_registry():
    names = list_presets()
    for name in ("mamba-130m", "mamba2-130m", "byte-small", "debug-mamba", "debug-mamba2"):
        assert name in names
    assert get_preset("mamba-130m") is not get_preset("mamba-130m")
    with pytest.raises(ValueError, match="unknown preset 'mamba-7b'; available: .*mamba-130m"):
        get_preset("mamba-7b")


def test_public_shapes():
    m1 = get_preset("mamba-130m")
    assert (m1.d_model, m1.n_layer, m1.padded_vocab_size, m1.layer_pattern) == (768, 24, 50280, "M")
    # state-spaces/mamba-130m has 129,135,360 parameters (tied head).
    assert n_params(m1) == 129_135_360
    m2 = get_preset("mamba2-130m")
    assert (m2.d_model, m2.n_layer, m2.padded_vocab_size, m2.layer_pattern) == (768, 24, 50288, "2")
    assert (m2.mamba2.headdim, m2.mamba2.d_state, m2.mamba2.ngroups) == (64, 128, 1)
    per_layer = 768 * (2 * 1536 + 2 * 128 + 24) + (1536 + 256) * 5 + 3 * 24 + 1536 + 1536 * 768 + 768
    assert n_params(m2) == 50288 * 768 + 768 + 24 * per_layer


def test_mamba3_130m_is_mamba_ssm_default_mamba3_at_mamba2_130m_size():
    cfg = get_preset("mamba3-130m")
    assert (cfg.d_model, cfg.n_layer, cfg.padded_vocab_size, cfg.layer_pattern) == (768, 24, 50288, "3")
    m3 = cfg.mamba3
    assert (m3.headdim, m3.d_state, m3.ngroups, m3.rope_fraction, m3.chunk_size) == (64, 128, 1, 0.5, 64)
    assert not m3.is_mimo and not m3.is_outproj_norm
    # mamba_ssm's Mamba3: in_proj to z, x (2 x 1536), B, C (2 x 128), dd_dt, dd_A, trap (3 x 24 heads) and
    # 32 rotary angles; dt_bias and D per head; B and C biases (24 x 128 each) and norms (128 each).
    per_layer = 768 * (2 * 1536 + 2 * 128 + 3 * 24 + 32) + 2 * 24 + 2 * 24 * 128 + 2 * 128 + 1536 * 768 + 768
    assert n_params(cfg) == 50288 * 768 + 768 + 24 * per_layer
    assert 0.9 < n_params(cfg) / n_params(get_preset("mamba2-130m")) < 1.1


def test_byte_small_is_a_few_million_parameters():
    cfg = get_preset("byte-small")
    assert cfg.vocab_size == BYTE_VOCAB_SIZE == 259 and BYTE_EOS == 258
    assert 2e6 < n_params(cfg) < 6e6


@pytest.mark.parametrize("name", [n for n in list_presets() if n.startswith("debug")])
def test_debug_presets_are_tiny_and_run(name):
    cfg = get_preset(name)
    model = LanguageModel(cfg)
    assert n_params(cfg) < 100_000
    out = model(torch.randint(0, cfg.vocab_size, (2, 20)))
    assert out.logits.shape == (2, 20, cfg.padded_vocab_size)
