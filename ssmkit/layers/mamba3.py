"""Mamba-3 mixer and its recurrent state.

Dimensions: ``b`` batch, ``l`` length, ``H`` d_model, ``I`` d_inner = expand·H, ``h`` nheads = I / p,
``p`` headdim, ``g`` ngroups, ``N`` d_state, ``R`` mimo_rank (1 without MIMO), ``a`` rotary angles.

The block (Mamba-3 paper, arXiv 2603.15569; mamba_ssm ``modules/mamba3.py``): one in-projection split
into [z, x, B, C, dd_dt, dd_A, trap, angles] with no short convolution; Δ = softplus(dd_dt + dt_bias),
a data-dependent A = -max(f(dd_A), A_floor) (f: :func:`decay_rate`'s ``activation``), λ = sigmoid(trap) for
the exponential-trapezoidal rule; B and C pass an RMSNorm over N and get per-head biases (initialised to 1); rotary angles shared by
the heads rotate a fraction ``rope_fraction`` of the state pairs; MIMO (``is_mimo``) gives B and C rank
R and projects x, z and the output with ``mimo_x``, ``mimo_z``, ``mimo_o``; the scan (skip D) is gated
by silu(z), or, with ``is_outproj_norm``, followed by a gated RMSNorm (norm before gate, one group per
head); then out_proj. Names, arguments and initialisation are mamba_ssm's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ssmkit.layers.configs import DECAY_ACTIVATIONS, Mamba3Config, layer_settings
from ssmkit.layers.mamba import dt_bias_init
from ssmkit.layers.norm import RMSNorm, RMSNormGated, no_weight_decay
from ssmkit.layers.state import LayerState
from ssmkit.ops.mamba3 import Mamba3ScanState, mamba3_scan, mamba3_step
from ssmkit.ops.mamba3.projected import mamba3_scan_from_projection
from ssmkit.ops.mamba3.step_sizes import decay_rate, dt_and_decay
from ssmkit.ops.norm import gated_rms_norm_fn

__all__ = ["DECAY_ACTIVATIONS", "Mamba3", "Mamba3State", "decay_rate"]

# Single-input layers hand the in-projection's raw slices to mamba3_scan_from_projection (Δ/A and the B/C norms made
# inside the SSD route's kernels); benchmarks/gpu_mamba3.py switches it off to time the unfolded route beside it.
FOLD_PROJECTION = True

@dataclasses.dataclass(eq=False)
class Mamba3State(LayerState):
    """Decode state of one :class:`Mamba3` layer (float32, float64 for float64 models).

    angle: (b, h, a) accumulated rotary angles; ssm: (b, h, p, N) the scan state; last_B: (b, R, h, N)
    the previous token's rotated, biased B; last_x: (b, h, p) the previous token's x. The last two feed
    the trapezoid's share of the previous step.
    """

    kind = "mamba3"
    angle: torch.Tensor
    ssm: torch.Tensor
    last_B: torch.Tensor
    last_x: torch.Tensor


class Mamba3(nn.Module):
    """Mamba-3 mixer with mamba_ssm's arguments and defaults.

    ``rope_fraction`` (0.5 or 1.0) is the share of the N state entries that rotate (a = ⌊N·fraction⌋ // 2
    angles, one per pair); ``decay_activation`` ("heavy_tail", mamba_ssm's main branch and new checkpoints, or
    "softplus", mamba_ssm 2.3.2: :func:`decay_rate`) maps dd_A to the decay rate and ``A_floor`` bounds it
    away from 0; ``is_mimo`` with ``mimo_rank``
    R turns on the multi-input multi-output update; ``is_outproj_norm`` adds a gated RMSNorm (eps
    ``norm_eps``) before out_proj. mamba_ssm pairs state entries (2i, 2i+1) without MIMO and
    (i, i + N/2) with it; so does this layer, so that its weights mean the same.

    ``forward(x, *, seq_idx=None, initial_state=None, cache=None)``: x (b, l, H) -> (b, l, H), with the
    state semantics of :class:`ssmkit.layers.Mamba` (``initial_state`` read only, ``cache`` updated in
    place; a one-token call with a cache is a decode step through :func:`ssmkit.ops.mamba3.mamba3_step`).

    Example::

        layer = Mamba3(d_model=64, d_state=32, headdim=16, is_mimo=True, mimo_rank=2)
        y = layer(torch.randn(2, 10, 64))
        state = layer.allocate_state(2)
        y0 = layer(torch.randn(2, 7, 64), cache=state)     # prefill
        y1 = layer(torch.randn(2, 1, 64), cache=state)     # one decode step
    """

    decode_graph_blocker = None
    """Its one-token step with a cache makes no host synchronisation and allocates nothing (CUDA graphs)."""

    def __init__(self, d_model: int, config: Mamba3Config | None = None, *, norm_eps: float = 1e-5,
                 layer_idx: int | None = None, device: torch.device | None = None,
                 dtype: torch.dtype | None = None, **settings: Any) -> None:
        super().__init__()
        self.config = config = layer_settings(Mamba3Config, config, settings, "Mamba3")
        d_state, expand, headdim, ngroups = config.d_state, config.expand, config.headdim, config.ngroups
        rope_fraction, dt_min, dt_max = config.rope_fraction, config.dt_min, config.dt_max
        dt_init_floor, A_floor, is_outproj_norm = config.dt_init_floor, config.A_floor, config.is_outproj_norm
        is_mimo, mimo_rank, chunk_size = config.is_mimo, config.mimo_rank, config.chunk_size
        decay_activation = config.decay_activation
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.expand = d_model, d_state, expand
        self.d_inner = int(expand * d_model)
        if self.d_inner % headdim:
            raise ValueError(f"Mamba3: headdim={headdim} must divide d_inner = expand * d_model = {self.d_inner}")
        self.headdim, self.nheads, self.ngroups = headdim, self.d_inner // headdim, ngroups
        if self.nheads % ngroups:
            raise ValueError(f"Mamba3: ngroups={ngroups} must divide nheads={self.nheads}")
        if rope_fraction not in (0.5, 1.0):
            raise ValueError(f"Mamba3: rope_fraction must be 0.5 or 1.0, got {rope_fraction}")
        self.num_rope_angles = int(d_state * rope_fraction) // 2
        if self.num_rope_angles < 1:
            raise ValueError(f"Mamba3: d_state={d_state} leaves no rotary pair at rope_fraction={rope_fraction}")
        if is_mimo and mimo_rank < 1:
            raise ValueError(f"Mamba3: mimo_rank must be >= 1, got {mimo_rank}")
        if decay_activation not in DECAY_ACTIVATIONS:
            raise ValueError(f"Mamba3: decay_activation must be one of {DECAY_ACTIVATIONS}, got {decay_activation!r}")
        self.rope_fraction, self.A_floor, self.chunk_size = rope_fraction, A_floor, chunk_size
        self.decay_activation = decay_activation
        self.is_mimo, self.is_outproj_norm, self.layer_idx = is_mimo, is_outproj_norm, layer_idx
        self.mimo_rank = mimo_rank if is_mimo else 1
        R, h, p, N = self.mimo_rank, self.nheads, headdim, d_state
        self.split_sizes = [self.d_inner, self.d_inner, R * ngroups * N, R * ngroups * N, h, h, h,
                            self.num_rope_angles]

        self.in_proj = nn.Linear(d_model, sum(self.split_sizes), bias=False, **factory)
        self.dt_bias = nn.Parameter(dt_bias_init(h, dt_min, dt_max, dt_init_floor, device=device))
        self.B_bias = nn.Parameter(torch.ones(h, R, N, device=device))
        self.C_bias = nn.Parameter(torch.ones(h, R, N, device=device))
        self.B_norm = RMSNorm(N, eps=norm_eps, **factory)
        self.C_norm = RMSNorm(N, eps=norm_eps, **factory)
        if is_mimo:
            self.mimo_x = nn.Parameter(torch.full((h, R, p), 1.0 / R, device=device))
            self.mimo_z = nn.Parameter(torch.ones(h, R, p, device=device))
            self.mimo_o = nn.Parameter(torch.full((h, R, p), 1.0 / R, device=device))
        self.D = nn.Parameter(torch.ones(h, device=device))
        if is_outproj_norm:
            self.norm = RMSNormGated(self.d_inner, eps=norm_eps, group_size=headdim, norm_before_gate=True, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False, **factory)
        no_weight_decay(self.dt_bias, self.D)

    def allocate_state(self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None,
                       max_length: int | None = None) -> Mamba3State:
        """A zero :class:`Mamba3State` in float32 (float64 when ``dtype``, default the weights', is float64)."""
        dtype = torch.promote_types(dtype or self.in_proj.weight.dtype, torch.float32)
        device = device or self.in_proj.weight.device
        b, h, p, N = batch_size, self.nheads, self.headdim, self.d_state
        return Mamba3State(
            angle=torch.zeros(b, h, self.num_rope_angles, dtype=dtype, device=device),
            ssm=torch.zeros(b, h, p, N, dtype=dtype, device=device),
            last_B=torch.zeros(b, self.mimo_rank, h, N, dtype=dtype, device=device),
            last_x=torch.zeros(b, h, p, dtype=dtype, device=device),
        )

    def forward(self, hidden_states: torch.Tensor, *, seq_idx: torch.Tensor | None = None,
                initial_state: Mamba3State | None = None, cache: Mamba3State | None = None) -> torch.Tensor:
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
        z, result = self._scan(hidden_states, seq_idx, state, return_final_state=cache is not None)
        if cache is not None:
            y, final = result
            cache.copy_(Mamba3State(**{k: v.detach() for k, v in final._asdict().items()}))
        else:
            y = result
        return self.out_proj(self._output(y, z))

    def _scan(self, u: torch.Tensor, seq_idx: torch.Tensor | None, state: Mamba3State | None,
              return_final_state: bool) -> tuple[torch.Tensor, Any]:
        """z (b, l, h, p) and the scan's result on u (b, l, H) (its output as :meth:`_output` takes it), with the
        final state when asked.

        Single-input layers hand the in-projection's raw slices to :func:`mamba3_scan_from_projection`, whose
        SSD route makes Δ, A and the B/C norms inside its kernels: at b8 L 2K a forward and backward launch 44
        kernels and build 28 autograd nodes, against 51 and 34 through :meth:`_project` then ``mamba3_scan``
        (benchmarks/RESULTS.md), at sizes where the layer is bound by the host. MIMO takes that second way.
        """
        initial_state = None if state is None else Mamba3ScanState(**state.tensors())
        if self.is_mimo or not FOLD_PROJECTION:
            z, inputs = self._project(u)
            result = mamba3_scan(**inputs, **self._scan_params(z), seq_idx=seq_idx, chunk_size=self.chunk_size,
                                 initial_state=initial_state, return_final_state=return_final_state)
            return z, result
        hp, gn = (self.nheads, self.headdim), (self.ngroups, self.d_state)
        z, x, B, C, dd_dt, dd_A, trap, angles = self.in_proj(u).split(self.split_sizes, -1)
        z = z.unflatten(-1, hp)
        return z, mamba3_scan_from_projection(
            x.unflatten(-1, hp), dd_dt, dd_A, B.unflatten(-1, gn), C.unflatten(-1, gn), trap, angles,
            dt_bias=self.dt_bias, A_floor=self.A_floor, decay_activation=self.decay_activation,
            B_norm_weight=self.B_norm.weight, C_norm_weight=self.C_norm.weight, B_norm_eps=self.B_norm.eps,
            C_norm_eps=self.C_norm.eps, D=self.D, z=None if self.is_outproj_norm else z, B_bias=self.B_bias,
            C_bias=self.C_bias, initial_state=initial_state, seq_idx=seq_idx, return_final_state=return_final_state,
            chunk_size=self.chunk_size,
        )

    def _step(self, hidden_states: torch.Tensor, state: Mamba3State) -> torch.Tensor:
        """One token: (b, 1, H) -> (b, 1, H), updating ``state`` in place."""
        z, inputs = self._project(hidden_states)
        params = self._scan_params(z)
        y = mamba3_step(
            Mamba3ScanState(**state.tensors()), **{k: v[:, 0] for k, v in inputs.items()},
            **{k: v[:, 0] if k == "z" and v is not None else v for k, v in params.items()},
        )
        return self.out_proj(self._output(y.unsqueeze(1), z))

    def _project(self, u: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """z (b, l, h, p) and the scan's per-token inputs from u (b, l, H)."""
        sizes = self.split_sizes
        # B and C lie side by side in the projection: one norm call takes both (a launch and an autograd node
        # fewer each way than B_norm and C_norm called apart), and B, C stay views of its output.
        z, x, BC, dd_dt, dd_A, trap, angles = self.in_proj(u).split(sizes[:2] + [sizes[2] + sizes[3]] + sizes[4:], -1)
        B, C = self._norm_BC(BC).unflatten(-1, (2, self.mimo_rank, self.ngroups, self.d_state)).unbind(-4)
        dt, A = dt_and_decay(dd_dt, dd_A, self.dt_bias, self.A_floor, self.decay_activation)
        inputs = {
            "x": x.unflatten(-1, (self.nheads, self.headdim)), "dt": dt, "A": A, "B": B, "C": C, "trap": trap,
            "angles": angles[:, :, None].expand(-1, -1, self.nheads, -1),
        }
        return z.unflatten(-1, (self.nheads, self.headdim)), inputs

    def _norm_BC(self, BC: torch.Tensor) -> torch.Tensor:
        """B_norm(B) and C_norm(C) of BC = [B | C] (b, l, 2·R·g·N) in one call: each N entries normalised apart
        (a group of the gated norm), with B_norm's weight over B's groups and C_norm's over C's."""
        Bw, Cw, eps = self.B_norm.weight, self.C_norm.weight, self.B_norm.eps
        if self.C_norm.eps != eps:  # two eps (set apart after construction): two calls
            B, C = BC.unflatten(-1, (2, -1, self.d_state)).unbind(-3)
            return torch.stack([self.B_norm(B), self.C_norm(C)], -3).flatten(-3)
        copies = self.mimo_rank * self.ngroups
        # One group: the concatenation's backward is two views (a repeat's would be a reduction each).
        weight = torch.cat([Bw, Cw] if copies == 1 else [Bw.repeat(copies), Cw.repeat(copies)])
        return gated_rms_norm_fn(BC, None, weight, eps=eps, group_size=self.d_state, norm_before_gate=True)

    def _scan_params(self, z: torch.Tensor) -> dict[str, torch.Tensor | bool | None]:
        """Keyword arguments of the scan besides the per-token inputs (the gate z when it is fused)."""
        mimo = {k: getattr(self, k) if self.is_mimo else None for k in ("mimo_x", "mimo_z", "mimo_o")}
        if self.is_outproj_norm:
            # The norm needs each rank's output: the gate and the down-projection come after it.
            mimo["mimo_o"] = None
        return dict(mimo, D=self.D, z=None if self.is_outproj_norm else z, B_bias=self.B_bias, C_bias=self.C_bias,
                    rotary_interleaved=not self.is_mimo)

    def _output(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(b, l, h, p) or, per rank, (b, l, R, h, p) scan output -> (b, l, I) input of out_proj."""
        if not self.is_outproj_norm:
            return y.flatten(-2) if y.dim() == 4 else y.flatten(-3)  # (b, l, 1, h, p): one view, not two
        if not self.is_mimo:
            return self.norm((y if y.dim() == 4 else y.squeeze(2)).flatten(-2), z.flatten(-2))
        zr = z[:, :, None] * self.mimo_z.transpose(0, 1).to(z.dtype)
        y = self.norm(y.flatten(-2), zr.flatten(-2)).unflatten(-1, (self.nheads, self.headdim))
        return (y * self.mimo_o.transpose(0, 1).to(y.dtype)).sum(dim=2).flatten(-2)

    def _check_state(self, state: Mamba3State, batch: int) -> None:
        if not isinstance(state, Mamba3State):
            raise TypeError(f"{self._name()}: state must be a Mamba3State, got {type(state).__name__}")
        h, p, N = self.nheads, self.headdim, self.d_state
        state.check(self._name(), {
            "angle": ((batch, h, self.num_rope_angles), None),
            "ssm": ((batch, h, p, N), None),
            "last_B": ((batch, self.mimo_rank, h, N), None),
            "last_x": ((batch, h, p), None),
        })

    def _name(self) -> str:
        return "Mamba3" if self.layer_idx is None else f"Mamba3 (layer {self.layer_idx})"

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, nheads={self.nheads}, headdim={self.headdim}, "
                f"ngroups={self.ngroups}, d_state={self.d_state}, rope_angles={self.num_rope_angles}, "
                f"mimo_rank={self.mimo_rank}, outproj_norm={self.is_outproj_norm}, chunk_size={self.chunk_size}, "
                f"decay_activation={self.decay_activation}")
