"""Hybrid models: attention / sliding-window layers and MLP / MoE feed-forwards in layer patterns, their
caches, the MoE auxiliary losses in the training loss, and the hybrid presets."""

import pytest
import torch
import torch.nn.functional as F

from ssmkit.models import ModelCache
from ssmkit.layers import AttentionState, Mamba2State, MoE
from ssmkit.models import (
    AttentionConfig,
    LanguageModel,
    Mamba2Config,
    MambaConfig,
    MLPConfig,
    ModelConfig,
    MoEConfig,
    get_preset,
)
from ssmkit.models.presets import jamba_layer_pattern
from ssmkit.testing import assert_close


def tiny(pattern: str, n_layer: int, **overrides) -> ModelConfig:
    kw = dict(vocab_size=61, d_model=32, n_layer=n_layer, layer_pattern=pattern, mamba=MambaConfig(d_state=8),
              mamba2=Mamba2Config(d_state=16, headdim=16, ngroups=2, chunk_size=16),
              attention=AttentionConfig(num_heads=4, num_heads_kv=2, window=8, rotary_emb_dim=8),
              mlp=MLPConfig(d_intermediate=48), moe=MoEConfig(num_experts=4, top_k=2, d_intermediate=40))
    kw.update(overrides)
    return ModelConfig(**kw)


def model_of(name_or_config, seed=0) -> LanguageModel:
    torch.manual_seed(seed)
    cfg = get_preset(name_or_config) if isinstance(name_or_config, str) else name_or_config
    return LanguageModel(cfg).eval()


def test_jamba_pattern_places_attention_and_experts():
    for n in (8, 12, 32):
        specs = get_preset("jamba-tiny").layer_specs() if n == 8 else tiny(jamba_layer_pattern(n), n).layer_specs()
        assert [s.mixer == "attention" for s in specs] == [i % 8 == 4 for i in range(n)]
        assert [s.ff for s in specs] == ["moe" if i % 2 == 1 else "mlp" for i in range(n)]
    assert jamba_layer_pattern(3) == "MmMeMm"  # fewer layers than one period
    assert jamba_layer_pattern(16, attn_layer_period=4, attn_layer_offset=0, mixer="2") == "Am2e2m2e"
    with pytest.raises(ValueError, match="attn_layer_offset"):
        jamba_layer_pattern(8, attn_layer_offset=8)


def test_patterns_build_the_right_modules():
    samba = model_of("samba-tiny")
    kinds = [(type(b.mixer).__name__, type(b.ff).__name__) for b in samba.layers[:4]]
    assert kinds == [("Mamba", "MLP"), ("Attention", "MLP")] * 2
    assert samba.layers[1].mixer.window == 32 and samba.layers[1].mixer.rotary_emb_dim == 16
    m = model_of(tiny("2222A", 5))
    assert [type(b.mixer).__name__ for b in m.layers] == ["Mamba2"] * 4 + ["Attention"]
    assert m.layers[4].mixer.window is None and all(b.ff is None for b in m.layers)
    sd = model_of(tiny("MeA", 3)).state_dict()
    assert "layers.0.ff.experts.3.down_proj.weight" in sd and "layers.0.ff.router.weight" in sd
    assert "layers.1.mixer.q_proj.weight" in sd and "layers.1.ff_norm.weight" not in sd


@pytest.mark.parametrize(("change", "message"), [
    (dict(attention=AttentionConfig(num_heads=4, num_heads_kv=3)), "attention.num_heads=4 must be divisible"),
    (dict(attention=AttentionConfig(num_heads=5)), "attention.num_heads=5 must divide d_model=32"),
    (dict(attention=AttentionConfig(num_heads=4, window=0)), "attention.window must be > 0"),
    (dict(attention=AttentionConfig(num_heads=4, rotary_emb_dim=3)), "attention.rotary_emb_dim must be even"),
    (dict(moe=MoEConfig(num_experts=2, top_k=3)), r"moe.top_k must be in \[1, moe.num_experts=2\]"),
    (dict(moe=MoEConfig(router_aux_loss_coef=-1.0)), "moe.router_aux_loss_coef must be >= 0"),
    (dict(mlp=MLPConfig(d_intermediate=0)), "mlp.d_intermediate must be > 0"),
    (dict(layer_pattern="Mx"), "unknown feed-forward letter 'x'"),
])
def test_bad_hybrid_configs_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        tiny("MeWm", 2, **change)


def test_unused_sections_are_not_validated_and_json_round_trips():
    cfg = tiny("M", 2, attention=AttentionConfig(num_heads=5), moe=MoEConfig(num_experts=2, top_k=3))
    assert cfg.layer_specs()[0].ff is None
    jamba = get_preset("jamba-v0.1")
    again = ModelConfig.from_dict(jamba.to_dict())
    assert again == jamba and again.moe.num_experts == 16 and again.attention.num_heads_kv == 8
    with pytest.raises(ValueError, match="unknown config key.*moe.topk"):
        ModelConfig.from_dict({**jamba.to_dict(), "moe": {"topk": 2}})


@pytest.mark.parametrize("name", ["jamba-tiny", "samba-tiny", "mamba2+attention"])
def test_prefill_then_decode_equals_full_forward(name):
    model = model_of(tiny("2m2e2mAe", 8) if name == "mamba2+attention" else name)
    ids = torch.randint(0, model.config.vocab_size, (2, 45))  # longer than samba-tiny's window of 32
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(2)
        steps = [model(ids[:, :20], cache=cache).logits]
        steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(20, 45)]
    assert_close(torch.cat(steps, 1), full, torch.float32, name=name)
    assert cache.seqlen_offset == 45


@pytest.mark.parametrize("name", ["jamba-tiny", "samba-tiny"])
def test_padded_batch_equals_rows_alone(name):
    model = model_of(name)
    prompts = [[5, 9, 2], list(range(40, 80)), [7] * 11]
    with torch.no_grad():
        batch = model.generate(prompts, 12, temperature=0)
        alone = [model.generate([p], 12, temperature=0)[0] for p in prompts]
    assert [list(map(int, r)) for r in batch] == [list(map(int, r)) for r in alone]


def test_hybrid_cache_save_load_clone(tmp_path):
    model = model_of(tiny("2mAeWm", 6))
    cache = model.allocate_cache(2)
    kinds = [type(s) for s in cache.states]
    assert kinds == [Mamba2State, AttentionState, AttentionState] * 2
    with torch.no_grad():
        model(torch.randint(0, 61, (2, 300)), cache=cache)  # grows the full-attention cache past 256
        cache.save(tmp_path / "c.safetensors")
        loaded = ModelCache.load(tmp_path / "c.safetensors")
        fork = cache.clone()
        assert loaded.seqlen_offset == 300 and loaded.states[1].capacity == cache.states[1].capacity == 512
        assert loaded.states[2].capacity == 8  # the sliding window's ring buffer
        nxt = torch.randint(0, 61, (2, 4))
        a, b, c = (model(nxt, cache=x).logits for x in (cache, loaded, fork))
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(cache.states[1].k, loaded.states[1].k) and torch.equal(cache.states[2].k, fork.states[2].k)


def test_samba_cache_is_constant_while_full_attention_grows():
    samba = model_of(tiny("MmWm", 4))
    full = model_of(tiny("MmAm", 4))
    sizes = {"samba": [], "full": []}
    for name, model in (("samba", samba), ("full", full)):
        cache = model.allocate_cache(1)
        with torch.no_grad():
            for _ in range(12):
                model(torch.randint(0, 61, (1, 100)), cache=cache)
                sizes[name].append(cache.nbytes)
    assert len(set(sizes["samba"])) == 1
    assert sizes["samba"][0] == samba.cache_nbytes(10) == samba.cache_nbytes(10**6)
    assert sizes["full"][-1] > 4 * sizes["full"][0] and sizes["full"] == sorted(sizes["full"])
    # cache_nbytes counts whole blocks of 256 tokens: 2 attention layers, k and v, 2 KV heads of 8, fp32.
    ssm = full.cache_nbytes(1) - 2 * 2 * 2 * 8 * 256 * 4
    assert full.cache_nbytes(1200) == ssm + 2 * 2 * 2 * 8 * 1280 * 4


def test_jamba_v0_1_cache_at_256k_is_4gib_in_bf16():
    with torch.device("meta"):
        model = LanguageModel(get_preset("jamba-v0.1"))
    kv = 4 * 2 * 8 * 128 * 262144 * 2  # 4 attention layers, k and v, 8 KV heads of 128, bf16
    ssm = 28 * (8192 * 4 * 2 + 8192 * 16 * 4)  # 28 Mamba layers: conv (d_conv = 4) bf16, ssm fp32
    lengths = 4 * 8  # each attention layer's (1,) int64 token count
    assert model.cache_nbytes(262144, dtype=torch.bfloat16) == kv + ssm + lengths
    assert abs(kv / 2**30 - 4.0) < 1e-9
    # transformers' JambaForCausalLM(JambaConfig()) has 51,570,323,328 parameters (counted on "meta").
    assert sum(p.numel() for p in model.parameters()) == 51_570_323_328


def test_cli_info_reports_cache_bytes_at_a_context_length(capsys):
    from ssmkit.cli import main

    assert main(["info", "--preset", "samba-tiny", "--context", "100000"]) == 0
    out = capsys.readouterr().out
    n = LanguageModel(get_preset("samba-tiny"), device="meta").cache_nbytes(7)
    assert f"cache for one sequence: {n:,} bytes (the same at any length)" in out
    assert f"cache for one sequence at 100,000 tokens: {n:,} bytes" in out
    assert main(["info", "--preset", "jamba-tiny", "--context", "1000"]) == 0
    assert "(grows with full-attention layers)" in capsys.readouterr().out


def test_loss_adds_weighted_router_losses():
    cfg = tiny("MeAm", 4, moe=MoEConfig(num_experts=4, top_k=2, d_intermediate=40, router_aux_loss_coef=0.3,
                                          router_z_loss_coef=0.01))
    model = model_of(cfg)
    ids = torch.randint(0, 61, (2, 17))
    out = model(ids, labels=ids)
    logits = out.logits
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    moes = [b.ff for b in model.layers if isinstance(b.ff, MoE)]
    assert len(out.router_stats) == len(moes) == 2
    # Pooled over both layers exactly as transformers' load_balancing_loss_func pools its tuple of layers.
    probs = torch.cat([torch.softmax(m.route(h)[0].float(), -1) for m, h in zip(moes, _ff_inputs(model, ids))])
    top = probs.topk(2, -1).indices
    f = F.one_hot(top, 4).float().mean(0).sum(0)  # per-expert slot share summed over k
    expected_aux = 4 * (f * probs.mean(0)).sum()
    assert_close(out.aux_loss, expected_aux, torch.float32, name="aux")
    assert_close(out.loss, ce + 0.3 * out.aux_loss + 0.01 * out.z_loss, torch.float32, name="loss")
    out.loss.backward()
    assert moes[0].router.weight.grad.abs().sum() > 0
    assert sum(int(s.expert_counts.sum()) for s in out.router_stats) == 2 * 2 * 2 * 17
    plain = model_of(tiny("MmAm", 4))(ids, labels=ids)
    assert plain.aux_loss is None and plain.router_stats is None


def _ff_inputs(model, ids):
    """The normalised inputs of each MoE feed-forward, captured with hooks."""
    seen = []
    hooks = [b.ff.register_forward_hook(lambda mod, args, out: seen.append(args[0].flatten(0, 1)))
             for b in model.layers if isinstance(b.ff, MoE)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


def test_exports():
    import ssmkit.layers as layers
    import ssmkit.models as models

    for name in ("Mamba3", "Mamba3State", "S4", "S4D", "Hyena", "S4State", "S4DState", "HyenaState",
                 "MoE", "MLP", "Attention", "AttentionState"):
        assert name in layers.__all__ and hasattr(layers, name)
    for name in ("AttentionConfig", "MLPConfig", "MoEConfig", "Mamba3Config", "S4Config", "S4DConfig",
                 "HyenaConfig"):
        assert name in models.__all__
