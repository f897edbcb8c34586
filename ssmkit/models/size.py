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

import math
import os
from collections import Counter
from dataclasses import dataclass

import torch

from ssmkit.files import parse_bytes
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


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _mamba(config: ModelConfig) -> tuple[int, int]:
    m, d = config.mamba, config.d_model
    inner, n = m.expand * d, m.d_state
    rank = math.ceil(d / 16) if m.dt_rank == "auto" else m.dt_rank
    params = (_linear(d, 2 * inner, m.bias) + inner * m.d_conv + (inner if m.conv_bias else 0)
              + _linear(inner, rank + 2 * n, False) + _linear(rank, inner, True) + inner * n + inner
              + _linear(inner, d, m.bias))
    if m.inner_layernorms:
        return params + rank + 2 * n, 0
    return params, (rank + n if m.mixer_rms_eps is not None else 0)


def _mamba2(config: ModelConfig) -> tuple[int, int]:
    m, d = config.mamba2, config.d_model
    inner = m.expand * d
    heads, conv_dim = inner // m.headdim, inner + 2 * m.ngroups * m.d_state
    params = (_linear(d, inner + conv_dim + heads, m.bias) + conv_dim * m.d_conv + (conv_dim if m.conv_bias else 0)
              + 2 * heads + (inner if m.D_has_hdim else heads) + (inner if m.rmsnorm else 0)
              + _linear(inner, d, m.bias))
    return params, 0


def _mamba3(config: ModelConfig) -> tuple[int, int]:
    m, d = config.mamba3, config.d_model
    inner, n = m.expand * d, m.d_state
    heads, rank = inner // m.headdim, (m.mimo_rank if m.is_mimo else 1)
    angles = int(n * m.rope_fraction) // 2
    params = (d * (2 * inner + 2 * rank * m.ngroups * n + 3 * heads + angles) + heads + 2 * heads * rank * n + 2 * n
              + (3 * heads * rank * m.headdim if m.is_mimo else 0) + heads + (inner if m.is_outproj_norm else 0)
              + inner * d)
    return params, 0


def _attention(config: ModelConfig) -> tuple[int, int]:
    a, d = config.attention, config.d_model
    kv = a.num_heads if a.num_heads_kv is None else a.num_heads_kv
    head_dim = d // a.num_heads if a.head_dim is None else a.head_dim
    q, k = a.num_heads * head_dim, kv * head_dim
    return _linear(d, q, a.bias) + 2 * _linear(d, k, a.bias) + _linear(q, d, a.bias), 0


def _s4_family(config: ModelConfig, kind: str) -> tuple[int, int]:
    sub, d = getattr(config, kind), config.d_model
    n, channels = sub.d_state // 2, (2 if sub.bidirectional else 1)
    # log_dt, D (H); log_A_real, A_imag (H, n); B (H, n, 2); C (c, H, n, 2); out_proj Linear(H, 2H) with bias
    params = 2 * d + 2 * d * n + 2 * d * n + channels * d * n * 2 + _linear(d, 2 * d, True)
    if kind == "s4":
        low_rank = 2 if sub.measure == "legt" else 1
        params += low_rank * d * n * 2  # P (r, H, n, 2)
    return params, 0


def _hyena(config: ModelConfig) -> tuple[int, int]:
    h, d = config.hyena, config.d_model
    width, channels, f = (h.order + 1) * d, (h.order - 1) * d, h.filter_order
    filter_mlp = (_linear(h.emb_dim, f, True) + h.num_inner_mlps * (f + _linear(f, f, True)) + f
                  + _linear(f, channels, False))
    params = (_linear(d, width, True) + width * h.short_filter_order + width + filter_mlp + channels
              + _linear(d, d, True))
    return params, h.l_max * (h.emb_dim + 1) + channels  # z (l_max, emb_dim), t (l_max, 1), deltas


_MIXERS = {
    "mamba": _mamba, "mamba2": _mamba2, "mamba3": _mamba3, "attention": _attention,
    "sliding_window_attention": _attention, "hyena": _hyena,
    "s4d": lambda c: _s4_family(c, "s4d"), "s4": lambda c: _s4_family(c, "s4"),
}


def _ff(config: ModelConfig, ff: str | None) -> int:
    d = config.d_model
    if ff == "mlp":
        return 3 * d * config.mlp.d_intermediate
    if ff == "moe":
        m = config.moe
        return d * m.num_experts + m.num_experts * 3 * d * m.d_intermediate
    return 0


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
        mixer_params, mixer_buffers = _MIXERS[spec.mixer](config)
        block = d + mixer_params + (d + _ff(config, spec.ff) if spec.ff else 0)  # norm (+ ff_norm, ff)
        params += count * block
        buffers += count * mixer_buffers
    return SizeEstimate(params, buffers)


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
