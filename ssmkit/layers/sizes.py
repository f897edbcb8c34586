"""Closed-form sizes of each built-in layer kind, for the layer registry: ``(parameters, buffer elements)``
of the layer that ``(settings, d_model)`` builds, computed without building it (tested exact against
built layers in tests/models/test_size.py). Used to refuse a model too big for memory before any tensor
is allocated (:mod:`ssmkit.models.size`)."""

from __future__ import annotations

import math
from typing import Any


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def mamba(m: Any, d: int) -> tuple[int, int]:
    """Mamba-1: in_proj, conv, x_proj, dt_proj, A_log, D, out_proj (+ inner norms)."""
    inner, n = m.expand * d, m.d_state
    rank = math.ceil(d / 16) if m.dt_rank == "auto" else m.dt_rank
    params = (_linear(d, 2 * inner, m.bias) + inner * m.d_conv + (inner if m.conv_bias else 0)
              + _linear(inner, rank + 2 * n, False) + _linear(rank, inner, True) + inner * n + inner
              + _linear(inner, d, m.bias))
    if m.inner_layernorms:
        return params + rank + 2 * n, 0
    return params, (rank + n if m.mixer_rms_eps is not None else 0)


def mamba2(m: Any, d: int) -> tuple[int, int]:
    """Mamba-2: in_proj, conv, dt_bias, A_log, D, gated norm, out_proj (buffer: in_proj's scales, if any)."""
    inner = m.expand * d if m.d_inner is None else m.d_inner
    heads, conv_dim = inner // m.headdim, inner + 2 * m.ngroups * m.d_state
    out_bias = m.bias if m.out_proj_bias is None else m.out_proj_bias
    params = (_linear(d, inner + conv_dim + heads, m.bias) + conv_dim * m.d_conv + (conv_dim if m.conv_bias else 0)
              + 2 * heads + (inner if m.D_has_hdim else heads) + (inner if m.rmsnorm else 0)
              + _linear(inner, d, out_bias))
    scaled = any(v != 1.0 for v in m.in_proj_multipliers)
    return params, (inner + conv_dim + heads if scaled else 0)


def mamba3(m: Any, d: int) -> tuple[int, int]:
    """Mamba-3 (no convolution), SISO or MIMO."""
    inner, n = m.expand * d, m.d_state
    heads, rank = inner // m.headdim, (m.mimo_rank if m.is_mimo else 1)
    angles = int(n * m.rope_fraction) // 2
    params = (d * (2 * inner + 2 * rank * m.ngroups * n + 3 * heads + angles) + heads + 2 * heads * rank * n + 2 * n
              + (3 * heads * rank * m.headdim if m.is_mimo else 0) + heads + (inner if m.is_outproj_norm else 0)
              + inner * d)
    return params, 0


def attention(a: Any, d: int) -> tuple[int, int]:
    """Attention: q, k, v, o projections (grouped-query k and v)."""
    kv = a.num_heads if a.num_heads_kv is None else a.num_heads_kv
    head_dim = d // a.num_heads if a.head_dim is None else a.head_dim
    q, k = a.num_heads * head_dim, kv * head_dim
    return _linear(d, q, a.bias) + 2 * _linear(d, k, a.bias) + _linear(q, d, a.bias), 0


def s4d(sub: Any, d: int) -> tuple[int, int]:
    """S4D: log_dt, D, A, B, C, out_proj."""
    return _s4_family(sub, d, "s4d")


def s4(sub: Any, d: int) -> tuple[int, int]:
    """S4: S4D's tensors plus the low-rank P."""
    return _s4_family(sub, d, "s4")


def _s4_family(sub: Any, d: int, kind: str) -> tuple[int, int]:
    n, channels = sub.d_state // 2, (2 if sub.bidirectional else 1)
    # log_dt, D (H); log_A_real, A_imag (H, n); B (H, n, 2); C (c, H, n, 2); out_proj Linear(H, 2H) with bias
    params = 2 * d + 2 * d * n + 2 * d * n + channels * d * n * 2 + _linear(d, 2 * d, True)
    if kind == "s4":
        low_rank = 2 if sub.measure == "legt" else 1
        params += low_rank * d * n * 2  # P (r, H, n, 2)
    return params, 0


def hyena(h: Any, d: int) -> tuple[int, int]:
    """Hyena: projections, short filter, implicit filter MLP (buffers: its positions and decays)."""
    width, channels, f = (h.order + 1) * d, (h.order - 1) * d, h.filter_order
    filter_mlp = (_linear(h.emb_dim, f, True) + h.num_inner_mlps * (f + _linear(f, f, True)) + f
                  + _linear(f, channels, False))
    params = (_linear(d, width, True) + width * h.short_filter_order + width + filter_mlp + channels
              + _linear(d, d, True))
    return params, h.l_max * (h.emb_dim + 1) + channels  # z (l_max, emb_dim), t (l_max, 1), deltas


def mlp(m: Any, d: int) -> tuple[int, int]:
    """SwiGLU MLP: gate, up, down."""
    return 2 * _linear(d, m.d_intermediate, m.bias) + _linear(m.d_intermediate, d, m.bias), 0


def moe(m: Any, d: int) -> tuple[int, int]:
    """Mixture of experts: router and every expert's SwiGLU."""
    return d * m.num_experts + m.num_experts * 3 * d * m.d_intermediate, 0
