"""Mamba-2 mixer (SSD block) and its recurrent state.

Dimensions: ``b`` batch, ``l`` length, ``H`` d_model, ``I`` d_inner = expand·H (or the config's d_inner),
``h`` nheads = I / p, ``p`` headdim, ``g`` ngroups, ``N`` d_state, ``w`` d_conv, conv_dim = I + 2·g·N.

The block (Mamba-2 paper, "Transformers are SSMs", Figure 6): one in-projection to [z, xBC, dt], causal
depthwise convolution + SiLU on xBC (x, B and C together), the SSD scan with a scalar decay per head and
skip D, a gated RMSNorm with z, out-projection. Names, arguments and initialisation follow mamba_ssm's
``Mamba2`` (without its optional MLP part, d_ssm = d_inner).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch
from torch import nn

from ssmkit import ops
from ssmkit.layers.configs import Mamba2Config, layer_settings
from ssmkit.layers.mamba import decode_A, dt_bias_init
from ssmkit.layers.norm import RMSNormGated, no_weight_decay
from ssmkit.layers.state import LayerState, at_least_fp32, next_conv_state, one_token
from ssmkit.ops import decode_step


@dataclasses.dataclass(eq=False)
class Mamba2State(LayerState):
    """Decode state of one :class:`Mamba2` layer.

    conv: (b, conv_dim, w) the last ``d_conv`` convolution inputs (the model's dtype);
    ssm: (b, h, p, N) the scan state (float32, float64 for float64 models).
    """

    kind = "mamba2"
    conv: torch.Tensor
    ssm: torch.Tensor


class SequenceSplit(Protocol):
    """A sequence split across the ranks of a group (:class:`ssmkit.distributed.ContextParallel`): each rank
    passes its consecutive part, and the convolution and the scan take what enters it from earlier ranks."""

    def previous_rank_tail(self, x: torch.Tensor, width: int, seq_idx: torch.Tensor | None) -> torch.Tensor:
        """The last ``width`` positions (b, d, width) of ``x`` (b, d, l) on the previous rank."""

    def chunk_scan(self, *args: Any, **kwargs: Any) -> Any:
        """``ops.mamba_chunk_scan_combined`` over the whole split sequence."""


class Mamba2(nn.Module):
    """Mamba-2 mixer with mamba_ssm's arguments and defaults.

    ``rmsnorm=False`` drops the gated RMSNorm and gates the scan output with ``silu(z)`` directly;
    ``D_has_hdim`` gives D one value per channel instead of per head; ``dt_limit`` clamps Δ after the
    softplus. ``norm_eps`` is the gated RMSNorm's eps (mamba_ssm 1e-5; transformers uses the model's).
    Falcon-H1's options: ``d_inner`` sets the SSM's width apart from ``expand``, ``in_proj_multipliers`` scale
    the z, x, B, C and dt parts of ``in_proj``'s output (every path: parallel, step, fused step), and
    ``out_proj_bias`` gives ``out_proj`` a bias setting of its own.

    ``context_parallel`` (a :class:`SequenceSplit`, e.g. :class:`ssmkit.distributed.ContextParallel`) makes the
    layer read a sequence split across ranks: each rank passes its part; no cache or initial state then.

    ``forward(x, *, seq_idx=None, initial_state=None, cache=None)``: x (b, l, H) -> (b, l, H), with the
    same state semantics as :class:`ssmkit.layers.Mamba` (``initial_state`` read only, ``cache`` updated
    in place; a one-token call with a cache is a decode step).

    Example::

        layer = Mamba2(d_model=64, d_state=32, headdim=16)
        y = layer(torch.randn(2, 10, 64))
    """

    decode_graph_blocker = None
    """Its one-token step with a cache makes no host synchronisation and allocates nothing (CUDA graphs)."""

    def __init__(self, d_model: int, config: Mamba2Config | None = None, *, norm_eps: float = 1e-5,
                 context_parallel: SequenceSplit | None = None, layer_idx: int | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None,
                 **settings: Any) -> None:
        super().__init__()
        self.context_parallel = context_parallel
        self.config = config = layer_settings(Mamba2Config, config, settings, "Mamba2")
        d_state, d_conv, expand, headdim = config.d_state, config.d_conv, config.expand, config.headdim
        ngroups, chunk_size, dt_min, dt_max = config.ngroups, config.chunk_size, config.dt_min, config.dt_max
        dt_init_floor, dt_limit, A_init_range = config.dt_init_floor, config.dt_limit, config.A_init_range
        conv_bias, bias, norm_before_gate = config.conv_bias, config.bias, config.norm_before_gate
        rmsnorm, D_has_hdim = config.rmsnorm, config.D_has_hdim
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(config.inner_width(d_model))
        if self.d_inner % headdim:
            raise ValueError(f"Mamba2: headdim={headdim} must divide d_inner = {self.d_inner}")
        self.headdim, self.nheads, self.ngroups = headdim, self.d_inner // headdim, ngroups
        if self.nheads % ngroups:
            raise ValueError(f"Mamba2: ngroups={ngroups} must divide nheads={self.nheads}")
        self.dt_limit = tuple(float(v) for v in dt_limit)
        self.chunk_size, self.rmsnorm, self.D_has_hdim = chunk_size, rmsnorm, D_has_hdim
        self.layer_idx = layer_idx
        self.conv_dim = self.d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.dt_bias = nn.Parameter(dt_bias_init(self.nheads, dt_min, dt_max, dt_init_floor, device=device))
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner if D_has_hdim else self.nheads, device=device))
        if rmsnorm:
            self.norm = RMSNormGated(self.d_inner, eps=norm_eps, group_size=self.d_inner // ngroups,
                                     norm_before_gate=norm_before_gate, **factory)
        out_bias = bias if config.out_proj_bias is None else config.out_proj_bias
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=out_bias, **factory)
        no_weight_decay(self.dt_bias, self.A_log, self.D, self.conv1d.bias, self.in_proj.bias, self.out_proj.bias)
        scale = None
        if any(m != 1.0 for m in config.in_proj_multipliers):
            # One scale per in_proj output channel (z, x, B, C, dt), a buffer so that a step allocates nothing.
            widths = (self.d_inner, self.d_inner, ngroups * d_state, ngroups * d_state, self.nheads)
            scale = torch.cat([torch.full((w,), float(m), device=device, dtype=dtype)
                               for w, m in zip(widths, config.in_proj_multipliers)])
        self.register_buffer("in_proj_scale", scale, persistent=False)

    def allocate_state(self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None,
                       max_length: int | None = None) -> Mamba2State:
        """A zero :class:`Mamba2State`: conv in ``dtype`` (default the weights'), ssm in float32 (or float64)."""
        dtype = dtype or self.in_proj.weight.dtype
        device = device or self.in_proj.weight.device
        return Mamba2State(
            conv=torch.zeros(batch_size, self.conv_dim, self.d_conv, dtype=dtype, device=device),
            ssm=torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                            dtype=torch.promote_types(dtype, torch.float32)),
        )

    def forward(self, hidden_states: torch.Tensor, *, seq_idx: torch.Tensor | None = None,
                initial_state: Mamba2State | None = None, cache: Mamba2State | None = None) -> torch.Tensor:
        """hidden_states (b, l, H) -> (b, l, H); seq_idx (b, l) int restarts the state where it changes."""
        if cache is not None and initial_state is not None:
            raise ValueError(f"{self._name()}: pass either cache (updated) or initial_state (read only), not both")
        batch, length, _ = hidden_states.shape
        state = cache if cache is not None else initial_state
        split = self.context_parallel
        if split is not None and state is not None:
            raise ValueError(f"{self._name()}: a context-parallel layer reads a whole sequence split across ranks; "
                             "it takes no cache or initial_state (switch it off for decoding)")
        if state is not None:
            self._check_state(state, batch)
        if cache is not None and length == 1:
            return self._step(hidden_states, cache)
        if cache is not None and torch.is_grad_enabled():
            # Autograd keeps the initial state for the backward pass; the cache is overwritten below.
            state = cache.clone()

        if self.config.fused and state is None and split is None:
            # A context-parallel layer reads its convolution's and scan's entries from other ranks, which
            # the fused function has no argument for: it takes the separate ops below.
            return self._fused_forward(hidden_states, seq_idx)
        z, xBC, dt = self._scaled(self.in_proj(hidden_states)).split([self.d_inner, self.conv_dim, self.nheads],
                                                                      dim=-1)
        conv_in = xBC.transpose(1, 2)  # (b, conv_dim, l)
        conv_initial = None if state is None else state.conv[..., 1:].to(conv_in.dtype)
        scan = ops.mamba_chunk_scan_combined
        if split is not None:
            conv_initial = split.previous_rank_tail(conv_in, self.d_conv - 1, seq_idx)
            scan = split.chunk_scan
        xBC = ops.causal_conv1d_fn(
            conv_in, self.conv1d.weight.squeeze(1), self.conv1d.bias, seq_idx=seq_idx,
            initial_states=conv_initial, activation="silu",
        ).transpose(1, 2)
        if cache is not None:
            cache.conv.copy_(next_conv_state(cache.conv, conv_in, seq_idx).detach())
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        result = scan(
            x.unflatten(-1, (self.nheads, self.headdim)), dt, -torch.exp(at_least_fp32(self.A_log)),
            B.unflatten(-1, (self.ngroups, self.d_state)), C.unflatten(-1, (self.ngroups, self.d_state)),
            self.chunk_size, D=self._D(), z=None if self.rmsnorm else z.unflatten(-1, (self.nheads, self.headdim)),
            dt_bias=self.dt_bias, initial_states=None if state is None else state.ssm, seq_idx=seq_idx,
            dt_softplus=True, dt_limit=self.dt_limit, return_final_states=cache is not None,
        )
        if cache is not None:
            y, final_state = result
            cache.ssm.copy_(final_state.detach())
        else:
            y = result
        y = y.flatten(-2)
        if self.rmsnorm:
            y = self.norm(y, z)
        return self.out_proj(y)

    def _fused_forward(self, hidden_states: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
        """The stateless whole-sequence forward through ``mamba_split_conv1d_scan_combined``: the same function
        as the separate ops, keeping far less for the backward (see :mod:`ssmkit.ops.fused`)."""
        norm = self.norm if self.rmsnorm else None
        return ops.mamba_split_conv1d_scan_combined(
            self._scaled(self.in_proj(hidden_states)), self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias,
            -torch.exp(at_least_fp32(self.A_log)), self._D(), self.chunk_size, seq_idx=seq_idx,
            dt_limit=self.dt_limit, rmsnorm_weight=None if norm is None else norm.weight,
            rmsnorm_eps=1e-6 if norm is None else norm.eps, outproj_weight=self.out_proj.weight,
            outproj_bias=self.out_proj.bias, headdim=self.headdim, ngroups=self.ngroups,
            norm_before_gate=self.config.norm_before_gate,
        )

    def _step(self, hidden_states: torch.Tensor, state: Mamba2State) -> torch.Tensor:
        """One token: (b, 1, H) -> (b, 1, H), updating ``state`` in place."""
        y, z = self._scan_step(self._scaled(self.in_proj(hidden_states[:, 0])), state)
        if self.rmsnorm:
            y = self.norm(y, z)
        return self.out_proj(y).unsqueeze(1)

    def step_from_residual(self, residual: torch.Tensor, norm: nn.Module, state: Mamba2State) -> torch.Tensor:
        """One token of a pre-norm block: ``residual + self(norm(residual))``, (b, 1, H) -> (b, 1, H).

        The same step as ``forward`` with a cache, in fewer kernels: ``norm`` (the block's RMSNorm) is
        fused into ``in_proj``, and the gated norm, ``out_proj`` and the residual add into one
        (:func:`ssmkit.ops.rms_norm_linear`; Triton at small batch on CUDA, the unfused ops otherwise).
        """
        if self.context_parallel is not None:
            raise ValueError(f"{self._name()}: a context-parallel layer takes no cache (switch it off for decoding)")
        self._check_state(state, residual.shape[0])
        r = one_token(residual, self._name())
        zxbcdt = ops.rms_norm_linear(r, norm.weight, self.in_proj.weight, self.in_proj.bias, eps=norm.eps)
        y, z = self._scan_step(self._scaled(zxbcdt), state)
        if not self.rmsnorm:
            return (r + self.out_proj(y)).unsqueeze(1)
        out = ops.rms_norm_linear(y, self.norm.weight, self.out_proj.weight, self.out_proj.bias, z=z,
                                  eps=self.norm.eps, group_size=self.norm.group_size,
                                  norm_before_gate=self.norm.norm_before_gate, residual=r)
        return out.unsqueeze(1)

    def _scan_step(self, zxbcdt: torch.Tensor, state: Mamba2State) -> tuple[torch.Tensor, torch.Tensor]:
        """Convolution and SSM of one token from ``in_proj``'s output (b, ·): y (b, d_inner) and the gate z."""
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        # One kernel on CUDA at small batch (the convolution update folded into the state update); the
        # separate conv and state updates otherwise.
        y = decode_step.conv1d_selective_state_update(
            xBC, state.conv, self.conv1d.weight.squeeze(1), self.conv1d.bias, state.ssm, dt, decode_A(self),
            self._D(), z=None if self.rmsnorm else z.unflatten(-1, (self.nheads, self.headdim)), dt_bias=self.dt_bias,
            ngroups=self.ngroups, dt_softplus=True, dt_limit=self.dt_limit,
        ).flatten(-2)
        return y, z

    def _scaled(self, zxbcdt: torch.Tensor) -> torch.Tensor:
        """in_proj's output (..., 2·I + 2·g·N + h) times ``in_proj_multipliers`` per part (when any is not 1)."""
        if self.in_proj_scale is None:
            return zxbcdt
        return zxbcdt * self.in_proj_scale.to(zxbcdt.dtype)

    def _D(self) -> torch.Tensor:
        return self.D.unflatten(0, (self.nheads, self.headdim)) if self.D_has_hdim else self.D

    def _check_state(self, state: Mamba2State, batch: int) -> None:
        if not isinstance(state, Mamba2State):
            raise TypeError(f"{self._name()}: state must be a Mamba2State, got {type(state).__name__}")
        state.check(self._name(), {
            "conv": ((batch, self.conv_dim, self.d_conv), None),
            "ssm": ((batch, self.nheads, self.headdim, self.d_state), None),
        })

    def _name(self) -> str:
        return "Mamba2" if self.layer_idx is None else f"Mamba2 (layer {self.layer_idx})"

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, nheads={self.nheads}, headdim={self.headdim}, "
                f"ngroups={self.ngroups}, d_state={self.d_state}, d_conv={self.d_conv}, chunk_size={self.chunk_size}")
