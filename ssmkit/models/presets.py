"""Named model configurations, as Python functions, so the CLI, tests and benchmarks share sizes.

``get_preset(name)`` returns a fresh :class:`ModelConfig`; ``list_presets()`` lists the names.

Byte-level vocabulary (``byte-small``): ids 0-255 are the bytes themselves, then three specials,
:data:`BYTE_PAD` = 256, :data:`BYTE_BOS` = 257, :data:`BYTE_EOS` = 258 (``vocab_size`` 259, embedding
padded to 264 rows).
"""

from __future__ import annotations

from collections.abc import Callable

from ssmkit.models.config import Mamba2Config, MambaConfig, ModelConfig

BYTE_PAD, BYTE_BOS, BYTE_EOS = 256, 257, 258
BYTE_VOCAB_SIZE = 259

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
