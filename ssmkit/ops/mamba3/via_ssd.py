"""Single-input Mamba-3 through the Mamba-2 SSD op: its Triton kernels serve Mamba-3 too.

``chunked.py`` rewrites the trapezoidal rule as an SSD recurrence with input weight w = γ + δ_next (per
head, the derivation is there)::

    G_t = α_t G_{t-1} + w_t x̃_t ⊗ B̃_t,      y_t = G_t C̃_t - δ_{t+1} (C̃_t·B̃_t) x̃_t

where the last term swaps w for γ on the diagonal. The SSD op computes H_t = e^{Δ'_t A'} H_{t-1} +
s_t x_t ⊗ B_t with its ``input_scale`` s apart from the decay step, so Δ' = -Δ A (any sign), A' = -1 and
s = w give G exactly, gradients included (no division couples the two). B̃ and C̃ carry their absolute
rotations (per head, hence one SSD group per head); the rotations need no per-pair term because C̃_t·B̃_s
holds the relative angle. MIMO (rank > 1) sums ranks inside a step, which the SSD form cannot express:
it stays with ``chunked``.
"""

from __future__ import annotations

import torch

from ssmkit.ops.mamba3.chunked import initial_G, next_share, rotated_BC
from ssmkit.ops.mamba3.reference import Mamba3ScanState, finish, prepare
from ssmkit.ops.ssd import mamba_chunk_scan_combined
from ssmkit.ops.ssd.reference import compute_dtype


def mamba3_via_ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    trap: torch.Tensor,
    angles: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    B_bias: torch.Tensor | None = None,
    C_bias: torch.Tensor | None = None,
    mimo_x: torch.Tensor | None = None,
    mimo_z: torch.Tensor | None = None,
    mimo_o: torch.Tensor | None = None,
    rotary_interleaved: bool = True,
    initial_state: Mamba3ScanState | None = None,
    seq_idx: torch.Tensor | None = None,
    *,
    ssd_backend: str = "auto",
) -> tuple[torch.Tensor, Mamba3ScanState]:
    """Mamba-3 of rank 1; same arguments and results as ``mamba3_reference`` (validated by the caller).

    ``ssd_backend``: the SSD op's backend ("triton" for its kernels; float64 takes "chunked").
    """
    if B.shape[2] != 1:
        raise ValueError(f"the SSD route computes single-input Mamba-3 (rank 1), got rank {B.shape[2]}; "
                         "use backend='chunked' for MIMO")
    h = x.shape[2]
    dtype = compute_dtype(x, dt, A, B, C, trap, angles, D, z, B_bias, C_bias, mimo_x, mimo_z, mimo_o,
                          *(initial_state or ()))
    init = None if initial_state is None else Mamba3ScanState(*(t.to(dtype) for t in initial_state))
    prep = prepare(x, dt, A, B, C, trap, angles, B_bias, C_bias, mimo_x, dtype)
    theta, Bt, Ct = rotated_BC(prep, seq_idx, init, rotary_interleaved)
    Bt, Ct = Bt[:, :, 0], Ct[:, :, 0]  # (b, l, h, n): rank 1
    xr = prep.xr[:, :, 0]  # (b, l, h, p)
    nxt = next_share(prep, seq_idx)
    G0 = None if init is None else initial_G(init, prep, mimo_x)
    y, G = mamba_chunk_scan_combined(
        xr, -prep.log_a, -torch.ones(h, dtype=dtype, device=x.device), Bt, Ct, chunk_size, initial_states=G0,
        seq_idx=seq_idx, return_final_states=True, input_scale=prep.gamma + nxt,
        backend="chunked" if dtype == torch.float64 else ssd_backend,
    )
    y = y - (nxt * (Ct * Bt).sum(-1))[..., None] * xr
    out = finish(y[:, :, None], prep.xr, D, z, mimo_z, mimo_o).to(x.dtype)
    return out, Mamba3ScanState(theta[:, -1], G, Bt[:, -1, None], x[:, -1].to(dtype))
