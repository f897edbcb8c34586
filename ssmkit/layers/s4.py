"""S4 mixer: a diagonal-plus-low-rank (DPLR) SSM initialised from HiPPO, run as a long convolution.

Dimensions: ``b`` batch, ``l`` length, ``H`` d_model (one single-input single-output SSM per
channel), ``n`` = d_state / 2 stored states (one of each conjugate pair), ``r`` rank, ``N`` = d_state.

The layer of Gu et al. 2022 ("Efficiently Modeling Long Sequences with Structured State Spaces",
state-spaces/s4's ``SSMKernelDPLR`` + ``FFTConv``): ``A = Λ - P P*`` with ``Λ = -exp(log_A_real)
+ i A_imag`` and P from the HiPPO matrix's normal-plus-low-rank form, bilinear step
``Δ = exp(log_dt)``, and C learned as ``C̃ = C (I - Ā^L)*`` for the kernel length ``L = l_max``.
The kernel comes from Cauchy sums at the roots of unity (Algorithm 1), ``y = K * x + D x``, GELU, and
a position-wise ``Linear(H, 2H)`` + GLU.

Recurrent form (decode, and prefill with a cache): the same system as a real dense SSM of size N
(:func:`ssmkit.ops.lti.dplr_recurrence`, with ``C = C̃ (I - Ā^L)⁻¹``), so the token-by-token
outputs equal the convolution's. It is set up in float64 (O(H N³ log L)) and, outside autograd,
kept until a parameter changes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit.layers.configs import S4Config, layer_settings
from ssmkit.layers.norm import no_weight_decay
from ssmkit.layers.s4d import check_causal, log_dt_init
from ssmkit.layers.state import LayerState, at_least_fp32
from ssmkit.ops import lti

# Real parts of Λ are kept at or below this: LegT and Fourier have purely imaginary spectra, whose
# log would be -inf, and S4's recurrence needs I - Ā^L invertible.
_MIN_DECAY = 1e-4


@dataclasses.dataclass(eq=False)
class S4State(LayerState):
    """Decode state of one :class:`S4` layer: ssm (b, H, N), the real state of the dense recurrent
    form, float32 (float64 for float64 models)."""

    kind = "s4"
    ssm: torch.Tensor


class S4(nn.Module):
    """S4 sequence mixer (DPLR kernel) with a cache and a decode step, or bidirectional.

    Args:
        d_model: H. d_state: N (even). measure: the HiPPO matrix, ``"legs"`` (S4's default),
            ``"legt"`` or ``"fourier"``. l_max: kernel length L; parallel calls take at most l_max
            positions (decode steps have no limit). dt_min, dt_max: range of the initial Δ.
        bidirectional: add a kernel over the future (a second C), for non-causal tasks; such a layer
            has no state, cache or step.

    ``forward(x, *, seq_idx=None, initial_state=None, cache=None)``: x (b, l, H) -> (b, l, H), with
    the state semantics of :class:`ssmkit.layers.S4D`.

    Parameters: ``log_dt`` (H), ``log_A_real``, ``A_imag`` (H, n), ``P`` (r, H, n, 2), ``B`` (H, n, 2),
    ``C`` (c, H, n, 2) (C̃, c = 2 when bidirectional), ``D`` (H), ``out_proj``.

    Example::

        layer = S4(64, d_state=32, l_max=256)
        y = layer(torch.randn(2, 100, 64))
    """

    def __init__(self, d_model: int, config: S4Config | None = None, *, layer_idx: int | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None,
                 **settings: Any) -> None:
        super().__init__()
        self.config = config = layer_settings(S4Config, config, settings, "S4")
        d_state, measure, l_max, dt_min = config.d_state, config.measure, config.l_max, config.dt_min
        dt_max, bidirectional = config.dt_max, config.bidirectional
        if isinstance(l_max, bool) or not isinstance(l_max, int) or l_max < 1:
            raise ValueError(f"S4: l_max must be a positive int, got {l_max!r}")
        self.d_model, self.d_state, self.n, self.l_max = d_model, d_state, d_state // 2, l_max
        self.measure, self.bidirectional, self.layer_idx = measure, bidirectional, layer_idx
        Lambda, P, B, _ = lti.nplr(measure, d_state)
        pdtype = torch.promote_types(dtype or torch.float32, torch.float32)
        real = {"device": device, "dtype": pdtype}

        def per_channel(t: torch.Tensor) -> torch.Tensor:
            return t.unsqueeze(-2).expand(*t.shape[:-1], d_model, t.shape[-1])

        self.log_dt = nn.Parameter(log_dt_init(d_model, dt_min, dt_max, device).to(pdtype))
        self.log_A_real = nn.Parameter(torch.log((-Lambda.real).clamp(min=_MIN_DECAY)).to(**real).repeat(d_model, 1))
        self.A_imag = nn.Parameter(Lambda.imag.to(**real).repeat(d_model, 1))
        self.P = nn.Parameter(torch.view_as_real(per_channel(P).contiguous()).to(**real))
        self.B = nn.Parameter(torch.view_as_real(per_channel(B[None])[0].contiguous()).to(**real))
        channels = 2 if bidirectional else 1
        self.C = nn.Parameter(torch.randn(channels, d_model, self.n, 2, **real) * math.sqrt(0.5))
        self.D = nn.Parameter(torch.randn(d_model, **real))
        self.out_proj = nn.Linear(d_model, 2 * d_model, device=device, dtype=dtype)
        no_weight_decay(self.log_dt, self.log_A_real, self.A_imag, self.P, self.B, self.D)
        self._recurrence_key: tuple | None = None
        self._recurrence: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def dplr(self) -> tuple[torch.Tensor, ...]:
        """(Λ (H, n), P (r, H, n), B (H, n), C̃ (c, H, n), Δ (H,)): complex tensors at float32 or more."""
        A_real = -torch.exp(at_least_fp32(self.log_A_real)).clamp(min=_MIN_DECAY)
        Lambda = torch.complex(A_real, at_least_fp32(self.A_imag))
        P, B, C = (torch.view_as_complex(at_least_fp32(p).contiguous()) for p in (self.P, self.B, self.C))
        return Lambda, P, B, C, torch.exp(at_least_fp32(self.log_dt))

    def kernel(self, length: int) -> torch.Tensor:
        """The (c, H, length) convolution kernel, length <= l_max."""
        Lambda, P, B, C, dt = self.dplr()
        return lti.dplr_kernel(Lambda, P, B, C, dt, self.l_max)[..., :length]

    def recurrence(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The real dense form (Ā (H, N, N), B̄ (H, N), C (c, H, N)) in the parameters' dtype."""
        params = (self.log_dt, self.log_A_real, self.A_imag, self.P, self.B, self.C)
        key = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params)
        if not torch.is_grad_enabled() and key == self._recurrence_key:
            return self._recurrence
        # float64 set-up: Ā^L and (I - Ā^L)⁻¹ lose digits in float32 when Ā^L is near I.
        Lambda, P, B, C, dt = (t.to(torch.complex128 if t.is_complex() else torch.float64) for t in self.dplr())
        dtype = at_least_fp32(self.log_dt).dtype
        result = tuple(t.to(dtype) for t in lti.dplr_recurrence(Lambda, P, B, C, dt, self.l_max))
        if not torch.is_grad_enabled():
            self._recurrence_key, self._recurrence = key, result
        return result

    def allocate_state(self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None,
                       max_length: int | None = None) -> S4State:
        """A zero :class:`S4State` (float32, float64 when ``dtype`` or the layer is float64)."""
        check_causal(self._name(), self.bidirectional, True)
        dtype = torch.promote_types(torch.promote_types(dtype or self.out_proj.weight.dtype, self.log_dt.dtype),
                                    torch.float32)
        return S4State(ssm=torch.zeros(batch_size, self.d_model, self.d_state, dtype=dtype,
                                       device=device or self.log_dt.device))

    def forward(self, hidden_states: torch.Tensor, *, seq_idx: torch.Tensor | None = None,
                initial_state: S4State | None = None, cache: S4State | None = None) -> torch.Tensor:
        """hidden_states (b, l, H) -> (b, l, H); l <= l_max unless this is a one-token decode step."""
        if cache is not None and initial_state is not None:
            raise ValueError(f"{self._name()}: pass either cache (updated) or initial_state (read only), not both")
        state = cache if cache is not None else initial_state
        check_causal(self._name(), self.bidirectional, state)
        batch, length, _ = hidden_states.shape
        if state is not None:
            self._check_state(state, batch)
        D = at_least_fp32(self.D)
        if cache is not None and length == 1:
            A_bar, B_bar, C = self.recurrence()
            y = lti.lti_step(cache.ssm, hidden_states[:, 0], A_bar, B_bar, C[0], D)
            return self._output(y.unsqueeze(1))
        if length > self.l_max:
            raise ValueError(f"{self._name()}: the input has {length} positions but the kernel only l_max = "
                             f"{self.l_max}; build the layer with a larger l_max (decode steps have no limit)")
        u = hidden_states.transpose(1, 2)  # (b, H, l)
        K = self.kernel(length)
        if self.bidirectional:
            y = lti.fft_conv(u, K[0], D, kernel_rev=K[1], seq_idx=seq_idx)
        elif state is None:
            y = lti.fft_conv(u, K[0], D, seq_idx=seq_idx)
        else:
            A_bar, B_bar, C = self.recurrence()
            y = lti.lti_scan(u, A_bar, B_bar, C[0], D, initial_state=state.ssm.clone(), seq_idx=seq_idx,
                             return_final_state=cache is not None, kernel=K[0])
            if cache is not None:
                y, final = y
                cache.ssm.copy_(final.detach())
        return self._output(y.transpose(1, 2))

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        """GELU, then the position-wise Linear(H, 2H) + GLU: (b, l, H) -> (b, l, H) in the weights' dtype."""
        return F.glu(self.out_proj(F.gelu(y.to(self.out_proj.weight.dtype))), dim=-1)

    def _check_state(self, state: S4State, batch: int) -> None:
        if not isinstance(state, S4State):
            raise TypeError(f"{self._name()}: state must be an S4State, got {type(state).__name__}")
        state.check(self._name(), {"ssm": ((batch, self.d_model, self.d_state), None)})

    def _name(self) -> str:
        return "S4" if self.layer_idx is None else f"S4 (layer {self.layer_idx})"

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, measure={self.measure!r}, "
                f"l_max={self.l_max}, bidirectional={self.bidirectional}")
