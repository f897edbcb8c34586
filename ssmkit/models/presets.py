"""Named model configurations, as Python functions, so the CLI, tests and benchmarks share sizes.

``get_preset(name)`` returns a fresh :class:`ModelConfig`; ``list_presets()`` lists the names.

Byte-level vocabulary (``byte-small``): ids 0-255 are the bytes themselves, then three specials,
:data:`BYTE_PAD` = 256, :data:`BYTE_BOS` = 257, :data:`BYTE_EOS` = 258 (``vocab_size`` 259, embedding
padded to 264 rows).

Hybrids: ``jamba-tiny`` and ``jamba-v0.1`` (the published AI21 Jamba-v0.1 shape, 52B parameters: config
only, build it on the "meta" device) follow :func:`jamba_layer_pattern`; ``samba-tiny`` is Samba's
Mamba, MLP, sliding-window attention, MLP; ``bamba-tiny`` and ``bamba-9b`` (IBM's Bamba-9B, 9.78B parameters)
are Mamba-2 layers with attention at a few indices (:func:`bamba_layer_pattern`), each followed by an MLP;
``nemotron-h-tiny`` and ``nemotron-h-8b`` (NVIDIA's Nemotron-H-8B-Base-8K) are Mamba-2 and attention layers, most
followed by a squared-ReLU MLP (:func:`nemotron_h_layer_pattern`); ``zamba2-tiny``, ``zamba2-1.2b`` and
``zamba2-2.7b`` (Zyphra's Zamba2) are Mamba-2 layers with shared-transformer hybrid layers (``Z``) at a few
indices (:func:`zamba2_layer_pattern`); ``falcon-h1-tiny``, ``falcon-h1-0.5b`` and
``falcon-h1-1.5b`` (TII's Falcon-H1) run attention and Mamba-2 side by side in every layer (``Fm``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ssmkit.data.tokenizer import BYTE_BOS, BYTE_EOS, BYTE_PAD, BYTE_VOCAB_SIZE  # noqa: F401  (re-exported)
from ssmkit.layers.shared_transformer import SharedTransformerConfig
from ssmkit.layers.ungated_mlp import UngatedMLPConfig
from ssmkit.models.config import (
    AttentionConfig,
    Mamba2Config,
    MambaConfig,
    MLPConfig,
    ModelConfig,
    MoEConfig,
)

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register(name: str) -> Callable[[Callable[[], ModelConfig]], Callable[[], ModelConfig]]:
    """Decorator: register a function returning a :class:`ModelConfig` under ``name``."""

    def wrap(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        if name in _PRESETS:
            raise ValueError(f"preset {name!r} is already registered")
        _PRESETS[name] = fn
        return fn

    return wrap


def get_preset(name: str) -> ModelConfig:
    """A new :class:`ModelConfig` for the preset ``name``."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return _PRESETS[name]()


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def jamba_layer_pattern(n_layer: int, *, attn_layer_period: int = 8, attn_layer_offset: int = 4,
                        expert_layer_period: int = 2, expert_layer_offset: int = 1, mixer: str = "M") -> str:
    """Jamba's layout as a ``layer_pattern``: layer i is attention (``A``) iff i % attn_layer_period ==
    attn_layer_offset, else ``mixer``; its feed-forward is MoE (``e``) iff i % expert_layer_period ==
    expert_layer_offset, else a dense MLP (``m``). One period (or ``n_layer`` tokens when shorter).

    Example: ``jamba_layer_pattern(32) == "MmMeMmMeAmMeMmMe"``.
    """
    for name, period, offset in (("attn", attn_layer_period, attn_layer_offset),
                                 ("expert", expert_layer_period, expert_layer_offset)):
        if period < 1 or not 0 <= offset < period:
            raise ValueError(f"{name}_layer_offset must be in [0, {name}_layer_period), got {offset} and {period}")
    length = min(math.lcm(attn_layer_period, expert_layer_period), n_layer)
    return "".join(
        ("A" if i % attn_layer_period == attn_layer_offset else mixer)
        + ("e" if i % expert_layer_period == expert_layer_offset else "m")
        for i in range(length)
    )


@register("mamba-130m")
def mamba_130m() -> ModelConfig:
    """state-spaces/mamba-130m: 24 Mamba layers, d_model 768, GPT-NeoX vocabulary padded to 50280."""
    return ModelConfig(vocab_size=50280, d_model=768, n_layer=24, layer_pattern="M", mamba=MambaConfig(),
                       pad_vocab_size_multiple=8)


@register("mamba2-130m")
def mamba2_130m() -> ModelConfig:
    """state-spaces/mamba2-130m: 24 Mamba-2 layers, d_model 768, 24 heads of 64, d_state 128, vocab 50288."""
    return ModelConfig(vocab_size=50288, d_model=768, n_layer=24, layer_pattern="2",
                       mamba2=Mamba2Config(d_state=128, headdim=64, ngroups=1), pad_vocab_size_multiple=16)


@register("byte-small")
def byte_small() -> ModelConfig:
    """Byte-level Mamba-2 (MambaByte-style), about 3.5M parameters: 8 layers, d_model 256, 16 heads of 32."""
    return ModelConfig(vocab_size=BYTE_VOCAB_SIZE, d_model=256, n_layer=8, layer_pattern="2",
                       mamba2=Mamba2Config(d_state=64, headdim=32, ngroups=1, chunk_size=256))


@register("debug-mamba")
def debug_mamba() -> ModelConfig:
    """Tiny Mamba for tests: 2 layers, d_model 32, d_state 8, vocab 64."""
    return ModelConfig(vocab_size=64, d_model=32, n_layer=2, layer_pattern="M", mamba=MambaConfig(d_state=8))


@register("debug-mamba2")
def debug_mamba2() -> ModelConfig:
    """Tiny Mamba-2 for tests: 2 layers, d_model 32, 4 heads of 16, 2 groups, d_state 16, chunks of 16."""
    return ModelConfig(vocab_size=64, d_model=32, n_layer=2, layer_pattern="2",
                       mamba2=Mamba2Config(d_state=16, headdim=16, ngroups=2, chunk_size=16))


@register("debug-hybrid")
def debug_hybrid() -> ModelConfig:
    """Tiny Mamba / Mamba-2 alternation for tests: 3 layers ``M 2 M``, vocab 61 (padded to 64)."""
    return ModelConfig(vocab_size=61, d_model=32, n_layer=3, layer_pattern="M2",
                       mamba=MambaConfig(d_state=8),
                       mamba2=Mamba2Config(d_state=16, headdim=16, ngroups=2, chunk_size=16))


@register("jamba-tiny")
def jamba_tiny() -> ModelConfig:
    """Tiny Jamba for tests: 8 layers (attention at 4, MoE at odd layers), d_model 64, 4 query / 2 KV heads
    without positional encoding, 4 experts top-2, vocab 256."""
    return ModelConfig(vocab_size=256, d_model=64, n_layer=8, layer_pattern=jamba_layer_pattern(8),
                       mamba=MambaConfig(d_state=8, inner_layernorms=True, mixer_rms_eps=1e-6),
                       attention=AttentionConfig(num_heads=4, num_heads_kv=2), mlp=MLPConfig(d_intermediate=128),
                       moe=MoEConfig(num_experts=4, top_k=2, d_intermediate=128), norm_eps=1e-6,
                       tie_embeddings=False)


@register("samba-tiny")
def samba_tiny() -> ModelConfig:
    """Tiny Samba for tests: 8 layers ``Mm Wm`` repeated, d_model 64, sliding window 32 with RoPE on whole
    heads (4 query / 2 KV heads of 16), vocab 256."""
    return ModelConfig(vocab_size=256, d_model=64, n_layer=8, layer_pattern="MmWm", mamba=MambaConfig(d_state=8),
                       attention=AttentionConfig(num_heads=4, num_heads_kv=2, window=32, rotary_emb_dim=16),
                       mlp=MLPConfig(d_intermediate=128))


@register("jamba-v0.1")
def jamba_v0_1() -> ModelConfig:
    """ai21labs/Jamba-v0.1: 32 layers (attention at i % 8 == 4, MoE at i % 2 == 1), d_model 4096, 32 query /
    8 KV heads without positional encoding, 16 experts top-2 and dense MLPs of 14336, Mamba d_state 16,
    d_conv 4, expand 2, dt_rank 256 with inner layer norms, vocab 65536, untied head, RMSNorm eps 1e-6."""
    return ModelConfig(vocab_size=65536, d_model=4096, n_layer=32, layer_pattern=jamba_layer_pattern(32),
                       mamba=MambaConfig(d_state=16, d_conv=4, expand=2, dt_rank="auto", conv_bias=True, bias=False,
                                         inner_layernorms=True, mixer_rms_eps=1e-6),
                       attention=AttentionConfig(num_heads=32, num_heads_kv=8), mlp=MLPConfig(d_intermediate=14336),
                       moe=MoEConfig(num_experts=16, top_k=2, d_intermediate=14336, router_aux_loss_coef=1e-3),
                       norm_eps=1e-6, tie_embeddings=False, pad_vocab_size_multiple=8)


def bamba_layer_pattern(n_layer: int, attention_layers: tuple[int, ...]) -> str:
    """Bamba's layer pattern: full attention with an MLP (``Am``) at ``attention_layers``, Mamba-2 with an MLP
    (``2m``) elsewhere (transformers' ``attn_layer_indices``).

    Example: ``bamba_layer_pattern(4, (1,)) == "2mAm2m2m"``.
    """
    return "".join("Am" if i in attention_layers else "2m" for i in range(n_layer))


@register("bamba-tiny")
def bamba_tiny() -> ModelConfig:
    """Tiny Bamba for tests: 6 layers (attention at 2 and 5), d_model 64, 4 query / 2 KV heads with RoPE on half
    of each head, Mamba-2 with 8 heads of 16 in 2 groups, d_state 16, vocab 256."""
    return ModelConfig(vocab_size=256, d_model=64, n_layer=6, layer_pattern=bamba_layer_pattern(6, (2, 5)),
                       mamba2=Mamba2Config(d_state=16, headdim=16, ngroups=2, chunk_size=16),
                       attention=AttentionConfig(num_heads=4, num_heads_kv=2, rotary_emb_dim=8),
                       mlp=MLPConfig(d_intermediate=128), tie_embeddings=False, residual_in_fp32=False,
                       pad_vocab_size_multiple=1, rescale_prenorm_residual=False)


@register("bamba-9b")
def bamba_9b() -> ModelConfig:
    """ibm-ai-platform/Bamba-9B: 32 layers (attention at 9, 18, 27), d_model 4096, 32 query / 8 KV heads of 128
    with RoPE (base 10000) on half of each head, SwiGLU MLPs of 14336, Mamba-2 with 128 heads of 64 in one
    group, d_state 128, d_conv 4, vocab 128256, untied head, RMSNorm eps 1e-5: 9,780,235,392 parameters
    (config only: build it on the "meta" device)."""
    return ModelConfig(vocab_size=128256, d_model=4096, n_layer=32,
                       layer_pattern=bamba_layer_pattern(32, (9, 18, 27)),
                       mamba2=Mamba2Config(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256),
                       attention=AttentionConfig(num_heads=32, num_heads_kv=8, rotary_emb_dim=64,
                                                 rotary_emb_base=10000.0),
                       mlp=MLPConfig(d_intermediate=14336), norm_eps=1e-5, tie_embeddings=False,
                       residual_in_fp32=False, pad_vocab_size_multiple=1, rescale_prenorm_residual=False)


def nemotron_h_layer_pattern(hybrid_override_pattern: str) -> str:
    """ssmkit's layer pattern for Nemotron-H's (``M`` Mamba-2, ``*`` attention, ``-`` MLP layer): each MLP layer
    is the feed-forward (``u``) of the mixer layer before it, the same function.

    Example: ``nemotron_h_layer_pattern("M-M*-M") == "2u2Au2"``.
    """
    letters = {"M": "2", "*": "A", "-": "u"}
    if not hybrid_override_pattern or hybrid_override_pattern[0] == "-" or "--" in hybrid_override_pattern or any(
            c not in letters for c in hybrid_override_pattern):
        raise ValueError(f"{hybrid_override_pattern!r}: expected M, * and -, each - after an M or a *")
    return "".join(letters[c] for c in hybrid_override_pattern)


@register("nemotron-h-tiny")
def nemotron_h_tiny() -> ModelConfig:
    """Tiny Nemotron-H for tests: ``M-M*-M-M*-`` (6 ssmkit layers), d_model 64, 4 query / 2 KV heads of 16
    without positional encoding, Mamba-2 with 8 heads of 16 in 2 groups, d_state 16, squared-ReLU MLPs of 128,
    vocab 256."""
    pattern = nemotron_h_layer_pattern("M-M*-M-M*-")
    return ModelConfig(vocab_size=256, d_model=64, n_layer=pattern.count("2") + pattern.count("A"),
                       layer_pattern=pattern, mamba2=Mamba2Config(d_state=16, headdim=16, ngroups=2, chunk_size=16),
                       attention=AttentionConfig(num_heads=4, num_heads_kv=2),
                       ungated_mlp=UngatedMLPConfig(d_intermediate=128), tie_embeddings=False,
                       residual_in_fp32=False, pad_vocab_size_multiple=1, rescale_prenorm_residual=False)


@register("nemotron-h-8b")
def nemotron_h_8b() -> ModelConfig:
    """nvidia/Nemotron-H-8B-Base-8K: 52 Nemotron-H layers ``M-M-M-M*-M-M-M-M-M*-...`` (24 Mamba-2, 4 attention,
    24 MLP: 28 ssmkit layers), d_model 4096, 32 query / 8 KV heads of 128 without positional encoding,
    squared-ReLU MLPs of 21504, Mamba-2 with 128 heads of 64 in 8 groups, d_state 128, d_conv 4, vocab 131072,
    untied head, RMSNorm eps 1e-5 (config only: build it on the "meta" device)."""
    pattern = nemotron_h_layer_pattern("M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-")
    return ModelConfig(vocab_size=131072, d_model=4096, n_layer=pattern.count("2") + pattern.count("A"),
                       layer_pattern=pattern,
                       mamba2=Mamba2Config(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=8, chunk_size=128),
                       attention=AttentionConfig(num_heads=32, num_heads_kv=8, head_dim=128),
                       ungated_mlp=UngatedMLPConfig(d_intermediate=21504, activation="relu2"), norm_eps=1e-5,
                       tie_embeddings=False, residual_in_fp32=False, pad_vocab_size_multiple=1,
                       rescale_prenorm_residual=False)


def zamba2_layer_pattern(n_layer: int, hybrid_layers: tuple[int, ...]) -> str:
    """Zamba2's layer pattern: a shared-transformer hybrid layer (``Z``) at ``hybrid_layers`` (transformers'
    ``hybrid_layer_ids``), Mamba-2 (``2``) elsewhere.

    Example: ``zamba2_layer_pattern(4, (1,)) == "2Z22"``.
    """
    return "".join("Z" if i in hybrid_layers else "2" for i in range(n_layer))


def _zamba2(vocab_size: int, d_model: int, n_layer: int, hybrid_layers: tuple[int, ...], mamba2: Mamba2Config,
            shared: SharedTransformerConfig) -> ModelConfig:
    """What every Zamba2 shares: tied head, RMSNorm eps 1e-5 (the Mamba-2 gated norm's too), no padding."""
    return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layer=n_layer,
                       layer_pattern=zamba2_layer_pattern(n_layer, hybrid_layers), mamba2=mamba2,
                       shared_transformer=shared, norm_eps=1e-5, tie_embeddings=True, residual_in_fp32=False,
                       pad_vocab_size_multiple=1, rescale_prenorm_residual=False)


def _zamba2_mamba2(**sizes: int) -> Mamba2Config:
    """Zamba2's Mamba-2 settings: Δ clamped below at time_step_min, conv bias, no projection biases."""
    return Mamba2Config(**sizes, d_conv=4, expand=2, chunk_size=256, dt_limit=(0.001, math.inf), conv_bias=True,
                        bias=False, norm_before_gate=False, rmsnorm=True, D_has_hdim=False)


@register("zamba2-tiny")
def zamba2_tiny() -> ModelConfig:
    """Tiny Zamba2 for tests: 8 layers with hybrid calls at 2, 5 and 7 of two shared blocks (in rotation),
    d_model 64, 4 heads of 32 with RoPE and attention adapters, adapter rank 8, MLP of 128, Mamba-2 with 8 heads
    of 16 in 2 groups, d_state 16, vocab 256."""
    return _zamba2(256, 64, 8, (2, 5, 7), Mamba2Config(d_state=16, headdim=16, ngroups=2, chunk_size=16,
                                                       dt_limit=(0.001, math.inf)),
                   SharedTransformerConfig(num_blocks=2, num_heads=4, rotary_emb_dim=32, d_intermediate=128,
                                           adapter_rank=8, attention_adapters=True))


@register("zamba2-1.2b")
def zamba2_1_2b() -> ModelConfig:
    """Zyphra/Zamba2-1.2B: 38 layers, hybrid calls at 5, 11, ..., 35 of one shared block (32 heads of 128 with
    RoPE, base 10000, and attention adapters; GELU MLP of 8192; adapter rank 128), d_model 2048, Mamba-2 with 64
    heads of 64 in one group, d_state 128, d_conv 4, vocab 32000, tied head (config only: build it on the
    "meta" device)."""
    return _zamba2(32000, 2048, 38, tuple(range(5, 36, 6)), _zamba2_mamba2(d_state=128, headdim=64, ngroups=1),
                   SharedTransformerConfig(num_blocks=1, num_heads=32, num_heads_kv=32, rotary_emb_dim=128,
                                           rotary_emb_base=10000.0, d_intermediate=8192, activation="gelu",
                                           adapter_rank=128, attention_adapters=True))


@register("zamba2-2.7b")
def zamba2_2_7b() -> ModelConfig:
    """Zyphra/Zamba2-2.7B: 54 layers, hybrid calls at 6, 12, ..., 42, 47, 51 of two shared blocks in rotation
    (32 heads of 160 with RoPE, base 10000, no attention adapters; GELU MLP of 10240; adapter rank 128),
    d_model 2560, Mamba-2 with 80 heads of 64 in one group, d_state 64, d_conv 4, vocab 32000, tied head
    (config only: build it on the "meta" device)."""
    return _zamba2(32000, 2560, 54, (6, 12, 18, 24, 30, 36, 42, 47, 51),
                   _zamba2_mamba2(d_state=64, headdim=64, ngroups=1),
                   SharedTransformerConfig(num_blocks=2, num_heads=32, num_heads_kv=32, rotary_emb_dim=160,
                                           rotary_emb_base=10000.0, d_intermediate=10240, activation="gelu",
                                           adapter_rank=128, attention_adapters=False))


def _falcon_h1(vocab_size: int, d_model: int, n_layer: int, heads: tuple[int, int, int], d_intermediate: int,
               mamba: tuple[int, int, int, int], multipliers: dict[str, object] | None = None) -> ModelConfig:
    """A Falcon-H1 config: ``heads`` = (query heads, KV heads, head dim), ``mamba`` = (d_ssm, head dim, groups,
    d_state); rope base 1e11, no gated norm in the Mamba-2 half, untied head; ``multipliers`` are transformers'
    µP fields (absent ones 1)."""
    from ssmkit.layers.parallel_hybrid import ParallelHybridConfig

    m = {"embedding_multiplier": 1.0, "lm_head_multiplier": 1.0, "key_multiplier": 1.0,
         "attention_in_multiplier": 1.0, "attention_out_multiplier": 1.0, "ssm_in_multiplier": 1.0,
         "ssm_out_multiplier": 1.0, "ssm_multipliers": (1.0,) * 5, "mlp_multipliers": (1.0, 1.0),
         **(multipliers or {})}
    d_ssm, ssm_head_dim, groups, d_state = mamba
    mixer = ParallelHybridConfig(
        attention=AttentionConfig(num_heads=heads[0], num_heads_kv=heads[1], head_dim=heads[2],
                                  rotary_emb_dim=heads[2], rotary_emb_base=1e11),
        mamba2=Mamba2Config(d_state=d_state, d_conv=4, headdim=ssm_head_dim, ngroups=groups, chunk_size=128,
                            d_inner=d_ssm, rmsnorm=False, in_proj_multipliers=tuple(m["ssm_multipliers"])),
        **{k: m[k] for k in ("key_multiplier", "attention_in_multiplier", "attention_out_multiplier",
                             "ssm_in_multiplier", "ssm_out_multiplier")})
    gate, down = m["mlp_multipliers"]
    return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layer=n_layer, layer_pattern="Fm",
                       parallel_hybrid=mixer,
                       mlp=MLPConfig(d_intermediate=d_intermediate, gate_multiplier=gate, down_multiplier=down),
                       norm_eps=1e-5, tie_embeddings=False, residual_in_fp32=False, pad_vocab_size_multiple=1,
                       rescale_prenorm_residual=False, embedding_multiplier=m["embedding_multiplier"],
                       logits_multiplier=m["lm_head_multiplier"])


@register("falcon-h1-tiny")
def falcon_h1_tiny() -> ModelConfig:
    """Tiny Falcon-H1 for tests: 4 parallel attention + Mamba-2 layers with MLPs (``Fm``), d_model 64, 4 query / 2
    KV heads of 16 with RoPE, Mamba-2 of 96 channels (6 heads of 16, 2 groups), d_state 16, µP multipliers that
    are not 1, vocab 256."""
    return _falcon_h1(256, 64, 4, (4, 2, 16), 128, (96, 16, 2, 16), {
        "embedding_multiplier": 2.0, "lm_head_multiplier": 0.25, "key_multiplier": 0.5,
        "attention_out_multiplier": 0.9, "ssm_in_multiplier": 1.25, "ssm_out_multiplier": 0.5,
        "ssm_multipliers": (0.5, 0.25, 0.5, 0.5, 0.5), "mlp_multipliers": (0.9, 0.6)})


@register("falcon-h1-0.5b")
def falcon_h1_0_5b() -> ModelConfig:
    """tiiuae/Falcon-H1-0.5B: 36 layers, d_model 1024, 8 query / 2 KV heads of 64 (RoPE base 1e11), SwiGLU MLPs of
    2048, Mamba-2 of 1536 channels (24 heads of 64, one group), d_state 128, no gated norm, vocab 32784, untied
    head, with its µP multipliers (config only: build it on the "meta" device for its size)."""
    return _falcon_h1(32784, 1024, 36, (8, 2, 64), 2048, (1536, 64, 1, 128), {
        "embedding_multiplier": 5.656854249492381, "lm_head_multiplier": 0.0390625, "key_multiplier": 0.390625,
        "attention_out_multiplier": 0.9375, "ssm_in_multiplier": 1.25, "ssm_out_multiplier": 0.23570226039551587,
        "ssm_multipliers": (0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738),
        "mlp_multipliers": (0.8838834764831844, 0.5859375)})


@register("falcon-h1-1.5b")
def falcon_h1_1_5b() -> ModelConfig:
    """tiiuae/Falcon-H1-1.5B: 24 layers, d_model 2048, 8 query / 2 KV heads of 128 (RoPE base 1e11), SwiGLU MLPs of
    4608, Mamba-2 of 3072 channels (48 heads of 64, one group), d_state 256, vocab 65537, untied head (config
    only: build it on the "meta" device). The µP multipliers are left at 1: they change no size, and a
    checkpoint's own config.json brings them."""
    return _falcon_h1(65537, 2048, 24, (8, 2, 128), 4608, (3072, 64, 1, 256))
