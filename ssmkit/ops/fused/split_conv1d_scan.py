"""``mamba_split_conv1d_scan_combined``: Mamba-2's whole mixer after the input projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops._checks import Dims, check_choice, check_tensor
from ssmkit.ops.causal_conv1d import causal_conv1d_fn
from ssmkit.ops.fused._recompute import recomputed
from ssmkit.ops.norm import rmsnorm_fn
from ssmkit.ops.ssd import mamba_chunk_scan_combined


def mamba_split_conv1d_scan_combined(
    zxbcdt: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None,
    chunk_size: int,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    activation: str | None = "silu",
    rmsnorm_weight: torch.Tensor | None = None,
    rmsnorm_eps: float = 1e-6,
    outproj_weight: torch.Tensor | None = None,
    outproj_bias: torch.Tensor | None = None,
    headdim: int | None = None,
    ngroups: int = 1,
    norm_before_gate: bool = True,
    *,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Split, convolve, scan, gate/normalise and project, as mamba_ssm's function of this name.

    ``zxbcdt`` is split along its last dimension into ``[z0, x0 (d_nonssm each), z (dim),
    xBC (dim + 2·ngroups·dstate), dt (nheads)]``; then::

        xBC = act(causal_conv1d(xBC, conv1d_weight, conv1d_bias, seq_idx))      → x, B, C
        y   = SSD(x, softplus(dt + dt_bias) clamped to dt_limit, A, B, C, D, initial_states, seq_idx)
        y   = rmsnorm(y, z, rmsnorm_weight, groups of dim / ngroups, norm_before_gate)
              if rmsnorm_weight is given, else y · silu(z)
        out = [silu(z0) · x0, y] @ outproj_weightᵀ + outproj_bias   (each part optional)

    Args:
        zxbcdt: (b, l, 2·d_nonssm + 2·dim + 2·ngroups·dstate + nheads), dim = nheads·headdim.
        conv1d_weight: (dim + 2·ngroups·dstate, w); conv1d_bias: its (channels,) or None.
        dt_bias, A: (nheads,). D: (nheads,) (then ``headdim`` is required) or (nheads, headdim), or None.
        chunk_size: the SSD chunk length.
        initial_states: (b, nheads, headdim, dstate) SSM state before position 0 (the convolution
            starts from zeros, as mamba_ssm). seq_idx: (b, l) packed documents (both the convolution
            and the scan restart at each).
        dt_limit: clamp of Δ after softplus. return_final_states: also return the final SSM state.
        activation: the convolution's, None, "silu" or "swish".
        rmsnorm_weight: (dim,) gated RMSNorm weight, eps ``rmsnorm_eps``, or None (plain gate).
        outproj_weight: (out_dim, dim + d_nonssm) and outproj_bias (out_dim,), or None (no projection).
        headdim: needed when D is 1-D or None. ngroups: B/C groups. norm_before_gate: see above.
        backend: passed to every op ("reference": the float64-exact definition of each step).

    Returns:
        out (b, l, out_dim or dim + d_nonssm) in zxbcdt's dtype (the projection's, when given), or (out, final_states) with
        final_states (b, nheads, headdim, dstate) in float32 (float64 for float64 inputs).
        Differentiable in every tensor argument.

    Differences from mamba_ssm: D may be None (no skip connection), any convolution width works, and
    under autocast the output projection follows autocast's own rules (mamba_ssm casts it to the
    autocast GPU dtype by hand).
    """
    dims = Dims()
    check_tensor("zxbcdt", zxbcdt, ("b", "l", "width_in"), dims)
    check_tensor("conv1d_weight", conv1d_weight, ("conv_dim", "w"), dims)
    check_tensor("A", A, ("h",), dims)
    check_tensor("dt_bias", dt_bias, ("h",), dims)
    if D is not None and D.dim() == 2:
        check_tensor("D", D, ("h", "p"), dims)
        if headdim is not None and headdim != dims["p"]:
            raise ValueError(f"headdim={headdim} disagrees with D of shape {tuple(D.shape)}")
        headdim = dims["p"]
    elif D is not None:
        check_tensor("D", D, ("h",), dims)
    if isinstance(headdim, bool) or not isinstance(headdim, int) or headdim <= 0:
        raise ValueError(f"headdim must be a positive int when D is 1-D or None, got {headdim!r}")
    if isinstance(ngroups, bool) or not isinstance(ngroups, int) or ngroups <= 0 or dims["h"] % ngroups:
        raise ValueError(f"ngroups must be a positive divisor of nheads={dims['h']}, got {ngroups!r}")
    check_choice("activation", activation, (None, "silu", "swish"))
    nheads, dim = dims["h"], dims["h"] * headdim
    bc = dims["conv_dim"] - dim
    if bc <= 0 or bc % (2 * ngroups):
        raise ValueError(f"conv1d_weight has {dims['conv_dim']} channels: it must be dim ({dim}) + "
                         f"2·ngroups·dstate (ngroups={ngroups})")
    dstate = bc // (2 * ngroups)
    extra = dims["width_in"] - 2 * dim - 2 * ngroups * dstate - nheads
    if extra < 0 or extra % 2:
        raise ValueError(f"zxbcdt's last dimension {dims['width_in']} must be 2·d_nonssm + 2·dim ({2 * dim}) + "
                         f"2·ngroups·dstate ({2 * ngroups * dstate}) + nheads ({nheads})")
    d_nonssm = extra // 2
    if conv1d_bias is not None:
        check_tensor("conv1d_bias", conv1d_bias, ("conv_dim",), dims)
    if rmsnorm_weight is not None:
        dims["dim"] = dim
        check_tensor("rmsnorm_weight", rmsnorm_weight, ("dim",), dims)

    batch, length = dims["b"], dims["l"]
    gate_in_scan = rmsnorm_weight is None
    sizes = [2 * d_nonssm, dim, dim + 2 * ngroups * dstate, nheads]

    def prep(zxbcdt, conv1d_weight, conv1d_bias, *scan_params):
        """The cheap stage: the convolution, split into the contiguous pieces the scan reads."""
        _, z, xBC, dt = torch.split(zxbcdt, sizes, dim=-1)
        xBC = causal_conv1d_fn(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx, activation=activation,
                               backend=backend).transpose(1, 2)
        x, B, C = xBC.split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
        kept = (x.unflatten(-1, (nheads, headdim)).contiguous(), B.unflatten(-1, (ngroups, dstate)).contiguous(),
                C.unflatten(-1, (ngroups, dstate)).contiguous(), dt.contiguous())
        return (*kept, z.unflatten(-1, (nheads, headdim)).contiguous()) if gate_in_scan else kept

    def scan(kept, zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, initial_states):
        """The expensive stage: SSD (gated by silu(z) when there is no norm)."""
        x, B, C, dt = kept[:4]
        return mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D=D, z=kept[4] if gate_in_scan else None, dt_bias=dt_bias,
            initial_states=initial_states, seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit,
            return_final_states=True, backend=backend,
        )

    def finish(y, zxbcdt, rmsnorm_weight, *out_proj):
        """Gated norm and the non-SSM part: the output projection's input (b, l, d_nonssm + dim)."""
        y = y.reshape(batch, length, dim)
        zx0, z, _, _ = torch.split(zxbcdt, sizes, dim=-1)
        if not gate_in_scan:
            y = rmsnorm_fn(y, rmsnorm_weight, None, z, rmsnorm_eps, dim // ngroups, norm_before_gate,
                           backend=backend)
        if d_nonssm > 0:
            z0, x0 = zx0.chunk(2, dim=-1)
            y = torch.cat([F.silu(z0) * x0, y.to(zx0.dtype)], dim=-1)
        return y

    def project(kept, y, zxbcdt, rmsnorm_weight, outproj_weight, outproj_bias):
        return F.linear(kept[0], outproj_weight, outproj_bias)

    y, final_states = recomputed(prep, scan, (zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, initial_states))
    post = (y, zxbcdt, rmsnorm_weight, outproj_weight, outproj_bias)
    # Without a projection the norm's output is the result itself, so there is nothing to recompute.
    out = finish(*post) if outproj_weight is None else recomputed(finish, project, post)
    return (out, final_states) if return_final_states else out
