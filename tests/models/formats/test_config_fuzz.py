"""Hostile config.json files: any JSON values in any field end in a CheckpointError naming the file, never a
raw TypeError/KeyError/OverflowError (issue 19: clear errors for every config)."""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssmkit.interop import CheckpointError, read_transformers_config
from ssmkit.models import ModelConfig
from ssmkit.models.size import estimate_size

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
FIELDS = {
    "mamba": ["vocab_size", "hidden_size", "state_size", "num_hidden_layers", "layer_norm_epsilon", "expand",
              "conv_kernel", "use_bias", "use_conv_bias", "time_step_rank", "time_step_min", "time_step_max",
              "time_step_floor", "time_step_scale", "time_step_init_scheme", "tie_word_embeddings", "residual_in_fp32"],
    "mamba2": ["num_heads", "head_dim", "vocab_size", "hidden_size", "state_size", "num_hidden_layers", "expand",
               "n_groups", "chunk_size", "time_step_limit", "conv_kernel", "rms_norm", "norm_before_gate"],
    "jamba": ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "num_experts",
              "num_experts_per_tok", "intermediate_size", "attn_layer_period", "attn_layer_offset",
              "expert_layer_period", "expert_layer_offset", "mamba_d_state", "mamba_dt_rank", "head_dim",
              "rms_norm_eps", "router_aux_loss_coef", "vocab_size"],
    "falcon_h1": ["hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "mamba_d_ssm",
                  "mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_expand", "time_step_limit",
                  "rope_parameters", "rope_theta", "ssm_multipliers", "mlp_multipliers", "key_multiplier",
                  "embedding_multiplier", "rms_norm_eps", "mamba_rms_norm", "projectors_bias", "vocab_size"],
}


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model_type=st.sampled_from(sorted(FIELDS)), data=st.data())
def test_hostile_transformers_configs_give_checkpoint_errors(tmp_path, model_type, data):
    fields = data.draw(st.dictionaries(st.sampled_from(FIELDS[model_type]), JSON_VALUES, max_size=4))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, **fields}))
    try:
        config = read_transformers_config(tmp_path)
    except CheckpointError as e:
        assert "config.json" in str(e) and len(str(e)) < 1000
    else:
        assert estimate_size(config).parameters > 0


@given(field=st.sampled_from(["vocab_size", "d_model", "n_layer", "layer_pattern", "pad_vocab_size_multiple",
                              "norm_eps", "mamba", "attention", "moe", "hyena", "s4", "parallel_hybrid",
                              "embedding_multiplier", "logits_multiplier"]), value=JSON_VALUES)
def test_hostile_ssmkit_configs_give_value_errors(field, value):
    data = {"vocab_size": 64, "d_model": 32, "n_layer": 2, "layer_pattern": "MA4Hme"[:4], field: value}
    try:
        config = ModelConfig.from_dict(data)
    except ValueError as e:
        assert len(str(e)) < 1000
    else:
        assert math.isfinite(estimate_size(config).parameters)
