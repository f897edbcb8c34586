"""``mamba_inner_fn``: Mamba-1's whole mixer after the input projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops._checks import Dims, check_tensor
from ssmkit.ops.causal_conv1d import causal_conv1d_fn
from ssmkit.ops.fused._recompute import recomputed
from ssmkit.ops.norm import rms_norm_fn
from ssmkit.ops.selective_scan import selective_scan_fn


def mamba_inner_fn(
    xz: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    delta_proj_weight: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor | None = None,
    C: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    B_proj_bias: torch.Tensor | None = None,
    C_proj_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    checkpoint_lvl: int = 1,
    b_rms_weight: torch.Tensor | None = None,
    c_rms_weight: torch.Tensor | None = None,
    dt_rms_weight: torch.Tensor | None = None,
    b_c_dt_rms_eps: float = 1e-6,
    *,
    seq_idx: torch.Tensor | None = None,
    dt_rank_rms_weight: torch.Tensor | None = None,
    layout: str = "channel",
    backend: str = "auto",
) -> torch.Tensor:
    """Convolve, project, scan, gate and project out, as mamba_ssm's function of this name.

    With ``x, z = xz.chunk(2, dim=1)`` (R = delta rank, N = state size)::

        x  = silu(causal_conv1d(x, conv1d_weight, conv1d_bias, seq_idx))
        [dt (R), B (N), C (N)] = x_proj(x)                  (B, C only when not given; + B/C_proj_bias)
        dt ← RMSNorm by dt_rank_rms_weight, if given        (ssmkit: Jamba's / falcon_mamba's order)
        Δ  = delta_proj_weight @ dt                          (then RMSNorm by dt_rms_weight, if given)
        B, C ← RMSNorm by b_rms_weight / c_rms_weight (eps b_c_dt_rms_eps), if given
        y  = selective_scan(x, Δ, A, B, C, D, delta_bias, delta_softplus, seq_idx) · silu(z)
        out = y @ out_proj_weightᵀ + out_proj_bias

    Args:
        xz: (b, 2d, l). conv1d_weight: (d, 1, w) (an nn.Conv1d's weight) or (d, w); conv1d_bias: (d,).
        x_proj_weight: (R + 2N, d); delta_proj_weight: (d, R); out_proj_weight: (out, d);
        out_proj_bias: (out,) or None. A: (d, N) real.
        B, C: None (input-dependent, from x_proj) or a (b, N, l) / (b, g, N, l) tensor (normalised over N
            by b_rms_weight / c_rms_weight when given, as mamba_ssm does; the proj biases are x_proj's only).
        D, delta_bias: (d,). B_proj_bias, C_proj_bias: (N,). b_rms_weight, c_rms_weight: (N,);
        dt_rms_weight: (d,).
        checkpoint_lvl: 1 (default) keeps for the backward only xz, the scan's own state checkpoints
            and its (ungated) output, and recomputes the convolution, Δ, B, C and the gated output there
            (mamba_ssm's level 1); 0 keeps every intermediate (the plain composition of the ops).
        seq_idx: (b, l) integer document ids (ssmkit): the convolution and the scan restart where the
            id changes. dt_rank_rms_weight: (R,) RMSNorm of dt before delta_proj (ssmkit).
        layout: how Δ, B, C reach the scan (ssmkit). ``"channel"`` (default): x_proj and delta_proj as
            (b, l, ·) GEMMs, so Δ is a (b, d, l) view with unit stride along d and B, C strided views of
            x_proj's (b, l, R + 2N) output. ``"time"``: mamba_ssm's layout, both projections written as
            ``W @ x`` per batch, so Δ (b, d, l) is contiguous and B, C are (b, N, l) views of x_proj's
            (b, R + 2N, l) output, all with unit stride along time (what the time-wise scan kernels
            read coalesced). The same function either way; xz may have any strides in both (the
            convolution, hence u, keeps xz's layout: pass a time-contiguous xz for a time-contiguous u).
        backend: passed to every op ("reference": the float64-exact definition of each step).

    Returns:
        out (b, l, out) in the projections' dtype. Differentiable in every tensor argument (first order).

    Differences from mamba_ssm: complex A and time-invariant (d, N) B/C are refused (ssmkit's
    selective scan is real and input-dependent); under autocast the projections follow autocast's
    rules (mamba_ssm casts them to the autocast GPU dtype by hand); the gate multiplies the scan's
    output after it is rounded to x's dtype (mamba_ssm gates inside its kernel, in float32).
    """
    if not isinstance(xz, torch.Tensor) or xz.dim() != 3 or xz.shape[1] % 2:
        shape = tuple(xz.shape) if isinstance(xz, torch.Tensor) else type(xz).__name__
        raise ValueError(f"xz must have shape (b, 2d, l), got {shape}")
    if checkpoint_lvl not in (0, 1):
        raise ValueError(f"checkpoint_lvl must be 0 or 1, got {checkpoint_lvl!r}")
    if isinstance(A, torch.Tensor) and A.is_complex():
        raise TypeError("mamba_inner_fn: complex A is not supported (ssmkit's selective scan is real)")
    dims = Dims(d=xz.shape[1] // 2)
    weight = conv1d_weight.squeeze(1) if isinstance(conv1d_weight, torch.Tensor) and conv1d_weight.dim() == 3 \
        else conv1d_weight
    check_tensor("conv1d_weight", weight, ("d", "w"), dims)
    check_tensor("A", A, ("d", "n"), dims)
    check_tensor("delta_proj_weight", delta_proj_weight, ("d", "r"), dims)
    dims["r+2n"] = dims["r"] + 2 * dims["n"] if B is None and C is None else x_proj_weight.shape[0]
    check_tensor("x_proj_weight", x_proj_weight, ("r+2n", "d"), dims)
    check_tensor("out_proj_weight", out_proj_weight, ("out", "d"), dims)
    for name, t, shape in (("conv1d_bias", conv1d_bias, ("d",)), ("out_proj_bias", out_proj_bias, ("out",)),
                           ("D", D, ("d",)), ("delta_bias", delta_bias, ("d",)),
                           ("B_proj_bias", B_proj_bias, ("n",)), ("C_proj_bias", C_proj_bias, ("n",)),
                           ("b_rms_weight", b_rms_weight, ("n",)), ("c_rms_weight", c_rms_weight, ("n",)),
                           ("dt_rms_weight", dt_rms_weight, ("d",)),
                           ("dt_rank_rms_weight", dt_rank_rms_weight, ("r",))):
        if t is not None:
            check_tensor(name, t, shape, dims)
    for name, t in (("B", B), ("C", C)):
        if t is not None and t.dim() == 2:
            raise ValueError(f"{name} of shape (d, n) (time-invariant) is not supported; pass None "
                             "(input-dependent, from x_proj) or a (b, n, l) tensor")

    if layout not in ("channel", "time"):
        raise ValueError(f"layout must be 'channel' or 'time', got {layout!r}")
    rank, n = dims["r"], dims["n"]
    if seq_idx is not None:
        check_tensor("seq_idx", seq_idx, ("b", "l"), Dims(b=xz.shape[0], l=xz.shape[2]), floating=False,
                     integer=True)
    eps = b_c_dt_rms_eps

    def prep(xz, weight, conv1d_bias, x_proj_weight, delta_proj_weight, B, C, B_proj_bias, C_proj_bias,
             b_rms, c_rms, dt_rms, dt_rank_rms, *scan_params):
        """The cheap stage: convolution, x_proj, delta_proj, the optional norms -> x, Δ (b, d, l), B, C."""
        x = causal_conv1d_fn(xz[:, : xz.shape[1] // 2], weight, conv1d_bias, seq_idx, activation="silu",
                             backend=backend)
        if layout == "time":
            return (x, *_delta_B_C_timewise(x, x_proj_weight, delta_proj_weight, B, C, B_proj_bias, C_proj_bias,
                                            b_rms, c_rms, dt_rms, dt_rank_rms, rank, n, eps, backend))
        x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)  # (b, l, R + 2N)
        if B is None and C is None:
            # One split: its backward is one concatenation, where three slices cost a zero fill and a copy each.
            dt, B_raw, C_raw = x_dbl.split([rank, n, n], dim=-1)
        else:
            dt, B_raw, C_raw = x_dbl[..., :rank], x_dbl[..., rank : rank + n], x_dbl[..., x_dbl.shape[-1] - n :]
        if dt_rank_rms is not None:
            dt = rms_norm_fn(dt, dt_rank_rms, eps=eps, backend=backend)
        delta = dt @ delta_proj_weight.transpose(0, 1).to(x_dbl.dtype)  # (b, l, d)
        if dt_rms is not None:
            delta = rms_norm_fn(delta, dt_rms, eps=eps, backend=backend)
        B = _projected(B_raw, B_proj_bias, b_rms, eps, backend) if B is None else _normed_over_n(B, b_rms, eps, backend)
        C = _projected(C_raw, C_proj_bias, c_rms, eps, backend) if C is None else _normed_over_n(C, c_rms, eps, backend)
        return x, delta.transpose(1, 2), B, C

    def scan(kept, *tensors):
        """The expensive stage: the scan, ungated (the gate is recomputed before the output projection)."""
        x, delta, B, C = kept
        A, D, delta_bias = tensors[-3:]
        return selective_scan_fn(x, delta, A, B, C, D, None, delta_bias, delta_softplus, seq_idx=seq_idx,
                                 backend=backend)

    def gate(y, xz, out_proj_weight, out_proj_bias):
        # (b, d, l) in y's layout; the projection reads it as it lies (see out_projected).
        return y * F.silu(xz[:, xz.shape[1] // 2 :])

    def project(kept, y, xz, out_proj_weight, out_proj_bias):
        return out_projected(kept[0], out_proj_weight, out_proj_bias)

    tensors = (xz, weight, conv1d_bias, x_proj_weight, delta_proj_weight, B, C, B_proj_bias, C_proj_bias,
               b_rms_weight, c_rms_weight, dt_rms_weight, dt_rank_rms_weight, A, D, delta_bias)
    tail = (xz, out_proj_weight, out_proj_bias)
    if checkpoint_lvl == 0:
        y = scan(prep(*tensors), *tensors)
        return project((gate(y, *tail),), y, *tail)
    y = recomputed(prep, scan, tensors)
    return recomputed(gate, project, (y, *tail))


def out_projected(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The output projection of y (b, d, l), any strides: (b, l, out) contiguous, y never copied.

    Channel-contiguous y (a transposed (b, l, d) tensor) is one GEMM (``F.linear``, which then saves a view of
    it). Time-contiguous y (the time layout's) is one batched GEMM reading each row transposed, with the
    weight expanded: ``F.linear`` would copy y to (b, l, d) first (and keep the copy for the backward); the
    price is the weight's gradient as b partial products summed (b·out·d, where the copy is b·l·d)."""
    y_t = y.transpose(1, 2)  # (b, l, d)
    if y_t.is_contiguous():
        return F.linear(y_t, weight, bias)
    weight_t = _autocast_dtype(weight).t().expand(y.shape[0], -1, -1)
    return torch.bmm(y_t, weight_t) if bias is None else torch.baddbmm(bias, y_t, weight_t)


def per_batch_linear(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight @ x[i]`` for every batch row: weight (out, in), x (b, in, l) any strides -> (b, out, l) contiguous.

    One batched GEMM over the weight expanded (stride 0), reading x as it lies: ``torch.matmul`` would fold
    the batch into a 2-D GEMM through a transposed copy of x and another of the output."""
    return torch.bmm(_autocast_dtype(weight).expand(x.shape[0], -1, -1), x)


def _autocast_dtype(weight: torch.Tensor) -> torch.Tensor:
    """The weight in autocast's dtype where autocast is on for its device, cast before it is expanded: autocast's
    own cast of the expanded (stride 0) weight would write b copies of it."""
    device = weight.device.type
    if weight.is_floating_point() and torch.is_autocast_enabled(device):
        return weight.to(torch.get_autocast_dtype(device))
    return weight


def _delta_B_C_timewise(
    x: torch.Tensor, x_proj_weight: torch.Tensor, delta_proj_weight: torch.Tensor, B: torch.Tensor | None,
    C: torch.Tensor | None, B_proj_bias: torch.Tensor | None, C_proj_bias: torch.Tensor | None,
    b_rms: torch.Tensor | None, c_rms: torch.Tensor | None, dt_rms: torch.Tensor | None,
    dt_rank_rms: torch.Tensor | None, rank: int, n: int, eps: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Δ (b, d, l) contiguous and B, C (b, N, l) with unit time stride from x (b, d, l): mamba_ssm's layout.

    x_proj as one batched GEMM ``W_x @ x`` (x read as it lies, no transposed copy) gives (b, R + 2N, l),
    delta_proj as ``W_dt @ dt``. The norms run over their last dimension on transposed views; a normalised
    B, C or Δ comes back in the norm's (b, l, ·) layout and is copied to unit time stride (as mamba_ssm
    copies there)."""
    x_dbl = per_batch_linear(x_proj_weight, x)  # (b, R + 2N, l)
    if B is None and C is None:
        dt, B_raw, C_raw = x_dbl.split([rank, n, n], dim=1)
    else:
        dt, B_raw, C_raw = x_dbl[:, :rank], x_dbl[:, rank : rank + n], x_dbl[:, x_dbl.shape[1] - n :]
    if dt_rank_rms is not None:
        dt = rms_norm_fn(dt.transpose(1, 2), dt_rank_rms, eps=eps, backend=backend).transpose(1, 2)
    delta = per_batch_linear(delta_proj_weight.to(x_dbl.dtype), dt)  # (b, d, l) contiguous
    if dt_rms is not None:
        delta = rms_norm_fn(delta.transpose(1, 2), dt_rms, eps=eps, backend=backend).transpose(1, 2).contiguous()

    def timewise(t: torch.Tensor, bias: torch.Tensor | None, rms_weight: torch.Tensor | None) -> torch.Tensor:
        if bias is not None:
            t = t + bias.to(t.dtype)[:, None]
        if rms_weight is not None:
            t = rms_norm_fn(t.transpose(1, 2), rms_weight, eps=eps, backend=backend).transpose(1, 2).contiguous()
        return t

    B = timewise(B_raw, B_proj_bias, b_rms) if B is None else _normed_over_n(B, b_rms, eps, backend)
    C = timewise(C_raw, C_proj_bias, c_rms) if C is None else _normed_over_n(C, c_rms, eps, backend)
    return delta, B, C


def _projected(t: torch.Tensor, bias: torch.Tensor | None, rms_weight: torch.Tensor | None, eps: float,
               backend: str) -> torch.Tensor:
    """B or C (b, l, N) from x_proj's output: optional bias, optional RMSNorm, as (b, N, l)."""
    if bias is not None:
        t = t + bias.to(t.dtype)
    if rms_weight is not None:
        t = rms_norm_fn(t, rms_weight, eps=eps, backend=backend)
    return t.transpose(1, 2)


def _normed_over_n(t: torch.Tensor, rms_weight: torch.Tensor | None, eps: float, backend: str) -> torch.Tensor:
    """A given B or C (b, N, l) / (b, g, N, l), RMS-normalised over N when ``rms_weight`` is given."""
    if rms_weight is None:
        return t
    return rms_norm_fn(t.transpose(-1, -2), rms_weight, eps=eps, backend=backend).transpose(-1, -2)
