"""The shared transformer block and Zamba2's hybrid layer (Z): the block against a float64 reference of its
definition, the layer's cache (a prompt at once = token by token, seq_idx, read-only initial states, saved
states), gradients through shared weights, and models whose layers share one set of block parameters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssmkit.layers import Block
from ssmkit.layers.attention import AttentionState
from ssmkit.layers.shared_transformer import (
    SharedTransformerConfig,
    build_shared_blocks,
)
from ssmkit.layers.shared_transformer_mamba2 import (
    SharedTransformerMamba2,
    SharedTransformerMamba2State,
)
from ssmkit.models import LanguageModel, Mamba2Config, ModelCache, ModelConfig
from ssmkit.models.classifier import SequenceClassifier
from ssmkit.testing import relative_error

D = 12


def settings(**overrides) -> SharedTransformerConfig:
    base = {"num_blocks": 2, "num_heads": 4, "num_heads_kv": 2, "head_dim": 5, "rotary_emb_dim": 4,
            "rotary_emb_base": 300.0, "d_intermediate": 10, "activation": "gelu", "mlp_bias": True, "adapter_rank": 3,
            "attention_adapters": True}
    return SharedTransformerConfig(**{**base, **overrides})


def layers(cfg: SharedTransformerConfig, calls: int = 3, dtype: torch.dtype = torch.float64, seed: int = 0):
    """(shared blocks, the Blocks of ``calls`` Z layers calling them), random weights."""
    torch.manual_seed(seed)
    blocks = build_shared_blocks(D, cfg, norm_eps=1e-5, dtype=dtype)
    mamba2 = Mamba2Config(d_state=4, headdim=6, ngroups=2, chunk_size=4, dt_limit=(0.01, math.inf))
    z = [Block(D, SharedTransformerMamba2(D, cfg, mamba2, blocks, k, layer_idx=k, dtype=dtype), dtype=dtype,
               residual_in_fp32=False) for k in range(calls)]
    with torch.no_grad():
        for module in [blocks, *z]:
            for name, p in module.named_parameters():
                p.copy_((1 + 0.2 * torch.randn(p.shape)) if "norm" in name else 0.3 * torch.randn(p.shape))
    return blocks, z


def reference_block(block, layer, x: torch.Tensor) -> torch.Tensor:
    """The shared block's definition in float64: RMSNorm(2d), attention with this call's adapters, rotary
    pairs (i, i + r/2), softmax at (p / 2) ** -0.5 with grouped heads, RMSNorm(d), act(gate) * up, down."""
    x = x.double()
    b, n, _ = x.shape
    att, mlp = block.self_attn, block.feed_forward

    def norm(v, module):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + module.eps) * module.weight.double()

    def lin(v, m):
        return F.linear(v, m.weight.double(), None if m.bias is None else m.bias.double())

    def adapter(v, seq):
        return lin(lin(v, seq[0]), seq[1])

    h = norm(x, block.input_layernorm)
    q = lin(h, att.q_proj) + adapter(h, layer.q_adapter)
    k = lin(h, att.k_proj) + adapter(h, layer.k_adapter)
    v = lin(h, att.v_proj) + adapter(h, layer.v_adapter)
    p, r = att.head_dim, att.rotary_emb_dim
    q, k, v = (t.view(b, n, -1, p).transpose(1, 2) for t in (q, k, v))
    inv = att.rotary_emb_base ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv
    cos, sin = ang.cos(), ang.sin()

    def rope(t):
        t1, t2 = t[..., : r // 2], t[..., r // 2 : r]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin, t[..., r:]], -1)

    q, k = rope(q), rope(k)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scores = q @ k.transpose(-1, -2) * (p / 2) ** -0.5
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
    h = norm(lin(a, att.o_proj), block.pre_ff_layernorm)
    gate, up = (lin(h, mlp.gate_up_proj) + adapter(h, layer.mlp_adapter)).chunk(2, -1)
    return lin(F.gelu(gate) * up, mlp.down_proj)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 7, 13])
def test_shared_block_matches_its_float64_definition(dtype, n):
    blocks, z = layers(settings(), dtype=dtype)
    layer = z[2].mixer
    x = torch.randn(2, n, 2 * D, dtype=torch.float64)
    with torch.no_grad():
        ours = layer.shared(x.to(dtype), adapters=layer)
        ref = reference_block(blocks[0], layer, x)
    assert relative_error(ours, ref) <= (1e-12 if dtype == torch.float64 else 1e-5)


def run(z, residual, inputs, **kwargs):
    for block, state in zip(z, kwargs.pop("states", [None] * len(z))):
        residual = block(residual, inputs=inputs, cache=state, **kwargs)
    return residual


@pytest.mark.parametrize("cfg", [settings(), settings(num_blocks=1, attention_adapters=False, num_heads_kv=None,
                                                      rotary_emb_dim=0, mlp_bias=False)])
def test_a_prompt_read_at_once_equals_token_by_token(cfg):
    _, z = layers(cfg)
    r, e = torch.randn(2, 11, D, dtype=torch.float64), torch.randn(2, 11, D, dtype=torch.float64)
    with torch.no_grad():
        full = run(z, r, e)
        states = [b.allocate_state(2) for b in z]
        parts = [run(z, r[:, :5], e[:, :5], states=states)]
        parts += [run(z, r[:, t:t + 1], e[:, t:t + 1], states=states) for t in range(5, 11)]
    assert relative_error(torch.cat(parts, 1), full) <= 1e-12
    assert all(int(s.length[0]) == 11 for s in states)


def test_seq_idx_restarts_attention_and_scan_and_initial_state_is_read_only():
    _, z = layers(settings())
    r, e = torch.randn(1, 12, D, dtype=torch.float64), torch.randn(1, 12, D, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        packed = run(z, r, e, seq_idx=seq_idx)
        alone = run(z, r[:, 5:], e[:, 5:])
        assert relative_error(packed[:, 5:], alone) <= 1e-12
        # A prefix's state as initial_state (read only) continues it like the cache does.
        states = [b.allocate_state(1) for b in z]
        run(z, r[:, :5], e[:, :5], states=states)
        before = [s.clone() for s in states]
        block = z[0]
        y = block(r[:, 5:], inputs=e[:, 5:], initial_state=states[0])
        full = block(r, inputs=e)
    assert relative_error(y, full[:, 5:]) <= 1e-12
    assert all(torch.equal(a, b) for s, t in zip(before, states) for a, b in zip(s.tensors().values(),
                                                                                 t.tensors().values()))


def test_gradients_reach_the_shared_weights_from_every_call():
    blocks, z = layers(settings(), calls=3)
    r = torch.randn(1, 6, D, dtype=torch.float64, requires_grad=True)
    e = torch.randn(1, 6, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, e: run(z, r, e), (r, e), atol=1e-7)
    run(z, r, e).square().sum().backward()
    q = blocks[0].self_attn.q_proj.weight
    # Block 0 serves calls 0 and 2: its gradient is the sum over both, so it differs from one call's.
    one = torch.autograd.grad(z[0](r, inputs=e).square().sum(), q)[0]
    assert q.grad is not None and not torch.allclose(q.grad, one)
    assert all(p.grad is not None for p in blocks.parameters())


def test_the_layer_runs_only_inside_a_block_with_the_embeddings():
    _, z = layers(settings())
    x = torch.randn(1, 3, D, dtype=torch.float64)
    with pytest.raises(TypeError, match="inside a Block"):
        z[0].mixer(x)
    with pytest.raises(ValueError, match="input embeddings"):
        z[0](x)
    with pytest.raises(ValueError, match="SharedTransformer blocks, got 1"):
        SharedTransformerMamba2(D, settings(), Mamba2Config(headdim=6), build_shared_blocks(D, settings(num_blocks=1),
                                                                                          norm_eps=1e-5), 0)


def model_config(n_layer: int = 5) -> ModelConfig:
    return ModelConfig(vocab_size=40, d_model=D, n_layer=n_layer, layer_pattern="2Z2ZZ", residual_in_fp32=False,
                       mamba2=Mamba2Config(d_state=4, headdim=6, chunk_size=4), shared_transformer=settings(),
                       pad_vocab_size_multiple=1)


def test_a_model_holds_each_shared_block_once_and_keeps_it_shared_through_training_and_saving(tmp_path):
    torch.manual_seed(0)
    model = LanguageModel(model_config())
    blocks = model.shared["shared_transformer_mamba2"]
    calls = [b.mixer for b in model.layers if isinstance(b.mixer, SharedTransformerMamba2)]
    assert [c.shared for c in calls] == [blocks[0], blocks[1], blocks[0]]
    names = [n for n, _ in model.named_parameters()]
    assert sum(n.startswith("shared.") for n in names) == sum(1 for _ in blocks.parameters())
    assert not any(".mixer.shared." in n for n in model.state_dict())
    ids = torch.randint(0, 40, (2, 9))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = blocks[0].self_attn.q_proj.weight.detach().clone()
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    opt.step()
    assert not torch.equal(before, calls[2].shared.self_attn.q_proj.weight)  # the call sees the update
    model.save_pretrained(tmp_path / "ckpt")
    again = LanguageModel.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
    again_calls = [b.mixer for b in again.layers if isinstance(b.mixer, SharedTransformerMamba2)]
    assert again_calls[0].shared is again_calls[2].shared is again.shared["shared_transformer_mamba2"][0]
    moved = again.to(torch.float64)
    assert again_calls[0].shared.self_attn.q_proj.weight.dtype == torch.float64 and moved is again


def test_saved_cache_and_state_copy_across_capacities(tmp_path):
    torch.manual_seed(1)
    model = LanguageModel(model_config()).eval()
    ids = torch.randint(0, 40, (1, 300))
    with torch.no_grad():
        cache = model.allocate_cache(1)
        model(ids[:, :280], cache=cache)  # grows the KV caches past one block of 256
        cache.save(tmp_path / "c.safetensors")
        loaded = ModelCache.load(tmp_path / "c.safetensors")
        small = model.allocate_cache(1)
        small.copy_(loaded)
        assert isinstance(small.states[1], SharedTransformerMamba2State) and small.states[1].k.shape[2] == 512
        expected = model(ids[:, 280:], cache=cache).logits
        assert torch.equal(model(ids[:, 280:], cache=small).logits, expected)
    state = small.states[1]
    assert isinstance(state.attention(), AttentionState) and state.mamba().ssm is state.ssm


def test_models_without_a_shared_table_refuse_z_layers():
    with pytest.raises(ValueError, match="share weights"):
        SequenceClassifier(model_config(), num_classes=2)


def test_size_estimate_and_flops_count_shared_blocks_once():
    from ssmkit.models.size import estimate_size

    cfg = model_config()
    model = LanguageModel(cfg, device="meta")
    assert estimate_size(cfg).parameters == sum(p.numel() for p in model.parameters())
    # Three calls of three blocks instead of two: exactly one more block's parameters.
    cfg3 = model_config()
    cfg3.shared_transformer.num_blocks = 3
    block = sum(p.numel() for p in model.shared["shared_transformer_mamba2"][0].parameters())
    assert estimate_size(cfg3).parameters - estimate_size(cfg).parameters == block
    assert LanguageModel(model_config(8), device="meta").flops_per_token(64) > model.flops_per_token(64)
    # Z layers with and without a feed-forward still share one table entry.
    mixed = model_config()
    mixed.layer_pattern = "ZZm2"
    assert estimate_size(mixed).parameters == sum(p.numel() for p in LanguageModel(mixed, device="meta").parameters())
