"""S4D mixer: a diagonal, complex, time-invariant SSM per channel, run as a long convolution.

Dimensions: ``b`` batch, ``l`` length, ``H`` d_model (one single-input single-output SSM per
channel), ``n`` = d_state / 2 stored states (one of each conjugate pair).

The layer of Gu et al. 2022 ("On the Parameterization and Initialization of Diagonal State Space
Models", the standalone ``S4D`` of state-spaces/s4): ``A = -exp(log_A_real) + i A_imag``,
``Δ = exp(log_dt)``, zero-order hold (or bilinear), kernel ``K_k = 2 Re Σ_n C_n B̄_n Ā_n^k``, then
``y = K * x + D x``, GELU, and a position-wise ``Linear(H, 2H)`` + GLU. Trained as an FFT
convolution, run as a recurrence for decoding; with ``bidirectional`` a second C gives a kernel
over the future (S4's two-sided kernel) and the layer has no recurrent form.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit.layers.configs import S4DConfig, layer_settings
from ssmkit.layers.norm import no_weight_decay
from ssmkit.layers.state import LayerState, at_least_fp32
from ssmkit.ops import lti


@dataclasses.dataclass(eq=False)
class S4DState(LayerState):
    """Decode state of one :class:`S4D` layer: ssm (b, H, n, 2), the complex state as (real, imag)
    pairs in float32 (float64 for float64 models)."""

    kind = "s4d"
    ssm: torch.Tensor


def log_dt_init(d_model: int, dt_min: float, dt_max: float, device: torch.device | None) -> torch.Tensor:
    """log Δ ~ U(log dt_min, log dt_max), one per channel (S4's initialisation)."""
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"dt_min / dt_max must satisfy 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    u = torch.rand(d_model, device=device)
    return u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)


def check_causal(owner: str, bidirectional: bool, state: object) -> None:
    """Bidirectional layers read the future: they have no state, cache or step."""
    if bidirectional and state is not None:
        raise ValueError(f"{owner}: a bidirectional layer reads future positions, so it has no recurrent state, "
                         "cache or decode step; build it with bidirectional=False for causal use")


class S4D(nn.Module):
    """S4D sequence mixer with a cache and a decode step (causal) or a two-sided kernel (bidirectional).

    Args:
        d_model: H. d_state: state size N (even; N/2 complex states are stored).
        init: ``"lin"`` (S4D-Lin: imaginary parts πn), ``"inv"`` (S4D-Inv) or ``"legs"`` (diagonal of
            HiPPO-LegS, with its B). discretization: ``"zoh"`` or ``"bilinear"``.
        dt_min, dt_max: range of the initial steps Δ (log-uniform).
        bidirectional: add a kernel over the future (non-causal tasks); no cache or step then.

    ``forward(x, *, seq_idx=None, initial_state=None, cache=None)``: x (b, l, H) -> (b, l, H).
    ``seq_idx`` (b, l) restarts the state where it changes; ``initial_state`` is read, ``cache`` is
    read and updated in place, and a one-token call with a cache is a recurrent step.

    Parameters: ``log_dt`` (H), ``log_A_real``, ``A_imag`` (H, n), ``B`` (H, n, 2), ``C`` (c, H, n, 2)
    with c = 2 when bidirectional (complex numbers as (real, imag) pairs), ``D`` (H), ``out_proj``.

    Example::

        layer = S4D(64, d_state=32)
        y = layer(torch.randn(2, 100, 64))
    """

    def __init__(self, d_model: int, config: S4DConfig | None = None, *, layer_idx: int | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None,
                 **settings: Any) -> None:
        super().__init__()
        self.config = config = layer_settings(S4DConfig, config, settings, "S4D")
        d_state, init, discretization, dt_min = config.d_state, config.init, config.discretization, config.dt_min
        dt_max, bidirectional = config.dt_max, config.bidirectional
        if discretization not in ("zoh", "bilinear"):
            raise ValueError(f"S4D: discretization must be 'zoh' or 'bilinear', got {discretization!r}")
        self.d_model, self.d_state, self.n = d_model, d_state, d_state // 2
        self.init, self.discretization, self.bidirectional = init, discretization, bidirectional
        self.layer_idx = layer_idx
        Lambda, B = lti.s4d_init(init, d_state)
        pdtype = torch.promote_types(dtype or torch.float32, torch.float32)
        real = {"device": device, "dtype": pdtype}
        self.log_dt = nn.Parameter(log_dt_init(d_model, dt_min, dt_max, device).to(pdtype))
        self.log_A_real = nn.Parameter(torch.log(-Lambda.real).to(**real).repeat(d_model, 1))
        self.A_imag = nn.Parameter(Lambda.imag.to(**real).repeat(d_model, 1))
        self.B = nn.Parameter(torch.view_as_real(B).to(**real).repeat(d_model, 1, 1))
        channels = 2 if bidirectional else 1
        # S4D's C ~ N(0, 1) complex (variance 1/2 per part).
        self.C = nn.Parameter(torch.randn(channels, d_model, self.n, 2, **real) * math.sqrt(0.5))
        self.D = nn.Parameter(torch.randn(d_model, **real))
        self.out_proj = nn.Linear(d_model, 2 * d_model, device=device, dtype=dtype)
        no_weight_decay(self.log_dt, self.log_A_real, self.A_imag, self.B, self.D)

    def discrete_system(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Ā (H, n), B̄ (H, n), C (c, H, n)) complex, in float32 (float64 for a float64 layer)."""
        A = torch.complex(-torch.exp(at_least_fp32(self.log_A_real)), at_least_fp32(self.A_imag))
        B = torch.view_as_complex(at_least_fp32(self.B).contiguous())
        A_bar, B_bar, _ = lti.discretize(A, B, torch.exp(at_least_fp32(self.log_dt)), self.discretization)
        return A_bar, B_bar, torch.view_as_complex(at_least_fp32(self.C).contiguous())

    def allocate_state(self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None,
                       max_length: int | None = None) -> S4DState:
        """A zero :class:`S4DState` (float32, float64 when ``dtype`` or the layer is float64)."""
        check_causal(self._name(), self.bidirectional, True)
        dtype = torch.promote_types(torch.promote_types(dtype or self.out_proj.weight.dtype, self.log_dt.dtype),
                                    torch.float32)
        return S4DState(ssm=torch.zeros(batch_size, self.d_model, self.n, 2, dtype=dtype,
                                        device=device or self.log_dt.device))

    def forward(self, hidden_states: torch.Tensor, *, seq_idx: torch.Tensor | None = None,
                initial_state: S4DState | None = None, cache: S4DState | None = None) -> torch.Tensor:
        """hidden_states (b, l, H) -> (b, l, H)."""
        if cache is not None and initial_state is not None:
            raise ValueError(f"{self._name()}: pass either cache (updated) or initial_state (read only), not both")
        state = cache if cache is not None else initial_state
        check_causal(self._name(), self.bidirectional, state)
        if state is not None:
            self._check_state(state, hidden_states.shape[0])
        A_bar, B_bar, C = self.discrete_system()
        if cache is not None and hidden_states.shape[1] == 1:
            h = torch.view_as_complex(cache.ssm)
            y = lti.lti_step(h, hidden_states[:, 0], A_bar, B_bar, C[0], at_least_fp32(self.D))
            return self._output(y.unsqueeze(1))
        u = hidden_states.transpose(1, 2)  # (b, H, l)
        if self.bidirectional:
            K = lti.ssm_kernel(A_bar, B_bar, C, u.shape[-1])
            y = lti.fft_conv(u, K[0], at_least_fp32(self.D), kernel_rev=K[1], seq_idx=seq_idx)
        else:
            h0 = None if state is None else torch.view_as_complex(state.ssm.clone())
            result = lti.lti_scan(u, A_bar, B_bar, C[0], at_least_fp32(self.D), initial_state=h0, seq_idx=seq_idx,
                                  return_final_state=cache is not None)
            if cache is not None:
                y, final = result
                cache.ssm.copy_(torch.view_as_real(final).detach())
            else:
                y = result
        return self._output(y.transpose(1, 2))

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        """GELU, then the position-wise Linear(H, 2H) + GLU: (b, l, H) -> (b, l, H) in the weights' dtype."""
        y = F.gelu(y.to(self.out_proj.weight.dtype))
        return F.glu(self.out_proj(y), dim=-1)

    def _check_state(self, state: S4DState, batch: int) -> None:
        if not isinstance(state, S4DState):
            raise TypeError(f"{self._name()}: state must be an S4DState, got {type(state).__name__}")
        state.check(self._name(), {"ssm": ((batch, self.d_model, self.n, 2), None)})

    def _name(self) -> str:
        return "S4D" if self.layer_idx is None else f"S4D (layer {self.layer_idx})"

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, init={self.init!r}, "
                f"discretization={self.discretization!r}, bidirectional={self.bidirectional}")
