"""Single-input Mamba-3 from the in-projection's raw slices: Δ, A and the B/C norms folded into the route's kernels.

A Mamba-3 layer makes the scan's inputs from slices of one in-projection: Δ = softplus(dd_dt + dt_bias),
A = ``decay_rate(dd_A)``, B and C through RMS norms, the angle logits shared by the heads. Made apart (the layer's
``_project`` for ``mamba3_scan``) that is a norm kernel and a Δ/A kernel each way, each its own autograd node, at
sizes (b8, L 2K) where the layer is bound by the host launching kernels (issue 16). :func:`mamba3_scan_from_projection`
takes the slices instead: on the SSD route's Triton kernels (``via_ssd.py``) the step-weight kernel makes Δ and A
from dd_dt, dd_A and dt_bias (``triton_step_sizes.py``, RAW), the rotation kernel normalises B and C
(``triton_rotary.py``, NORM), and the angle logits are expanded over the heads inside the angles' node; as
mamba_ssm's Mamba3 module hands its raw projections to its kernels. Elsewhere (CPUs, float64, the reference
backend) it is that composition in PyTorch followed by :func:`~ssmkit.ops.mamba3.mamba3_scan`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ssmkit.ops._checks import Dims, check_nonempty, check_same_device, check_tensor
from ssmkit.ops._step_sizes import NO_LIMIT
from ssmkit.ops.backend import resolve_backend
from ssmkit.ops.chunking import check_chunk_size
from ssmkit.ops.mamba3 import Mamba3ScanState, mamba3_scan, via_ssd
from ssmkit.ops.mamba3.chunked import initial_G
from ssmkit.ops.mamba3.reference import rotate
from ssmkit.ops.mamba3.step_sizes import (
    DECAY_ACTIVATIONS,
    DecayActivation,
    dt_and_decay,
)
from ssmkit.ops.mamba3.via_ssd import _minus_ones, operand_dtype
from ssmkit.ops.ssd import SSDInputs, ssd_scan

__all__ = ["mamba3_scan_from_projection"]


def mamba3_scan_from_projection(
    x: torch.Tensor,
    dd_dt: torch.Tensor,
    dd_A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    trap: torch.Tensor,
    angles: torch.Tensor,
    *,
    dt_bias: torch.Tensor,
    A_floor: float,
    decay_activation: DecayActivation,
    B_norm_weight: torch.Tensor,
    C_norm_weight: torch.Tensor,
    B_norm_eps: float = 1e-5,
    C_norm_eps: float = 1e-5,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    B_bias: torch.Tensor | None = None,
    C_bias: torch.Tensor | None = None,
    rotary_interleaved: bool = True,
    initial_state: Mamba3ScanState | None = None,
    seq_idx: torch.Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, Mamba3ScanState]:
    """Single-input :func:`~ssmkit.ops.mamba3.mamba3_scan` of the in-projection's slices::

        mamba3_scan(x, softplus(dd_dt + dt_bias), decay_rate(dd_A, A_floor, decay_activation),
                    rms_norm(B) · B_norm_weight, rms_norm(C) · C_norm_weight, trap, angles expanded over the heads,
                    D=D, z=z, B_bias=B_bias, C_bias=C_bias, ...)[:, :, 0]

    with the norms taken over each group's n entries in float32 (float64 for float64 inputs) and not rounded to
    B's dtype (the fused kernels keep them in registers).

    Args:
        x, z: (b, l, h, p). dd_dt, dd_A, trap: (b, l, h). B, C: (b, l, g, n) before the norms. angles: (b, l, a),
            one set per token shared by the heads. All may be strided views of one projection's output.
        dt_bias: (h,). B_norm_weight, C_norm_weight: (n,). B_norm_eps, C_norm_eps: positive. D: (h,).
        B_bias, C_bias: (h, n), or (h, 1, n) as a rank-1 ``Mamba3`` layer stores them.
        A_floor, decay_activation, rotary_interleaved, initial_state (``last_B`` (b, 1, h, n)), seq_idx,
            return_final_state, chunk_size: as in ``mamba3_scan``.
        backend: ``"auto"`` (the fused route where ``mamba3_scan`` takes its SSD route's Triton kernels: CUDA, not
            float64; else the composition on ``mamba3_scan``'s choice), ``"triton"`` (the fused route; float64 or
            an odd n compose on ``mamba3_scan``'s triton route), ``"chunked"``, ``"reference"``.

    Returns:
        (b, l, h, p) in x's dtype, or ``(out, final_state)``. Every tensor input gets a gradient.
    """
    dims = _validate(locals())
    check_chunk_size(chunk_size)
    if isinstance(A_floor, bool) or not isinstance(A_floor, (int, float)) or not 0 <= A_floor < math.inf:
        raise ValueError(f"A_floor must be a finite non-negative number, got {A_floor!r}")
    if decay_activation not in DECAY_ACTIVATIONS:
        raise ValueError(f"decay_activation must be one of {DECAY_ACTIVATIONS}, got {decay_activation!r}")
    for name, eps in (("B_norm_eps", B_norm_eps), ("C_norm_eps", C_norm_eps)):
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"{name} must be a positive number, got {eps!r}")
    for name, flag in (("rotary_interleaved", rotary_interleaved), ("return_final_state", return_final_state)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    float64 = any(t is not None and t.dtype == torch.float64 for t in (
        x, dd_dt, dd_A, B, C, trap, angles, dt_bias, B_norm_weight, C_norm_weight, D, z, B_bias, C_bias,
        *(initial_state or ())))
    on_ssd_route = backend == "triton" or (backend == "auto" and not float64)
    resolved = resolve_backend(backend, dims.device, has_triton=on_ssd_route)
    if resolved == "triton" and not float64 and B.shape[-1] % 2 == 0:
        out, final = _fused(x, dd_dt, dd_A, B, C, trap, angles, dt_bias, float(A_floor),
                            decay_activation == "heavy_tail", (B_norm_weight, C_norm_weight, B_norm_eps, C_norm_eps),
                            D, z, B_bias, C_bias, rotary_interleaved, initial_state, seq_idx, chunk_size,
                            return_final_state)
        return (out, final) if return_final_state else out
    dt, A = dt_and_decay(dd_dt, dd_A, dt_bias, A_floor, decay_activation,
                         backend="triton" if resolved == "triton" else "chunked")
    dtype = torch.float64 if float64 else torch.float32
    h = x.shape[2]
    result = mamba3_scan(
        x, dt, A, _rms(B, B_norm_weight, B_norm_eps, dtype)[:, :, None],
        _rms(C, C_norm_weight, C_norm_eps, dtype)[:, :, None], trap, angles[:, :, None].expand(-1, -1, h, -1),
        D=D, z=z, B_bias=_rank_one(B_bias), C_bias=_rank_one(C_bias), rotary_interleaved=rotary_interleaved,
        initial_state=initial_state, seq_idx=seq_idx, return_final_state=return_final_state, chunk_size=chunk_size,
        backend=resolved,
    )
    # Rank 1: (b, l, 1, h, p) -> (b, l, h, p) by a view (a select's backward would be a fill and a copy).
    if return_final_state:
        return result[0].squeeze(2), result[1]
    return result.squeeze(2)


def _rms(v: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """v / rms(v) · weight over the last dimension, in ``dtype``."""
    v = v.to(dtype)
    return v * torch.rsqrt(v.square().mean(-1, keepdim=True) + eps) * weight.to(dtype)


def _rank_one(bias: torch.Tensor | None) -> torch.Tensor | None:
    return bias if bias is None or bias.dim() == 3 else bias[:, None]


def _fused(x, dd_dt, dd_A, B, C, trap, angles, dt_bias, A_floor, heavy_tail, norm, D, z, B_bias, C_bias,
           interleaved, initial_state, seq_idx, chunk_size, final_state):
    """The SSD route (``via_ssd.py``, rank 1) with Δ/A in the step-weight kernels and the norms in the rotation's."""
    # Imported here: `import ssmkit` must never import triton.
    from ssmkit.ops.mamba3.triton_output import output_triton
    from ssmkit.ops.mamba3.triton_rotary import rotate_bc_triton
    from ssmkit.ops.mamba3.triton_route_scalars import route_scalars_raw_triton

    h, n = x.shape[2], B.shape[-1]
    dtype = torch.float32
    ops = operand_dtype(x.dtype, dtype)
    init = None if initial_state is None else Mamba3ScanState(*(t.float() for t in initial_state))
    sdt, w, nxt, theta = route_scalars_raw_triton(dd_dt, dd_A, dt_bias, A_floor, heavy_tail, trap, angles, seq_idx,
                                                  None if init is None else init.angle)
    Bb, Cb = (torch.zeros(h, n, device=x.device) if v is None else v for v in (B_bias, C_bias))
    Bo, Co, CB = rotate_bc_triton(B, C, Bb, Cb, theta, interleaved, ops, norm)
    xo = x.to(ops).contiguous()  # once: the SSD op and the output kernel both read it contiguous
    G0 = None
    if init is not None:
        # δ_0 = (1 - λ_0) Δ_0, the first position's share of the carried (B̃, x), as the kernels make Δ.
        delta0 = (1 - torch.sigmoid(trap[:, 0].float())) * F.softplus(dd_dt[:, 0].float() + dt_bias.float())
        G0 = initial_G(init, x[:, :, None], delta0, None)
    # Built from checked inputs, valid by construction: the SSD op's own checks are not run again (host time).
    # via_ssd.SSD_CHUNK is read at call time (benchmarks patch it).
    y, G, _ = ssd_scan(SSDInputs(
        x=xo, dt=sdt, A=_minus_ones(h, dtype, x.device), B=Bo, C=Co,
        chunk_size=via_ssd.SSD_CHUNK or chunk_size, D=None, z=None, dt_bias=None, initial_states=G0, seq_idx=seq_idx,
        cu_seqlens=None, dt_softplus=False, dt_limit=NO_LIMIT, input_scale=w, device=x.device,
    ), backend="triton")
    out = output_triton(y, xo, z, nxt, CB, D).to(x.dtype)
    if not final_state:
        return out, None
    # The state's B̃ in float32 (the kernel's is rounded to the operand dtype): one position, in PyTorch.
    B_end = _rms(B[:, -1], norm[0], norm[2], dtype).repeat_interleave(h // B.shape[2], dim=1) + Bb.view(h, n)
    last_B = rotate(B_end, theta[:, -1], interleaved)[:, None]
    return out, Mamba3ScanState(theta[:, -1], G, last_B, x[:, -1].to(dtype))


# Each tensor argument's dimensions, in the order they are checked (the first to carry a dimension binds it).
_SHAPES = {
    "x": ("b", "l", "h", "p"), "z": ("b", "l", "h", "p"), "dd_dt": ("b", "l", "h"), "dd_A": ("b", "l", "h"),
    "trap": ("b", "l", "h"), "B": ("b", "l", "g", "n"), "C": ("b", "l", "g", "n"), "angles": ("b", "l", "a"),
    "dt_bias": ("h",), "D": ("h",), "B_norm_weight": ("n",), "C_norm_weight": ("n",),
}
_STATE_SHAPES = (("b", "h", "a"), ("b", "h", "p", "n"), ("b", "1", "h", "n"), ("b", "h", "p"))


def _validate(args: dict) -> Dims:
    """Check the shapes, kinds and devices of :func:`mamba3_scan_from_projection`'s tensors; the dims and device."""
    dims = Dims()
    for name, shape in _SHAPES.items():
        if args[name] is not None or name not in ("z", "D"):
            check_tensor(name, args[name], shape, dims)
    for name in ("B_bias", "C_bias"):
        if args[name] is not None:
            rank_one = isinstance(args[name], torch.Tensor) and args[name].dim() == 3
            check_tensor(name, args[name], ("h", "1", "n") if rank_one else ("h", "n"), dims)
    for name, what in (("b", "batch"), ("l", "length"), ("h", "heads"), ("p", "head dim"), ("g", "groups"),
                       ("n", "state")):
        check_nonempty("x" if name in "blhp" else "B", dims[name], f"{what} ({name})")
    if dims["h"] % dims["g"] != 0:
        raise ValueError(f"B and C: heads (h={dims['h']}) must be divisible by groups (g={dims['g']})")
    if dims["a"] > dims["n"] // 2:
        raise ValueError(f"angles: a={dims['a']} rotary angles need 2a <= n={dims['n']} state entries")
    tensors = {k: args[k] for k in (*_SHAPES, "B_bias", "C_bias", "seq_idx")}
    state = args["initial_state"]
    if state is not None:
        if not isinstance(state, tuple) or len(state) != 4:
            raise TypeError(f"initial_state must be a Mamba3ScanState (angle, ssm, last_B, last_x), "
                            f"got {type(state).__name__}")
        for field, t, shape in zip(Mamba3ScanState._fields, state, _STATE_SHAPES):
            check_tensor(f"initial_state.{field}", t, shape, dims)
            tensors[f"initial_state.{field}"] = t
    if args["seq_idx"] is not None:
        check_tensor("seq_idx", args["seq_idx"], ("b", "l"), dims, floating=False, integer=True)
    dims.device = check_same_device(**tensors)
    return dims
