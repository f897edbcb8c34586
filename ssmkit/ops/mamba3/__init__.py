"""Mamba-3 scan (exponential-trapezoidal rule, rotary complex state, MIMO) and its one-token decode step.

Backends: ``reference`` (token-by-token recurrence, the definition), ``chunked`` (the trapezoidal
rule rewritten as an SSD scan with a modified input, see ``chunked.py``; fast on CPU, any device) and
``triton`` (the same rewrite handed to the Mamba-2 SSD op's Triton kernels, ``via_ssd.py``; MIMO as r
sub-steps per position).
The arguments are those of mamba_ssm's ``mamba3_siso_combined`` / ``mamba3_mimo`` kernels (B, C as
their K, Q; x as V), with ssmkit's ``seq_idx`` for packed documents and a differentiable initial state.
"""

from __future__ import annotations

import functools

import torch

from ssmkit.ops._checks import Dims, check_nonempty, check_same_device, check_tensor
from ssmkit.ops.backend import resolve_backend
from ssmkit.ops.chunking import check_chunk_size
from ssmkit.ops.mamba3.chunked import mamba3_chunked
from ssmkit.ops.mamba3.inputs import Mamba3Inputs
from ssmkit.ops.mamba3.reference import Mamba3ScanState, mamba3_reference
from ssmkit.ops.mamba3.via_ssd import mamba3_via_ssd

__all__ = ["Mamba3Inputs", "Mamba3ScanState", "mamba3_scan", "mamba3_step"]

_BACKENDS = {"reference": mamba3_reference, "chunked": mamba3_chunked}


def mamba3_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    trap: torch.Tensor,
    angles: torch.Tensor,
    *,
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
    return_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, Mamba3ScanState]:
    """Mamba-3 selective SSM over a sequence (Mamba-3 paper, arXiv 2603.15569), per head::

        λ = sigmoid(trap),  α = exp(Δ A),  β_t = (1 - λ_t) Δ_t α_t,  γ_t = λ_t Δ_t
        θ_t = θ_{t-1} + Δ_t π tanh(angles_t)             B̃, C̃ = rotations by θ_t of B + B_bias, C + C_bias
        H_t = α_t H_{t-1} + β_t Σ_r x̃_{t-1,r} ⊗ B̃_{t-1,r} + γ_t Σ_r x̃_{t,r} ⊗ B̃_{t,r},   x̃_r = x ⊙ mimo_x_r
        y_{t,r} = (H_t C̃_{t,r} + D x̃_{t,r}) · silu(z_t ⊙ mimo_z_r),    out_t = Σ_r mimo_o_r ⊙ y_{t,r}

    (``ssmkit/ops/mamba3/reference.py`` spells it out). λ = 1 and zero angles give Mamba-2's update.

    Args:
        x: (b, l, h, p) input (mamba_ssm's V). Its dtype is the output's dtype.
        dt: (b, l, h) step sizes Δ, already positive (e.g. ``softplus(dd_dt + dt_bias)``).
        A: (b, l, h) data-dependent decay rates (negative for a stable SSM).
        B, C: (b, l, r, g, n) input and output projections of MIMO rank r (r = 1: single input);
            ``h % g == 0``, head i uses group ``i // (h // g)``.
        trap: (b, l, h) trapezoid logits, λ = sigmoid(trap) (λ = 1: Euler, λ = 1/2: trapezoid).
        angles: (b, l, h, a) rotary angle logits, ``a <= n // 2``; the angle advances by
            ``Δ π tanh(angles)`` per step. State pairs past ``a`` are not rotated.
        D: (h,) skip. z: (b, l, h, p) gate. B_bias, C_bias: (h, r, n) per-head biases added before the
            rotation. mimo_x, mimo_z, mimo_o: (h, r, p) MIMO up-projections of x and z and the
            down-projection of the output (None: ones for x and z; no reduction for the output).
        rotary_interleaved: rotate state pairs (2i, 2i+1) (mamba_ssm's single-input kernel) or, when
            False, (i, i + n//2) (its MIMO kernel).
        initial_state: :class:`Mamba3ScanState` ``(angle (b, h, a), ssm (b, h, p, n), last_B (b, r, h, n),
            last_x (b, h, p))``, the state before position 0 (only the first document when ``seq_idx``
            packs several). Differentiable.
        seq_idx: (b, l) integer document ids; the whole state restarts at zero wherever the id changes,
            so packed documents give the same outputs as each run alone.
        return_final_state: also return the state after the last position.
        chunk_size: positive int, chunk length of the chunked backends (any l works); it never changes
            the result (the rule of :mod:`ssmkit.ops.chunking`).
        backend: ``"auto"`` (the fastest route measured: ``triton`` on CUDA unless float64, else
            ``chunked``), ``"reference"``,
            ``"chunked"`` or ``"triton"`` (the scan rewritten for the Mamba-2 SSD op and run by its Triton
            kernels; rank 1 with B̃/C̃, the angles and the output in fused kernels of their own, MIMO as r
            sub-steps per position with its glue in fused kernels too, ``via_ssd.py``; CUDA, or Triton's interpreter; float64
            inputs take the SSD op's chunked form. bf16/fp16 x gives the SSD kernels bf16/fp16 operands
            with float32 accumulation, so outputs, the final state and gradients are bf16-accurate).

    Returns:
        ``out`` — (b, l, h, p) when ``mimo_o`` is given, else (b, l, r, h, p) — or ``(out, final_state)``.
        States are float32 (float64 when an input is float64); bf16/fp16 inputs are computed in float32.
        Every tensor input gets a gradient.

    NaN/inf are not checked (that would cost a device sync). Like the recurrence they travel forward
    with the state: a NaN in x (one channel of a head) reaches that channel of ``out`` from its position
    to the end of its document; in dt, A, trap, angles or B (one head, or its group) the whole head from
    there on (x and B also enter the next step's trapezoid term); a NaN in C or z at t only reaches
    ``out`` at t; in D, a bias or a MIMO projection the whole head; in initial_state the first document.
    The final state is NaN when the NaN's document is the last. With the chunked and triton backends a NaN
    can also reach other positions of its chunk (masked matmul entries are products with zero), and one in
    dt or trap the chunk before too (position t lends δ_t to t - 1's input weight). Other batch rows, other
    heads and documents that start in a later chunk stay finite.

    Example:
        >>> b, l, h, p, r, g, n, a = 2, 100, 4, 16, 1, 1, 32, 8
        >>> x, z = torch.randn(b, l, h, p), torch.randn(b, l, h, p)
        >>> dt, A = torch.rand(b, l, h) * 0.1, -torch.rand(b, l, h)
        >>> B, C = torch.randn(b, l, r, g, n), torch.randn(b, l, r, g, n)
        >>> trap, angles = torch.randn(b, l, h), torch.randn(b, l, h, a)
        >>> out, state = mamba3_scan(x, dt, A, B, C, trap, angles, D=torch.ones(h), z=z,
        ...                          return_final_state=True)
        >>> out.shape, state.ssm.shape, state.last_B.shape
        (torch.Size([2, 100, 1, 4, 16]), torch.Size([2, 4, 16, 32]), torch.Size([2, 1, 4, 32]))
    """
    dims = _validate(locals(), step=False)
    check_chunk_size(chunk_size)
    if not isinstance(return_final_state, bool):
        raise TypeError(f"return_final_state must be a bool, got {type(return_final_state).__name__}")
    # "auto" takes the route measured fastest (benchmarks/RESULTS.md): on CUDA the SSD route (H100, bf16, b8,
    # 24 x 64 heads, N 128, fwd+bwd: rank 1 4.3 / 16.3 ms at L 2K / 8K against the chunked path's 22.6 / 86.8;
    # rank 4 62 / 246 against 78 / 314), except for float64, which the SSD route computes with the SSD op's
    # chunked form anyway; on a CPU the chunked path (the SSD route is no faster there).
    on_ssd_route = backend == "triton" or (backend == "auto" and x.dtype != torch.float64)
    backend = resolve_backend(backend, dims.device, has_triton=on_ssd_route)
    if backend == "triton":
        scan = functools.partial(mamba3_via_ssd, ssd_backend="triton", final_state=return_final_state)
    else:
        scan = _BACKENDS[backend]
    out, final = scan(Mamba3Inputs.from_args(locals()))
    return (out, final) if return_final_state else out


@torch.no_grad()
def mamba3_step(
    state: Mamba3ScanState,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    trap: torch.Tensor,
    angles: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    B_bias: torch.Tensor | None = None,
    C_bias: torch.Tensor | None = None,
    mimo_x: torch.Tensor | None = None,
    mimo_z: torch.Tensor | None = None,
    mimo_o: torch.Tensor | None = None,
    rotary_interleaved: bool = True,
) -> torch.Tensor:
    """Advance a :class:`Mamba3ScanState` by one token, **in place**, and return that token's output.

    The same recurrence as :func:`mamba3_scan` with the length dimension dropped: x, z (b, h, p);
    dt, A, trap (b, h); B, C (b, r, g, n); angles (b, h, a); D, B_bias, C_bias, mimo_* as there.
    ``state`` holds float tensors ``angle (b, h, a), ssm (b, h, p, n), last_B (b, r, h, n),
    last_x (b, h, p)`` that are overwritten (the same tensor objects, so a cache slice or a CUDA-graph
    buffer stays valid). Returns (b, h, p) with ``mimo_o``, else (b, r, h, p), in x's dtype. Not
    differentiable (use :func:`mamba3_scan` with ``initial_state`` for gradients). NaN behaves as in
    :func:`mamba3_scan`.

    Example:
        >>> b, h, p, r, g, n, a = 2, 4, 16, 2, 1, 32, 8
        >>> state = Mamba3ScanState(torch.zeros(b, h, a), torch.zeros(b, h, p, n), torch.zeros(b, r, h, n),
        ...                         torch.zeros(b, h, p))
        >>> y = mamba3_step(state, torch.randn(b, h, p), torch.rand(b, h), -torch.rand(b, h),
        ...                 torch.randn(b, r, g, n), torch.randn(b, r, g, n), torch.randn(b, h),
        ...                 torch.randn(b, h, a), mimo_o=torch.ones(h, r, p))
        >>> y.shape, bool(state.ssm.abs().sum() > 0)
        (torch.Size([2, 4, 16]), True)
    """
    if not isinstance(state, tuple) or len(state) != 4:
        raise TypeError(f"state must be a Mamba3ScanState (angle, ssm, last_B, last_x), got {type(state).__name__}")
    _validate(locals(), step=True)
    seq = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "trap": trap, "angles": angles, "z": z}
    seq = {k: None if v is None else v[:, None] for k, v in seq.items()}
    args = {"D": D, "B_bias": B_bias, "C_bias": C_bias, "mimo_x": mimo_x, "mimo_z": mimo_z, "mimo_o": mimo_o,
            "rotary_interleaved": rotary_interleaved}
    out, final = mamba3_reference(Mamba3Inputs.from_args(seq | args | {"chunk_size": 1, "initial_state": state}))
    for dst, src in zip(state, final):
        dst.copy_(src)
    return out[:, 0]


class _Checked(Dims):
    """Bound dimension sizes plus the device all tensors share."""

    device: torch.device


# Each tensor argument's dimensions, in the order they are checked (the first to carry a dimension binds it);
# the step's drop "l". Built once: the checks run on every call.
_SHAPES = {
    "x": ("b", "l", "h", "p"), "z": ("b", "l", "h", "p"), "dt": ("b", "l", "h"), "A": ("b", "l", "h"),
    "trap": ("b", "l", "h"), "B": ("b", "l", "r", "g", "n"), "C": ("b", "l", "r", "g", "n"),
}
_SHAPES_LATER = {
    "angles": ("b", "l", "h", "a"), "D": ("h",), "B_bias": ("h", "r", "n"), "C_bias": ("h", "r", "n"),
    "mimo_x": ("h", "r", "p"), "mimo_z": ("h", "r", "p"), "mimo_o": ("h", "r", "p"),
}
_STEP_SHAPES, _STEP_SHAPES_LATER = ({k: tuple(d for d in v if d != "l") for k, v in table.items()}
                                    for table in (_SHAPES, _SHAPES_LATER))
_REQUIRED = ("x", "dt", "A", "B", "C", "trap", "angles")


def _validate(args: dict, *, step: bool) -> _Checked:
    """Check shapes, dtypes, devices and flags of :func:`mamba3_scan` / :func:`mamba3_step` arguments."""
    dims = _Checked()
    for name, shape in (_STEP_SHAPES if step else _SHAPES).items():
        if args[name] is not None:
            check_tensor(name, args[name], shape, dims)
    for name in _REQUIRED:
        if args[name] is None:
            raise TypeError(f"{name} is required, got None")
    for name, shape in (_STEP_SHAPES_LATER if step else _SHAPES_LATER).items():
        if args[name] is not None:
            check_tensor(name, args[name], shape, dims)
    for name, what in (("b", "batch"), ("l", "length"), ("h", "heads"), ("p", "head dim"), ("r", "rank"),
                       ("g", "groups"), ("n", "state")):
        if name in dims:
            check_nonempty("x" if name in "blhp" else "B", dims[name], f"{what} ({name})")
    if dims["h"] % dims["g"] != 0:
        raise ValueError(f"B and C: heads (h={dims['h']}) must be divisible by groups (g={dims['g']})")
    if dims["a"] > dims["n"] // 2:
        raise ValueError(f"angles: a={dims['a']} rotary angles need 2a <= n={dims['n']} state entries")
    if not isinstance(args["rotary_interleaved"], bool):
        raise TypeError(f"rotary_interleaved must be a bool, got {type(args['rotary_interleaved']).__name__}")
    state_name = "state" if step else "initial_state"
    state = args[state_name]
    if state is not None:
        if not isinstance(state, tuple) or len(state) != 4:
            raise TypeError(f"{state_name} must be a Mamba3ScanState (angle, ssm, last_B, last_x), "
                            f"got {type(state).__name__}")
        for field, t, shape in zip(Mamba3ScanState._fields, state,
                                   (("b", "h", "a"), ("b", "h", "p", "n"), ("b", "r", "h", "n"), ("b", "h", "p"))):
            check_tensor(f"{state_name}.{field}", t, shape, dims)
    if not step and args["seq_idx"] is not None:
        check_tensor("seq_idx", args["seq_idx"], ("b", "l"), dims, floating=False, integer=True)
    names = ("x", "dt", "A", "B", "C", "trap", "angles", "D", "z", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o")
    tensors = {k: args[k] for k in names} | ({} if step else {"seq_idx": args["seq_idx"]})
    if state is not None:
        tensors |= {f"{state_name}.{f}": t for f, t in zip(Mamba3ScanState._fields, state)}
    dims.device = check_same_device(**tensors)
    return dims
