"""How big a model is, from its :class:`ModelConfig` alone, and the check that runs before building one.

:func:`estimate_size` counts the parameters (and the large non-parameter tensors, such as Hyena's filter
positions) with closed formulas per layer kind, in time independent of the sizes: nothing is allocated,
not even on the meta device (some layers compute their initialisation on the CPU whatever the device).
``tests/models/test_size.py`` checks every formula against the parameters of real layers.

:func:`check_model_size` refuses, with a clear error, a model whose weights would not fit: by default the
memory of the device it is built on (the machine's RAM for the CPU), or ``SSMKIT_MAX_MODEL_BYTES``
(bytes; suffixes K, M, G, T) when set, or the ``max_bytes`` the caller passes.
``LanguageModel`` runs it before allocating its first tensor.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import torch

from ssmkit.io.files import parse_bytes
from ssmkit.layers import registry
from ssmkit.models.config import LayerSpec, ModelConfig, pattern_tokens

LIMIT_ENV = "SSMKIT_MAX_MODEL_BYTES"


class ModelTooLargeError(ValueError):
    """A config whose model would exceed the memory limit; the message says how to raise it."""


@dataclass(frozen=True)
class SizeEstimate:
    """``parameters``: the model's parameter count (exact; tied heads counted once); ``buffers``: elements
    of the other tensors built with it (Hyena's filter positions, Mamba's unit norm weights)."""

    parameters: int
    buffers: int

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of parameters and buffers at ``dtype`` (default: torch's default dtype). S4/S4D keep their
        SSM parameters and Mamba its A and D in float32 whatever the dtype; those are counted at ``dtype``
        too, which at bfloat16 undercounts S4/S4D models by up to half."""
        itemsize = (dtype or torch.get_default_dtype()).itemsize
        return (self.parameters + self.buffers) * itemsize


def _spec_counts(config: ModelConfig) -> Counter[LayerSpec]:
    """How many layers of each kind, from one repetition of the pattern (never n_layer entries)."""
    tokens = pattern_tokens(config.layer_pattern)
    full, rest = divmod(config.n_layer, len(tokens))
    counts: Counter[LayerSpec] = Counter()
    for i, spec in enumerate(tokens):
        counts[spec] += full + (1 if i < rest else 0)
    return counts


def estimate_size(config: ModelConfig) -> SizeEstimate:
    """Parameters and buffer elements of ``LanguageModel(config)``, computed from ``config`` alone."""
    d, vocab = config.d_model, config.padded_vocab_size
    params = vocab * d + d + (0 if config.tie_embeddings else vocab * d)  # embedding, norm_f, head
    buffers = 0
    for spec, count in _spec_counts(config).items():
        mixer_params, mixer_buffers = _layer_size(config, spec.mixer)
        ff_params, ff_buffers = _layer_size(config, spec.ff) if spec.ff else (0, 0)
        block = d + mixer_params + (d + ff_params if spec.ff else 0)  # norm (+ ff_norm, ff)
        params += count * block
        buffers += count * (mixer_buffers + ff_buffers)
    for name in dict.fromkeys(n for spec in pattern_tokens(config.layer_pattern) for n in spec if n is not None):
        if registry.by_name(name).shared is not None:  # the module its layers share: held once by the model
            shared = _shared_module(config, name)
            params += sum(p.numel() for p in shared.parameters())
            buffers += sum(b.numel() for b in shared.buffers())
    return SizeEstimate(params, buffers)


def _layer_size(config: ModelConfig, name: str) -> tuple[int, int]:
    """(parameters, buffer elements) of one layer of kind ``name``: its registry entry's formula, or, for a
    kind without one, counted on a copy built on the meta device (shapes only, nothing allocated)."""
    kind = registry.by_name(name)
    settings = getattr(config, kind.section)
    if kind.size is not None:
        return kind.size(settings, config.d_model)
    shared = None if kind.shared is None else _shared_module(config, name)
    layer = kind.make(registry.BuildContext(d_model=config.d_model, settings=settings, layer_idx=0,
                                            norm_eps=config.norm_eps, factory={"device": torch.device("meta")},
                                            sections=config.sections, shared=shared))
    return sum(p.numel() for p in layer.parameters()), sum(b.numel() for b in layer.buffers())


def _shared_module(config: ModelConfig, name: str) -> torch.nn.Module:
    """The module that the layers of kind ``name`` share, built on the meta device (shapes only)."""
    kind = registry.by_name(name)
    return kind.shared(registry.BuildContext(d_model=config.d_model, settings=getattr(config, kind.section),
                                             layer_idx=-1, norm_eps=config.norm_eps,
                                             factory={"device": torch.device("meta")}, sections=config.sections))


def weights_limit(config: ModelConfig) -> int:
    """The most bytes the weight files of ``config`` can hold: every parameter and buffer at float64, plus
    64 MiB of file headers. Readers refuse larger files before reading them (a mismatched or hostile
    checkpoint would otherwise be read whole before the shapes are compared)."""
    size = estimate_size(config)
    return 8 * (size.parameters + size.buffers) + 64 * (1 << 20)


def memory_limit(device: torch.device | str | None) -> int | None:
    """The default limit on a model's bytes: ``SSMKIT_MAX_MODEL_BYTES`` if set, else the total memory of
    ``device`` (RAM for the CPU); None for the meta device or when the memory cannot be told."""
    override = os.environ.get(LIMIT_ENV)
    if override:
        return parse_bytes(override, LIMIT_ENV)
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type == "meta":
        return None
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None


def check_model_size(config: ModelConfig, *, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None, max_bytes: int | None = None, source: str = "config") -> int:
    """Raise :class:`ModelTooLargeError` when ``LanguageModel(config)`` would need more than ``max_bytes``
    (default :func:`memory_limit` of ``device``); return the estimated bytes. ``source`` names the config
    (a file) in the message."""
    size = estimate_size(config)
    nbytes = size.nbytes(dtype)
    limit = memory_limit(device) if max_bytes is None else max_bytes
    if limit is not None and nbytes > limit:
        name = str(dtype or torch.get_default_dtype()).removeprefix("torch.")
        where = "the max_bytes given" if max_bytes is not None else (
            LIMIT_ENV if os.environ.get(LIMIT_ENV) else f"the memory of the {torch.device(device or 'cpu').type} "
                                                        "device")
        raise ModelTooLargeError(
            f"{source}: this model would have {size.parameters:,} parameters ({_gb(nbytes)} in {name}: "
            f"vocab_size {config.vocab_size}, d_model {config.d_model}, n_layer {config.n_layer}), more than "
            f"{where} allows ({_gb(limit)}); check the config, or raise the limit with {LIMIT_ENV}=<bytes> "
            "if the machine really has the memory")
    return nbytes


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"
