"""Tiny random transformers models for the interop tests (imported by conftest.py and the tests).

The configs use odd sizes, three layers, n_groups > 1 for mamba2 and non-default eps values, and the
parameters transformers initialises to constants (A_log, D, dt bias, norm weights, conv bias) are
randomised, so a dropped or mis-mapped field shows up in the logits.
"""

from __future__ import annotations

import math

import torch
import transformers

NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)

# name -> (config class name, kwargs). Covers both bias settings, tied and untied heads, an explicit
# time_step_rank, residual_in_fp32 off, for mamba2 a time_step_limit that clamps, and
# rescale_prenorm_residual (which transformers 5.x's from_pretrained mishandles, see the parity tests).
HF_CONFIGS: dict[str, tuple[str, dict]] = {
    "mamba": ("MambaConfig", dict(
        vocab_size=61, hidden_size=20, state_size=5, num_hidden_layers=3, expand=2, conv_kernel=3,
        time_step_rank=3, layer_norm_epsilon=3e-3, use_conv_bias=True, use_bias=False, tie_word_embeddings=True,
    )),
    "mamba_untied_bias": ("MambaConfig", dict(
        vocab_size=53, hidden_size=18, state_size=7, num_hidden_layers=3, expand=3, conv_kernel=4,
        layer_norm_epsilon=1e-4, use_conv_bias=False, use_bias=True, tie_word_embeddings=False,
        residual_in_fp32=False,
    )),
    "falcon_mamba": ("FalconMambaConfig", dict(
        vocab_size=59, hidden_size=20, state_size=6, num_hidden_layers=3, expand=2, conv_kernel=4,
        layer_norm_epsilon=2e-3, mixer_rms_eps=5e-2, tie_word_embeddings=True,
    )),
    "mamba2": ("Mamba2Config", dict(
        vocab_size=57, hidden_size=24, state_size=6, num_hidden_layers=3, expand=2, num_heads=6, head_dim=8,
        n_groups=3, chunk_size=8, conv_kernel=4, layer_norm_epsilon=2e-3, tie_word_embeddings=False,
        rescale_prenorm_residual=True,
    )),
    "mamba2_limit": ("Mamba2Config", dict(
        vocab_size=57, hidden_size=20, state_size=5, num_hidden_layers=3, expand=2, num_heads=4, head_dim=10,
        n_groups=2, chunk_size=8, conv_kernel=3, layer_norm_epsilon=1e-3, use_bias=True, use_conv_bias=False,
        time_step_limit=(0.03, 0.3), tie_word_embeddings=True,
    )),
}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Replace the constant-initialised parameters of a transformers or ssmkit Mamba model by random values."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            p.copy_(torch.empty(p.shape).uniform_(math.log(0.5), math.log(8.0), generator=g))
        elif leaf == "D":
            p.copy_(torch.randn(p.shape, generator=g))
        elif name.endswith("dt_proj.bias") or leaf == "dt_bias":
            # softplus of these spans about 0.02 .. 1.3, across any time_step_limit in HF_CONFIGS
            p.copy_(torch.empty(p.shape).uniform_(-4.0, 1.0, generator=g))
        elif "norm" in name and leaf == "weight":
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        elif leaf == "bias":
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def build_hf_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A random transformers causal LM for ``HF_CONFIGS[name]`` in eval mode."""
    cls_name, kwargs = HF_CONFIGS[name]
    config = getattr(transformers, cls_name)(**kwargs, **NO_SPECIAL_TOKENS)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return randomize_(model, seed + 1).eval()


