"""ssmkit computes what transformers computes, for the same checkpoint, in both directions.

The ground truth is the installed transformers' own modeling code (its torch fallbacks on CPU): random
tiny models of each supported model_type (see hf_models.HF_CONFIGS) are saved with ``save_pretrained``,
loaded with ``LanguageModel.from_pretrained``, and compared on logits (fp32, rel err <= 1e-4) and on 20
greedy tokens. The other direction saves ssmkit models with ``format="transformers"`` and loads them
with ``AutoModelForCausalLM.from_pretrained``.

Two transformers (5.23) bugs shape these tests; both are in its torch code, not in the checkpoints:

- ``from_pretrained`` of a config with ``rescale_prenorm_residual: true`` divides every loaded
  ``out_proj.weight`` by sqrt(num_hidden_layers) (``_init_weights`` rescales in place without the
  "already loaded" guard its ``init.*`` helpers have), so transformers' own save/load round trip changes
  such models. The reference here is the in-memory model that wrote the checkpoint (the "mamba2"
  config sets the flag), and ssmkit always writes the flag as false.
- Its Mamba-2 decode step (``Mamba2Mixer.forward`` with a cache and one token ->
  ``mamba2_selective_state_update``) never applies ``time_step_limit`` (the clamp is only passed to the
  chunked prefill), so with a limit that bites, ``generate()``'s tokens come from a model whose decode
  disagrees with its own forward pass. For that checkpoint ("mamba2_limit") the greedy reference is
  transformers' full forward re-run on the growing sequence (no cache), which applies the limit at
  every position: the math the checkpoint defines.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import transformers
from hf_models import HF_CONFIGS, randomize_

from ssmkit.interop import load_transformers_checkpoint
from ssmkit.models import LanguageModel, Mamba2Config, MambaConfig, ModelConfig
from ssmkit.testing import assert_close, relative_error

LENGTH = 21  # not a multiple of the mamba2 configs' chunk_size (8)
NEW_TOKENS = 20
RTOL = 1e-4


def _ids(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _greedy_without_cache(hf: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    seq = prompt
    for _ in range(new_tokens):
        seq = torch.cat([seq, hf(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return seq[:, prompt.shape[1]:]


@pytest.mark.parametrize("name", list(HF_CONFIGS))
@torch.no_grad()
def test_transformers_checkpoint_logits_and_greedy_tokens(hf_checkpoint, name):
    hf, folder = hf_checkpoint(name)
    model = LanguageModel.from_pretrained(folder).eval()
    vocab = hf.config.vocab_size

    ids = _ids(vocab, 2, LENGTH)
    assert_close(model(ids).logits, hf(ids, use_cache=False).logits, rtol=RTOL, name=f"{name} logits")

    prompt = _ids(vocab, 2, 9, seed=1)
    ours = model.generate(prompt, NEW_TOKENS, temperature=0)[:, prompt.shape[1]:]
    if name == "mamba2_limit":
        expected = _greedy_without_cache(hf, prompt, NEW_TOKENS)  # see the module docstring
    else:
        expected = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[:, prompt.shape[1]:]
    assert expected.shape == (2, NEW_TOKENS)
    assert torch.equal(ours, expected), f"{name}: greedy tokens differ\nssmkit       {ours}\ntransformers {expected}"


@pytest.mark.parametrize(
    "name, field, wrong",
    [
        ("mamba", "norm_eps", 1e-5),
        ("falcon_mamba", "mamba.mixer_rms_eps", None),
        ("mamba2", "norm_eps", 1e-5),
        ("mamba2_limit", "mamba2.dt_limit", (0.0, math.inf)),
    ],
)
@torch.no_grad()
def test_parity_detects_a_mismapped_field(hf_checkpoint, name, field, wrong):
    """The configs above are sensitive: getting one mapped field wrong breaks the 1e-4 parity."""
    hf, folder = hf_checkpoint(name)
    config, state = load_transformers_checkpoint(folder)
    if "." in field:
        sub, leaf = field.split(".")
        config = dataclasses.replace(config, **{sub: dataclasses.replace(getattr(config, sub), **{leaf: wrong})})
    else:
        config = dataclasses.replace(config, **{field: wrong})
    model = LanguageModel(config).eval()
    model.load_state_dict(state)
    ids = _ids(hf.config.vocab_size, 2, LENGTH)
    assert relative_error(model(ids).logits, hf(ids, use_cache=False).logits) > 10 * RTOL


SSMKIT_CONFIGS = {
    "mamba": ModelConfig(
        vocab_size=50, d_model=20, n_layer=3, layer_pattern="M", norm_eps=3e-3, pad_vocab_size_multiple=8,
        mamba=MambaConfig(d_state=5, d_conv=3, dt_rank=3, bias=True),
    ),
    "falcon_mamba": ModelConfig(
        vocab_size=45, d_model=18, n_layer=3, layer_pattern="M", tie_embeddings=False, residual_in_fp32=False,
        mamba=MambaConfig(d_state=6, expand=3, conv_bias=False, mixer_rms_eps=0.05),
    ),
    "mamba2": ModelConfig(
        vocab_size=47, d_model=24, n_layer=3, layer_pattern="2", norm_eps=2e-3, tie_embeddings=False,
        mamba2=Mamba2Config(d_state=6, headdim=8, ngroups=3, chunk_size=8),
    ),
}


@pytest.mark.parametrize("name", list(SSMKIT_CONFIGS))
@torch.no_grad()
def test_ssmkit_model_saved_for_transformers(tmp_path, name):
    model = randomize_(LanguageModel(SSMKIT_CONFIGS[name])).eval()
    folder = tmp_path / "hf"
    model.save_pretrained(folder, format="transformers")

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    hf.eval()
    assert {k: v for k, v in info.items() if v} == {}, f"transformers reported loading problems: {info}"
    assert hf.config.model_type == name and hf.config.rescale_prenorm_residual is False
    ids = _ids(model.config.vocab_size, 2, LENGTH)
    assert_close(model(ids).logits, hf(ids, use_cache=False).logits, rtol=RTOL, name=f"{name} logits")
    # Rows of ssmkit's padded vocabulary are not tokens and ssmkit never samples them; transformers'
    # vocab_size counts them, so they are suppressed on its side.
    padding_rows = list(range(model.config.vocab_size, model.config.padded_vocab_size))
    assert padding_rows or name != "mamba"
    prompt = _ids(model.config.vocab_size, 1, 7, seed=2)
    expected = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                           suppress_tokens=padding_rows or None)[:, prompt.shape[1]:]
    assert torch.equal(model.generate(prompt, NEW_TOKENS, temperature=0)[:, prompt.shape[1]:], expected)

    back = LanguageModel.from_pretrained(folder)
    assert back.config.layer_pattern == model.config.layer_pattern
    original, reloaded = model.state_dict(), back.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)


@pytest.mark.parametrize(
    "config, match",
    [
        (ModelConfig(vocab_size=40, d_model=16, n_layer=2, layer_pattern="M2",
                     mamba2=Mamba2Config(d_state=4, headdim=8)), "layer_pattern 'M2'"),
        (ModelConfig(vocab_size=40, d_model=16, n_layer=2, layer_pattern="2",
                     mamba2=Mamba2Config(d_state=4, headdim=8, norm_before_gate=True)), "norm_before_gate"),
        (ModelConfig(vocab_size=40, d_model=16, n_layer=2, layer_pattern="2",
                     mamba2=Mamba2Config(d_state=4, headdim=8, rmsnorm=False)), "rmsnorm"),
        (ModelConfig(vocab_size=40, d_model=16, n_layer=2, layer_pattern="2",
                     mamba2=Mamba2Config(d_state=4, headdim=8, D_has_hdim=True)), "D_has_hdim"),
    ],
)
def test_models_transformers_cannot_express_are_refused(tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        LanguageModel(config).save_pretrained(tmp_path / "out", format="transformers")
    assert list(tmp_path.iterdir()) == []
