"""Mamba-1 mixer (selective SSM block) and its recurrent state.

Dimensions: ``b`` batch, ``l`` length, ``H`` d_model, ``I`` d_inner = expand·H, ``N`` d_state,
``R`` dt_rank, ``w`` d_conv.

The block (Mamba paper, Figure 3): in-projection to x and gate z, causal depthwise convolution + SiLU on
x, input-dependent Δ, B, C from x, the selective scan (Algorithm 2) with skip D, gating by SiLU(z),
out-projection. Parameter names, arguments and initialisation follow mamba_ssm's ``Mamba``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit import ops
from ssmkit.layers.configs import MambaConfig, layer_settings
from ssmkit.layers.norm import RMSNorm, no_weight_decay
from ssmkit.layers.state import LayerState, at_least_fp32, next_conv_state, one_token
from ssmkit.ops import decode_launch, decode_step
from ssmkit.ops.fused.mamba_inner import out_projected, per_batch_linear

SCAN_LAYOUT = "auto"
"""How a multi-token forward of every :class:`Mamba` layer lays out the selective scan's inputs (read per call,
so a benchmark flips it with ``ssmkit.layers.mamba.SCAN_LAYOUT = "time"``). ``"auto"`` (default): ``"time"``
on CUDA, where the selective scan's time-wise Triton kernels read it coalesced (on an H100 at b8, d 2048, L 8192
the scan's fwd+bwd is 12.3 ms on time-contiguous inputs against 22.1 for the fused-state kernels on the channel
layout; benchmarks/RESULTS.md), ``"channel"`` elsewhere (the chunked CPU path's GEMMs). ``"channel"``:
``in_proj`` as a (b, l, ·) GEMM, so x, z and Δ are (b, I, l) views with unit stride along channels and B, C
strided views of x_proj's (b, l, R + 2N) output. ``"time"``: mamba_ssm's layer, ``in_proj`` written as
``W_in @ hᵀ`` (one GEMM, the same FLOPs) so xz (b, 2I, l), the convolution's output u, z, Δ, B and C have
unit stride along time, what the time-wise and chunk scan kernels read coalesced; x_proj and dt_proj are
then ``W @ x`` per batch. The same function either way; the one-token decode step ignores it."""


@dataclasses.dataclass(eq=False)
class MambaState(LayerState):
    """Decode state of one :class:`Mamba` layer.

    conv: (b, I, w) the last ``d_conv`` convolution inputs (the model's dtype);
    ssm: (b, I, N) the scan state (float32, float64 for float64 models).
    """

    kind = "mamba"
    conv: torch.Tensor
    ssm: torch.Tensor


def dt_bias_init(n: int, dt_min: float, dt_max: float, dt_init_floor: float, *,
                 device: torch.device | None = None) -> torch.Tensor:
    """Inverse softplus of Δ ~ exp(U(log dt_min, log dt_max)) floored at ``dt_init_floor``: (n,) float32."""
    dt = torch.exp(
        torch.rand(n, device=device, dtype=torch.float32) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    ).clamp(min=dt_init_floor)
    # softplus⁻¹(Δ) = Δ + log(1 - exp(-Δ)), written with expm1 for small Δ.
    return dt + torch.log(-torch.expm1(-dt))


def decode_A(layer: nn.Module) -> torch.Tensor:
    """``-exp(A_log)`` of a Mamba / Mamba-2 layer for its decode step, cached while ``A_log`` is unchanged.

    Without autograd the value is computed once and reused (keyed on the parameter's storage and version
    counter, which in-place updates such as optimizer steps or ``load_state_dict`` bump): two kernel
    launches fewer per layer and token, which matters when a step is a few microseconds per kernel.
    """
    A_log = layer.A_log
    if torch.is_grad_enabled():
        return -torch.exp(at_least_fp32(A_log))
    key = (A_log.data_ptr(), A_log._version, A_log.dtype, A_log.device)
    if getattr(layer, "_decode_A_key", None) != key:
        layer._decode_A = -torch.exp(at_least_fp32(A_log))
        layer._decode_A_key = key
    return layer._decode_A


def _has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run forward (pre-)hooks, its own or global ones."""
    return bool(module._forward_hooks or module._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


def _scan_layout(x: torch.Tensor) -> str:
    """``SCAN_LAYOUT`` for a forward of ``x`` ("auto" resolved by x's device)."""
    if SCAN_LAYOUT not in ("auto", "channel", "time"):
        raise ValueError(f"ssmkit.layers.mamba.SCAN_LAYOUT must be 'auto', 'channel' or 'time', got {SCAN_LAYOUT!r}")
    if SCAN_LAYOUT == "auto":
        return "time" if x.is_cuda else "channel"
    return SCAN_LAYOUT


class Mamba(nn.Module):
    """Mamba-1 mixer with mamba_ssm's arguments and defaults.

    ``mixer_rms_eps`` (falcon_mamba) adds weightless RMSNorms with that eps on dt (before ``dt_proj``),
    B and C. ``inner_layernorms`` (Jamba) adds learned RMSNorms ``dt_layernorm`` [R], ``b_layernorm`` [N],
    ``c_layernorm`` [N] at the same places, with eps ``mixer_rms_eps`` (1e-6 when None, transformers'
    Jamba ``rms_norm_eps``). ``layer_idx`` is informational (for repr and error messages).

    ``forward(x, *, seq_idx=None, initial_state=None, cache=None)``: x (b, l, H) -> (b, l, H).
    ``initial_state`` (a :class:`MambaState`) is read, never written; ``cache`` is read and updated in
    place to the state after ``x``. A one-token call with a cache takes the decode path
    (``selective_state_update``); longer calls go through the parallel ops with the state as initial
    state, so a cache can consume a prompt, or several tokens at a time from an existing state. A cache
    holds plain values (no autograd history); to differentiate through a state, pass it as
    ``initial_state``.

    Example::

        layer = Mamba(d_model=64)
        y = layer(torch.randn(2, 10, 64))
        state = layer.allocate_state(2)
        y0 = layer(torch.randn(2, 7, 64), cache=state)     # prefill
        y1 = layer(torch.randn(2, 1, 64), cache=state)     # one decode step
    """

    decode_graph_blocker = None
    """Its one-token step with a cache makes no host synchronisation and allocates nothing (CUDA graphs)."""

    def __init__(self, d_model: int, config: MambaConfig | None = None, *, layer_idx: int | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None,
                 **settings: Any) -> None:
        super().__init__()
        self.config = config = layer_settings(MambaConfig, config, settings, "Mamba")
        d_state, d_conv, expand, dt_rank = config.d_state, config.d_conv, config.expand, config.dt_rank
        dt_min, dt_max, dt_init, dt_scale = config.dt_min, config.dt_max, config.dt_init, config.dt_scale
        dt_init_floor, conv_bias, bias = config.dt_init_floor, config.conv_bias, config.bias
        mixer_rms_eps, inner_layernorms = config.mixer_rms_eps, config.inner_layernorms
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.mixer_rms_eps = mixer_rms_eps
        self.inner_layernorms = inner_layernorms
        self.layer_idx = layer_idx
        if inner_layernorms:
            eps = 1e-6 if mixer_rms_eps is None else mixer_rms_eps
            self.dt_layernorm = RMSNorm(self.dt_rank, eps=eps, **factory)
            self.b_layernorm = RMSNorm(d_state, eps=eps, **factory)
            self.c_layernorm = RMSNorm(d_state, eps=eps, **factory)
        elif mixer_rms_eps is not None:
            # Unit weights for the weightless norms on dt, B and C; buffers so they follow .to(), not saved.
            self.register_buffer("_unit_rank", torch.ones(self.dt_rank, **factory), persistent=False)
            self.register_buffer("_unit_state", torch.ones(d_state, **factory), persistent=False)

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)

        dt_init_std = self.dt_rank**-0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                nn.init.constant_(self.dt_proj.weight, dt_init_std)
            elif dt_init == "random":
                nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
            else:
                raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
            self.dt_proj.bias.copy_(dt_bias_init(self.d_inner, dt_min, dt_max, dt_init_floor, device=device))
        # The model-level init zeroes Linear biases; this one carries the Δ initialisation.
        self.dt_proj.bias._no_reinit = True

        # S4D-Real initialisation: A = -(1..N) for every channel, stored as log(-A).
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        no_weight_decay(self.A_log, self.D, self.dt_proj.bias, self.conv1d.bias, self.in_proj.bias,
                        self.out_proj.bias)

    def allocate_state(self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None,
                       max_length: int | None = None) -> MambaState:
        """A zero :class:`MambaState`: conv in ``dtype`` (default the weights'), ssm in float32 (or float64)."""
        dtype = dtype or self.in_proj.weight.dtype
        device = device or self.in_proj.weight.device
        return MambaState(
            conv=torch.zeros(batch_size, self.d_inner, self.d_conv, dtype=dtype, device=device),
            ssm=torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                            dtype=torch.promote_types(dtype, torch.float32)),
        )

    def forward(self, hidden_states: torch.Tensor, *, seq_idx: torch.Tensor | None = None,
                initial_state: MambaState | None = None, cache: MambaState | None = None) -> torch.Tensor:
        """hidden_states (b, l, H) -> (b, l, H); seq_idx (b, l) int restarts the state where it changes."""
        if cache is not None and initial_state is not None:
            raise ValueError(f"{self._name()}: pass either cache (updated) or initial_state (read only), not both")
        batch, length, _ = hidden_states.shape
        state = cache if cache is not None else initial_state
        if state is not None:
            self._check_state(state, batch)
        if cache is not None and length == 1:
            return self._step(hidden_states, cache)
        if cache is not None and torch.is_grad_enabled():
            # Autograd keeps the initial state for the backward pass; the cache is overwritten below.
            state = cache.clone()

        # The fused function takes no state, and one eps for the dt/B/C norms (Jamba norms of different eps
        # take the separate ops).
        if self.config.fused and state is None and self._norm_weights() is not None:
            return self._fused_forward(hidden_states, seq_idx)
        time = _scan_layout(hidden_states) == "time"
        x, z = self._xz(hidden_states, time).chunk(2, dim=1)  # (b, I, l) each
        conv_in = x
        x = ops.causal_conv1d_fn(
            x, self.conv1d.weight.squeeze(1), self.conv1d.bias, seq_idx=seq_idx,
            initial_states=None if state is None else state.conv[..., 1:].to(x.dtype), activation="silu",
        )
        if cache is not None:
            cache.conv.copy_(next_conv_state(cache.conv, conv_in, seq_idx).detach())
        if time:
            dt, B, C = self._dt_B_C_timewise(x)
        else:
            dt, B, C = (t.transpose(1, 2) for t in self._dt_B_C(x.transpose(1, 2)))
        result = ops.selective_scan_fn(
            x, dt, -torch.exp(at_least_fp32(self.A_log)), B, C,
            at_least_fp32(self.D), z=z, delta_bias=at_least_fp32(self.dt_proj.bias), delta_softplus=True,
            return_last_state=cache is not None, initial_state=None if state is None else state.ssm,
            seq_idx=seq_idx,
        )
        if cache is not None:
            y, last_state = result
            cache.ssm.copy_(last_state.detach())
        else:
            y = result
        if time and type(self.out_proj) is nn.Linear:
            return out_projected(y, self.out_proj.weight, self.out_proj.bias)  # reads y time-contiguous as it lies
        return self.out_proj(y.transpose(1, 2))

    def _fused_forward(self, hidden_states: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
        """The stateless whole-sequence forward through ``mamba_inner_fn``: the same function as the separate
        ops, keeping far less for the backward (see :mod:`ssmkit.ops.fused`)."""
        dt_w, b_w, c_w, eps = self._norm_weights()
        layout = _scan_layout(hidden_states)
        xz = self._xz(hidden_states, layout == "time")
        return ops.mamba_inner_fn(
            xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight, self.out_proj.weight,
            self.out_proj.bias, -torch.exp(at_least_fp32(self.A_log)), D=at_least_fp32(self.D),
            delta_bias=at_least_fp32(self.dt_proj.bias), delta_softplus=True, b_rms_weight=b_w, c_rms_weight=c_w,
            b_c_dt_rms_eps=eps, seq_idx=seq_idx, dt_rank_rms_weight=dt_w, layout=layout,
        )

    def _xz(self, hidden_states: torch.Tensor, time: bool) -> torch.Tensor:
        """``in_proj`` of (b, l, H) as xz (b, 2I, l): a transposed view of a (b, l, 2I) GEMM (channel layout),
        or, for the time layout, one GEMM ``W_in @ hᵀ`` (bias added in it) viewed as (b, 2I, l) with unit time
        stride, as mamba_ssm's layer. An in_proj that is not a plain Linear (quantized), or has forward hooks
        (its own or global ones, which the GEMM would skip on CUDA only, where "auto" picks this layout), keeps
        its own call; the rest of the time layout still applies."""
        if not time or type(self.in_proj) is not nn.Linear or _has_forward_hooks(self.in_proj):
            return self.in_proj(hidden_states).transpose(1, 2)
        b, length, d_model = hidden_states.shape
        h_t = hidden_states.reshape(b * length, d_model).t()
        weight, bias = self.in_proj.weight, self.in_proj.bias
        xz = weight @ h_t if bias is None else torch.addmm(bias.unsqueeze(1), weight, h_t)  # (2I, b·l)
        return xz.view(-1, b, length).transpose(0, 1)

    def step_from_residual(self, residual: torch.Tensor, norm: nn.Module, state: MambaState, *,
                           scale: float = 1.0) -> torch.Tensor:
        """One token of a pre-norm block: ``residual + scale * self(norm(residual))``, (b, 1, H) -> (b, 1, H).

        The same step as ``forward`` with a cache, with ``norm`` (the block's RMSNorm) fused into
        ``in_proj`` (:func:`ssmkit.ops.rms_norm_linear`; Triton at small batch on CUDA, the unfused ops
        otherwise). Mamba has no norm before ``out_proj``, so that and the residual add stay cuBLAS's.
        """
        self._check_state(state, residual.shape[0])
        r = one_token(residual, self._name())
        xz = ops.rms_norm_linear(r, norm.weight, self.in_proj.weight, self.in_proj.bias, eps=norm.eps)
        y = self._inner_step(xz, state)
        if scale == 1 and decode_launch.current().mamba1_out_gemv:
            # out_proj and the residual add in one GEMV kernel at small batch (the unfused ops otherwise).
            return ops.rms_norm_linear(y, None, self.out_proj.weight, self.out_proj.bias, residual=r).unsqueeze(1)
        if self.out_proj.bias is None and r.dtype == y.dtype == self.out_proj.weight.dtype:
            # out_proj and the residual add as one GEMM (r + scale · y Wᵀ); a float32 residual stream keeps the add.
            return torch.addmm(r, y, self.out_proj.weight.t(), alpha=scale).unsqueeze(1)
        out = self.out_proj(y)
        return (r + (out if scale == 1 else out * scale)).unsqueeze(1)

    def _step(self, hidden_states: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One token: (b, 1, H) -> (b, 1, H), updating ``state`` in place."""
        return self.out_proj(self._inner_step(self.in_proj(hidden_states[:, 0]), state)).unsqueeze(1)

    def _inner_step(self, xz: torch.Tensor, state: MambaState) -> torch.Tensor:
        """Convolution and gated SSM of one token from ``in_proj``'s output: (b, 2I) -> y (b, I).

        One kernel on CUDA at small batch (:func:`ssmkit.ops.decode_step.mamba_inner_step`); the separate
        ops otherwise, and always for Jamba norms of different eps (the fused step takes one eps).
        """
        norms = self._norm_weights()
        if norms is None:
            x, z = xz.chunk(2, dim=-1)  # (b, I)
            x = ops.causal_conv1d_update(x, state.conv, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                         activation="silu")
            dt, B, C = self._dt_B_C(x)
            return ops.selective_state_update(
                state.ssm, x, dt, decode_A(self), B, C, at_least_fp32(self.D), z=z,
                dt_bias=at_least_fp32(self.dt_proj.bias), dt_softplus=True,
            )
        dt_w, b_w, c_w, eps = norms
        # The step reads dt_proj's bias and D in their own dtypes (in float32): no cast kernels.
        return decode_step.mamba_inner_step(
            xz, state.conv, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
            self.dt_proj.bias, state.ssm, decode_A(self), self.D, dt_rms_weight=dt_w,
            b_rms_weight=b_w, c_rms_weight=c_w, rms_eps=eps, dt_softplus=True,
        )

    def _norm_weights(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, float] | None:
        """The dt, B, C RMSNorm weights (None: no norm) and their one eps; None when the norms' eps differ."""
        if self.inner_layernorms:
            norms = (self.dt_layernorm, self.b_layernorm, self.c_layernorm)
            if len({n.eps for n in norms}) != 1:
                return None
            return norms[0].weight, norms[1].weight, norms[2].weight, norms[0].eps
        if self.mixer_rms_eps is not None:
            return self._unit_rank, self._unit_state, self._unit_state, self.mixer_rms_eps
        return None, None, None, 1e-6

    def _dt_B_C(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (..., I) -> dt (..., I) before bias and softplus, B (..., N), C (..., N)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.inner_layernorms:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        elif self.mixer_rms_eps is not None:
            eps = self.mixer_rms_eps
            dt = ops.rms_norm_fn(dt, self._unit_rank, eps=eps)
            B, C = (ops.rms_norm_fn(t, self._unit_state, eps=eps) for t in (B, C))
        return F.linear(dt, self.dt_proj.weight), B, C

    def _dt_B_C_timewise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (b, I, l) -> Δ (b, I, l) before bias and softplus, B, C (b, N, l), all with unit time stride.

        ``_dt_B_C`` in mamba_ssm's layout: the projections as ``W @ x`` per batch; the norms (over their
        last dimension) on transposed views, a normalised B or C copied back to unit time stride."""
        if type(self.x_proj) is nn.Linear:
            x_dbl = per_batch_linear(self.x_proj.weight, x)  # (b, R + 2N, l)
        else:
            x_dbl = self.x_proj(x.transpose(1, 2)).transpose(1, 2).contiguous()
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=1)
        norms = None
        if self.inner_layernorms:
            norms = (self.dt_layernorm, self.b_layernorm, self.c_layernorm)
        elif self.mixer_rms_eps is not None:
            eps = self.mixer_rms_eps
            norms = (lambda t: ops.rms_norm_fn(t, self._unit_rank, eps=eps),
                     *(lambda t: ops.rms_norm_fn(t, self._unit_state, eps=eps),) * 2)
        if norms is not None:
            dt = norms[0](dt.transpose(1, 2)).transpose(1, 2)
            B, C = (norm(t.transpose(1, 2)).transpose(1, 2).contiguous() for norm, t in zip(norms[1:], (B, C)))
        return per_batch_linear(self.dt_proj.weight, dt), B, C

    def _check_state(self, state: MambaState, batch: int) -> None:
        if not isinstance(state, MambaState):
            raise TypeError(f"{self._name()}: state must be a MambaState, got {type(state).__name__}")
        state.check(self._name(), {
            "conv": ((batch, self.d_inner, self.d_conv), None),
            "ssm": ((batch, self.d_inner, self.d_state), None),
        })

    def _name(self) -> str:
        return "Mamba" if self.layer_idx is None else f"Mamba (layer {self.layer_idx})"

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"dt_rank={self.dt_rank}" + (f", mixer_rms_eps={self.mixer_rms_eps}" if self.mixer_rms_eps else "")
                + (", inner_layernorms=True" if self.inner_layernorms else ""))
