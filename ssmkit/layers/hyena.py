"""Hyena mixer: gated long convolutions whose filters come from a small network of the position.

Dimensions: ``b`` batch, ``l`` length, ``H`` d_model, ``o`` order (o - 1 long convolutions),
``w`` short filter width, ``W`` = l_max - 1 positions of long-convolution window, ``e`` emb_dim.

The Hyena operator of Poli et al. 2023 ("Hyena Hierarchy: Towards Larger Convolutional Language
Models", HazyResearch/safari's ``HyenaOperator``): an in-projection to o + 1 streams
``x_0, ..., x_(o-1), v``, a short causal depthwise convolution on all of them, then for
``i = o-1, ..., 1``: ``v ← h_i * (x_i ⊙ v) + bias_i ⊙ (x_i ⊙ v)`` (FFT convolution), and
``y = out_proj(x_0 ⊙ v)``. Each filter ``h_i`` (H, l_max) is implicit: sine features of the position
(:class:`HyenaFilter`) through an MLP with sine activations, times an exponential decay window.

Decoding: the filters are l_max long, so the cache keeps the last l_max - 1 inputs of each long
convolution (a fixed size however many tokens were read) beside the short convolution's window;
parallel calls of any length match step-by-step decoding exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from ssmkit import ops
from ssmkit.layers.configs import HyenaConfig, layer_settings
from ssmkit.layers.norm import no_weight_decay
from ssmkit.layers.state import LayerState, at_least_fp32, next_conv_state
from ssmkit.ops import lti


@dataclasses.dataclass(eq=False)
class HyenaState(LayerState):
    """Decode state of one :class:`Hyena` layer.

    conv: (b, (o + 1)·H, w) the short convolution's last inputs (the model's dtype);
    long: (b, (o - 1)·H, l_max - 1) the last inputs of each long convolution (float32, or float64).
    """

    kind = "hyena"
    conv: torch.Tensor
    long: torch.Tensor


class Sin(nn.Module):
    """``sin(freq · x)`` with a learned frequency per feature (safari's ``Sin``)."""

    def __init__(self, dim: int, w: float, device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.freq = nn.Parameter(torch.full((dim,), float(w), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class HyenaFilter(nn.Module):
    """Implicit long filters: (channels, l_max) from positional features, an MLP and a decay window.

    Features of position t < l_max: ``t / (l_max - 1)`` and ``cos, sin(2π f t / l_max)`` for
    ``(e - 1) / 2`` frequencies f in [1e-4, (e-1)/2 - 1]; the MLP is ``Linear(e, order)``, then
    ``num_inner_mlps`` × ``[Sin, Linear(order, order)]``, ``Sin``, ``Linear(order, channels)`` without
    bias; the window is ``exp(-t |δ_c|) + shift`` with decay rates δ spread so that the filters fall
    to ``target`` between fast_decay_pct and slow_decay_pct of the length. Each Sin has its own
    frequencies (safari shares one module; a shared tensor cannot be saved in safetensors).
    """

    def __init__(self, channels: int, l_max: int, *, emb_dim: int, filter_order: int, num_inner_mlps: int,
                 w: float, modulate: bool, fast_decay_pct: float, slow_decay_pct: float, target: float,
                 shift: float, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if emb_dim < 3 or emb_dim % 2 == 0:
            raise ValueError(f"Hyena: emb_dim must be odd and >= 3 (time plus cos/sin pairs), got {emb_dim}")
        factory = {"device": device, "dtype": dtype}
        self.modulate, self.shift = modulate, shift
        bands = (emb_dim - 1) // 2
        t = torch.linspace(0, 1, l_max, dtype=torch.float64)[:, None]
        angle = 2 * math.pi * torch.arange(l_max, dtype=torch.float64)[:, None] / l_max
        f = torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64)[None]
        z = torch.cat([t, torch.cos(f * angle), -torch.sin(f * angle)], dim=-1)  # Re, Im of exp(-i f angle)
        self.register_buffer("z", z.to(device=device, dtype=dtype or torch.float32), persistent=False)
        self.register_buffer("t", t.to(device=device, dtype=dtype or torch.float32), persistent=False)
        max_decay, min_decay = math.log(target) / fast_decay_pct, math.log(target) / slow_decay_pct
        deltas = torch.linspace(min_decay, max_decay, channels)
        self.register_buffer("deltas", deltas.to(device=device, dtype=dtype or torch.float32), persistent=False)
        layers: list[nn.Module] = [nn.Linear(emb_dim, filter_order, **factory)]
        for _ in range(num_inner_mlps):
            layers += [Sin(filter_order, w, **factory), nn.Linear(filter_order, filter_order, **factory)]
        layers += [Sin(filter_order, w, **factory), nn.Linear(filter_order, channels, bias=False, **factory)]
        self.implicit_filter = nn.Sequential(*layers)
        for layer in self.implicit_filter:
            if isinstance(layer, nn.Linear) and layer.bias is not None:
                # Keep PyTorch's bias initialisation (LanguageModel zeroes other Linear biases).
                layer.bias._no_reinit = True

    def forward(self) -> torch.Tensor:
        """The filters, (channels, l_max), float32 at least."""
        h = self.implicit_filter(at_least_fp32(self.z).to(self.implicit_filter[0].weight.dtype))
        h = at_least_fp32(h)
        if self.modulate:
            h = h * (torch.exp(-at_least_fp32(self.t) * at_least_fp32(self.deltas).abs()) + self.shift)
        return h.transpose(0, 1)


class Hyena(nn.Module):
    """Hyena long-convolution mixer (causal) with a cache and a decode step.

    Args:
        d_model: H. order: number of gates (o >= 2; o - 1 long convolutions). l_max: filter length
            (the longest dependency; inputs may be longer). filter_order, emb_dim, num_inner_mlps, w,
            modulate, fast_decay_pct, slow_decay_pct, target, shift: :class:`HyenaFilter`'s.
        short_filter_order: width of the short depthwise convolution.

    ``forward(x, *, seq_idx=None, initial_state=None, cache=None)``: x (b, l, H) -> (b, l, H) with
    the state semantics of :class:`ssmkit.layers.Mamba2` (``initial_state`` read, ``cache`` updated
    in place, a one-token call with a cache is a decode step; ``seq_idx`` restarts both
    convolutions where it changes).

    Parameters: ``in_proj`` (H -> (o+1)·H), ``short_filter`` (depthwise Conv1d), ``filter_fn.*``,
    ``filter_fn_bias`` ((o-1)·H, the skip term of the long convolutions), ``out_proj``.

    Example::

        layer = Hyena(64, l_max=256)
        y = layer(torch.randn(2, 100, 64))
    """

    def __init__(self, d_model: int, config: HyenaConfig | None = None, *, layer_idx: int | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None,
                 **settings: Any) -> None:
        super().__init__()
        self.config = config = layer_settings(HyenaConfig, config, settings, "Hyena")
        order, l_max, filter_order, emb_dim = config.order, config.l_max, config.filter_order, config.emb_dim
        short_filter_order, num_inner_mlps, w = config.short_filter_order, config.num_inner_mlps, config.w
        modulate, fast_decay_pct, slow_decay_pct = config.modulate, config.fast_decay_pct, config.slow_decay_pct
        target, shift = config.target, config.shift
        if order < 2:
            raise ValueError(f"Hyena: order must be >= 2, got {order}")
        if l_max < 2:
            raise ValueError(f"Hyena: l_max must be >= 2, got {l_max}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.order, self.l_max, self.layer_idx = d_model, order, l_max, layer_idx
        self.short_width = short_filter_order
        width = (order + 1) * d_model
        self.in_proj = nn.Linear(d_model, width, **factory)
        self.short_filter = nn.Conv1d(width, width, short_filter_order, groups=width,
                                      padding=short_filter_order - 1, **factory)
        self.filter_fn = HyenaFilter((order - 1) * d_model, l_max, emb_dim=emb_dim, filter_order=filter_order,
                                     num_inner_mlps=num_inner_mlps, w=w, modulate=modulate,
                                     fast_decay_pct=fast_decay_pct, slow_decay_pct=slow_decay_pct, target=target,
                                     shift=shift, **factory)
        self.filter_fn_bias = nn.Parameter(torch.randn((order - 1) * d_model, **factory))
        self.out_proj = nn.Linear(d_model, d_model, **factory)
        no_weight_decay(self.filter_fn_bias, self.short_filter.bias)

    def allocate_state(self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None,
                       max_length: int | None = None) -> HyenaState:
        """A zero :class:`HyenaState`: conv in ``dtype`` (default the weights'), long in float32 (or float64)."""
        dtype = dtype or self.in_proj.weight.dtype
        device = device or self.in_proj.weight.device
        return HyenaState(
            conv=torch.zeros(batch_size, (self.order + 1) * self.d_model, self.short_width, dtype=dtype, device=device),
            long=torch.zeros(batch_size, (self.order - 1) * self.d_model, self.l_max - 1, device=device,
                             dtype=torch.promote_types(dtype, torch.float32)),
        )

    def forward(self, hidden_states: torch.Tensor, *, seq_idx: torch.Tensor | None = None,
                initial_state: HyenaState | None = None, cache: HyenaState | None = None) -> torch.Tensor:
        """hidden_states (b, l, H) -> (b, l, H)."""
        if cache is not None and initial_state is not None:
            raise ValueError(f"{self._name()}: pass either cache (updated) or initial_state (read only), not both")
        state = cache if cache is not None else initial_state
        batch, length, H = hidden_states.shape
        if state is not None:
            self._check_state(state, batch)
        if cache is not None and torch.is_grad_enabled():
            # Autograd keeps the initial state for the backward pass; the cache is overwritten below.
            state = cache.clone()
        filters = self.filter_fn().unflatten(0, (self.order - 1, H))  # (o-1, H, l_max)
        bias = at_least_fp32(self.filter_fn_bias).unflatten(0, (self.order - 1, H))
        u = self.in_proj(hidden_states).transpose(1, 2)  # (b, (o+1)H, l)
        weight = self.short_filter.weight.squeeze(1)
        if cache is not None and length == 1:
            uc = ops.causal_conv1d_update(u[..., 0], cache.conv, weight, self.short_filter.bias).unsqueeze(-1)
        else:
            uc = ops.causal_conv1d_fn(u, weight, self.short_filter.bias, seq_idx=seq_idx,
                                      initial_states=None if state is None else state.conv[..., 1:].to(u.dtype))
            if cache is not None:
                cache.conv.copy_(next_conv_state(cache.conv, u, seq_idx).detach())
        *gates, v = uc.split(H, dim=1)
        for i, gate in enumerate(reversed(gates[1:])):
            v = v * gate
            rows = slice(i * H, (i + 1) * H)
            out = self._long_conv(v, filters[i], bias[i], None if state is None else state.long[:, rows], seq_idx)
            if cache is not None:
                cache.long[:, rows] = next_conv_state(cache.long[:, rows], v, seq_idx).detach()
            v = out
        y = (v * gates[0]).transpose(1, 2)
        return self.out_proj(y.to(self.out_proj.weight.dtype))

    def _long_conv(self, v: torch.Tensor, h: torch.Tensor, bias: torch.Tensor, window: torch.Tensor | None,
                   seq_idx: torch.Tensor | None) -> torch.Tensor:
        """h * v + bias ⊙ v, continuing ``window`` (b, H, W) (the previous inputs) when given."""
        if window is None:
            return lti.fft_conv(v, h, bias, seq_idx=seq_idx)
        W = window.shape[-1]
        full = torch.cat([window.to(v.dtype), v], dim=-1)
        if v.shape[-1] == 1:
            # Decode: one dot product with the reversed filter instead of an FFT of the window.
            past = torch.einsum("bhw,hw->bh", at_least_fp32(full), h.flip(-1)[:, : W + 1])
            return (past + bias * at_least_fp32(v[..., 0])).unsqueeze(-1).to(v.dtype)
        if seq_idx is not None:
            # The window belongs to the first document of each row.
            seq_idx = torch.cat([seq_idx[:, :1].expand(-1, W), seq_idx], dim=1)
        return lti.fft_conv(full, h, bias, seq_idx=seq_idx)[..., W:]

    def _check_state(self, state: HyenaState, batch: int) -> None:
        if not isinstance(state, HyenaState):
            raise TypeError(f"{self._name()}: state must be a HyenaState, got {type(state).__name__}")
        state.check(self._name(), {
            "conv": ((batch, (self.order + 1) * self.d_model, self.short_width), None),
            "long": ((batch, (self.order - 1) * self.d_model, self.l_max - 1), None),
        })

    def _name(self) -> str:
        return "Hyena" if self.layer_idx is None else f"Hyena (layer {self.layer_idx})"

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, order={self.order}, l_max={self.l_max}, short_filter_order={self.short_width}"
