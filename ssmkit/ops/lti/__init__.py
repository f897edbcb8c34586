"""Linear time-invariant SSMs: discretisation, convolution kernels, FFT convolution, recurrence.

The same map computed three ways that agree (see ``reference.py`` for the equations): as a
recurrence (:func:`lti_scan` with ``backend="reference"``, :func:`lti_step`), as a convolution with
the kernel ``K = (C B̄, C Ā B̄, ...)`` (:func:`ssm_kernel`, :func:`dplr_kernel`, :func:`fft_conv`), and
for S4 through Cauchy sums at the roots of unity. HiPPO matrices and the S4D initialisations are in
:mod:`ssmkit.ops.lti.hippo` (re-exported here).

Shapes: x (b, d, l) as ``causal_conv1d_fn``; a diagonal Ā is (d, n) real or complex (complex: one
state of each conjugate pair, outputs ``2 Re(...)``), a dense Ā is (d, n, n) real.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ssmkit.ops._checks import Dims, check_nonempty, check_same_device, check_tensor
from ssmkit.ops.backend import resolve_backend
from ssmkit.ops.lti import chunked, reference
from ssmkit.ops.lti.hippo import MEASURES, NPLR, S4D_INITS, hippo, hippo_low_rank, nplr, s4d_init

__all__ = [
    "MEASURES", "NPLR", "S4D_INITS", "Discretized", "discretize", "dplr_kernel", "dplr_recurrence", "fft_conv",
    "hippo", "hippo_low_rank", "lti_scan", "lti_step", "nplr", "s4d_init", "ssm_kernel",
]


class Discretized(NamedTuple):
    """Ā, B̄ and, for the trapezoidal rule only, B̄' (the weight of the previous input; else None)."""

    A_bar: torch.Tensor
    B_bar: torch.Tensor
    B_bar_prev: torch.Tensor | None


def _check(name: str, t: object, dims: tuple[str, ...], bound: Dims, *, complex_ok: bool = False) -> torch.Tensor:
    check_tensor(name, t, dims, bound, floating=False)
    if not (t.is_floating_point() or (complex_ok and t.is_complex())):
        kinds = "floating-point or complex" if complex_ok else "floating-point"
        raise TypeError(f"{name} must be a {kinds} tensor, got {t.dtype}")
    return t


def _check_length(length: object) -> None:
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")


def _check_system(A_bar, B_bar, C, B_bar_prev, dims: Dims, *, c_dims: tuple[str, ...] = ("d", "n")) -> None:
    if not isinstance(A_bar, torch.Tensor) or A_bar.dim() not in (2, 3):
        shape = tuple(A_bar.shape) if isinstance(A_bar, torch.Tensor) else type(A_bar).__name__
        raise ValueError(f"A_bar must have shape (d, n) (diagonal) or (d, n, n) (dense), got {shape}")
    _check("A_bar", A_bar, ("d", "n") if A_bar.dim() == 2 else ("d", "n", "n"), dims, complex_ok=A_bar.dim() == 2)
    _check("B_bar", B_bar, ("d", "n"), dims, complex_ok=True)
    if B_bar.is_complex() != A_bar.is_complex():
        raise TypeError(f"B_bar must be complex exactly when A_bar is, got {B_bar.dtype} and {A_bar.dtype}")
    if B_bar_prev is not None:
        _check("B_bar_prev", B_bar_prev, ("d", "n"), dims, complex_ok=A_bar.is_complex())
    if not isinstance(C, torch.Tensor) or C.dim() < len(c_dims):
        raise ValueError(f"C must have shape ({', '.join(c_dims)}), got "
                         f"{tuple(C.shape) if isinstance(C, torch.Tensor) else type(C).__name__}")
    extra = tuple(f"c{i}" for i in range(C.dim() - len(c_dims)))
    _check("C", C, extra + c_dims, dims, complex_ok=A_bar.is_complex())
    check_nonempty("A_bar", dims["d"], "channel")
    check_nonempty("A_bar", dims["n"], "state")


def discretize(A: torch.Tensor, B: torch.Tensor, dt: torch.Tensor, method: str = "zoh", *,
               lam: float = 0.5) -> Discretized:
    """Discretise ``h' = A h + B x`` with step Δ for each of d channels.

    Args:
        A: (d, n) diagonal (real or complex) or (d, n, n) dense (real or complex).
        B: (d, n), complex when A is. dt: (d,) positive steps (real).
        method: ``"zoh"`` (Ā = exp(ΔA), B̄ = (ΔA)⁻¹(exp(ΔA) - I)ΔB), ``"bilinear"``
            (Ā = (I - ΔA/2)⁻¹(I + ΔA/2), B̄ = (I - ΔA/2)⁻¹ΔB) or ``"trapezoidal"`` (Mamba-3's
            exponential-trapezoidal rule with a fixed weight λ = ``lam``: Ā = exp(ΔA), B̄ = λΔB for the
            current input, B̄' = (1 - λ)ΔĀB for the previous one; λ = 1 is the Euler rule of Mamba-2).

    Returns:
        :class:`Discretized` ``(A_bar, B_bar, B_bar_prev)`` in A's dtype (B̄' is None except for
        the trapezoidal rule). Differentiable; NaN in a channel's inputs stays in that channel.

    Example::

        A_bar, B_bar, _ = discretize(-torch.rand(4, 8), torch.ones(4, 8), torch.full((4,), 0.1))
    """
    dims = Dims()
    if not isinstance(A, torch.Tensor) or A.dim() not in (2, 3):
        raise ValueError(f"A must have shape (d, n) or (d, n, n), got "
                         f"{tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__}")
    _check("A", A, ("d", "n") if A.dim() == 2 else ("d", "n", "n"), dims, complex_ok=True)
    _check("B", B, ("d", "n"), dims, complex_ok=True)
    _check("dt", dt, ("d",), dims)
    if B.is_complex() != A.is_complex():
        raise TypeError(f"B must be complex exactly when A is, got {B.dtype} and {A.dtype}")
    if method not in reference.METHODS:
        raise ValueError(f"method must be one of {reference.METHODS}, got {method!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam!r}")
    check_same_device(A=A, B=B, dt=dt)
    dtype = torch.promote_types(A.dtype, B.dtype)
    return Discretized(*reference.discretize_ref(A.to(dtype), B.to(dtype), dt, method, lam))


def ssm_kernel(A_bar: torch.Tensor, B_bar: torch.Tensor, C: torch.Tensor, length: int, *,
               B_bar_prev: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """The convolution kernel ``K_k = out(C, Ā^k B̄) + out(C, Ā^(k-1) B̄')`` for k < ``length``.

    Args:
        A_bar: (d, n) diagonal, real or complex (conjugate pairs: the result is 2·Re), or
            (d, n, n) dense real. B_bar, B_bar_prev: (d, n). C: (..., d, n), e.g. (2, d, n) for the two
            directions of a bidirectional layer.
        length: L >= 1. backend: ``"auto"`` (chunked: a two-level Vandermonde product for diagonal
            Ā, Krylov doubling for dense Ā) or ``"reference"`` (L multiplications by Ā).

    Returns:
        K (..., d, L), real, float32 (float64 when an input is double). Differentiable. Powers of a
        stable Ā decay to zero, never overflow; an unstable Ā (|eigenvalue| > 1) grows as it must.
        A NaN in one channel's Ā, B̄ or C makes that channel's kernel NaN, other channels stay finite.

    Example::

        K = ssm_kernel(torch.full((2, 4), 0.9), torch.ones(2, 4), torch.randn(2, 4), 16)
    """
    dims = Dims()
    _check_system(A_bar, B_bar, C, B_bar_prev, dims)
    _check_length(length)
    device = check_same_device(A_bar=A_bar, B_bar=B_bar, C=C, B_bar_prev=B_bar_prev)
    impl = reference.ssm_kernel_ref if resolve_backend(backend, device) == "reference" else chunked.ssm_kernel_chunked
    return impl(A_bar, B_bar, C, length, B_bar_prev)


def _check_dplr(Lambda, P, Q, B, C, dt, dims: Dims) -> torch.Tensor:
    _check("Lambda", Lambda, ("d", "n"), dims, complex_ok=True)
    _check("P", P, ("r", "d", "n"), dims, complex_ok=True)
    Q = P if Q is None else _check("Q", Q, ("r", "d", "n"), dims, complex_ok=True)
    _check("B", B, ("d", "n"), dims, complex_ok=True)
    if not isinstance(C, torch.Tensor) or C.dim() < 2:
        raise ValueError(f"C must have shape (..., d, n), got "
                         f"{tuple(C.shape) if isinstance(C, torch.Tensor) else type(C).__name__}")
    _check("C", C, tuple(f"c{i}" for i in range(C.dim() - 2)) + ("d", "n"), dims, complex_ok=True)
    _check("dt", dt, ("d",), dims)
    check_nonempty("Lambda", dims["d"], "channel")
    check_nonempty("Lambda", dims["n"], "state")
    check_same_device(Lambda=Lambda, P=P, Q=Q, B=B, C=C, dt=dt)
    return Q


def dplr_kernel(Lambda: torch.Tensor, P: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dt: torch.Tensor,
                length: int, *, Q: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """S4's convolution kernel for ``A = Λ - P Q*`` and the bilinear rule (S4 paper, Algorithm 1).

    States come in conjugate pairs and one of each is given: the full system has
    ``[Λ, Λ̄]``, ``[P, P̄]``, ``[B, B̄]``, ``[C, C̄]`` and a real kernel.

    Args:
        Lambda: (d, n) diagonal part (real parts < 0 for a stable system). P, Q: (r, d, n) low-rank
            factors (Q defaults to P, as in S4). B: (d, n). C: (..., d, n) is S4's C̃ = C (I - Ā^L)*,
            the output matrix already corrected for the kernel's length L (learned directly).
        dt: (d,) steps. length: L. backend: ``"auto"`` (chunked: Cauchy sums and Woodbury's identity at
            the L/2 + 1 non-negative frequencies, then an inverse real FFT) or ``"reference"`` (the
            dense system of :func:`dplr_recurrence`, stepped L times).

    Returns:
        K (..., d, L) real (float32, float64 when an input is double), differentiable. NaN in one
        channel's parameters makes that channel's kernel NaN.

    Example::

        Lambda, P, B, _ = nplr("legs", 16)
        K = dplr_kernel(Lambda[None], P[:, None], B[None], torch.randn(1, 8, dtype=torch.cfloat),
                        torch.tensor([0.01]), 1024)
    """
    dims = Dims()
    Q = _check_dplr(Lambda, P, Q, B, C, dt, dims)
    _check_length(length)
    impl = reference.dplr_kernel_ref if resolve_backend(backend, Lambda.device) == "reference" \
        else chunked.dplr_kernel_chunked
    return impl(Lambda, P, Q, B, C, dt, length)


def dplr_recurrence(Lambda: torch.Tensor, P: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dt: torch.Tensor,
                    length: int, *, Q: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The recurrent form of :func:`dplr_kernel`'s system as a real dense SSM of size N = 2n.

    Returns ``(A_bar (d, N, N), B_bar (d, N), C (..., d, N))``, real, such that
    ``ssm_kernel(A_bar, B_bar, C, L)`` equals ``dplr_kernel(..., L)`` and :func:`lti_step` /
    :func:`lti_scan` run the same map token by token. C̃ is turned into ``C = C̃ (I - Ā^L)⁻¹``
    (one dense solve per channel, plus log2(L) matrix squarings for Ā^L: O(d N³ log L)).
    """
    dims = Dims()
    Q = _check_dplr(Lambda, P, Q, B, C, dt, dims)
    _check_length(length)
    return reference.dplr_recurrence_ref(Lambda, P, Q, B, C, dt, length)


def fft_conv(x: torch.Tensor, kernel: torch.Tensor, D: torch.Tensor | None = None, *,
             kernel_rev: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
             backend: str = "auto") -> torch.Tensor:
    """Long convolution of each channel with its kernel: causal, or two-sided with ``kernel_rev``.

    ``y_t = Σ_j K_j x_(t-j) + Σ_i K'_i x_(t+1+i) + D x_t``, sums over j, i < the kernels' lengths and
    positions of the same document. Kernels may be shorter (a finite window) or longer (truncated)
    than the sequence.

    Args:
        x: (b, d, l). kernel: (d, L) applied to the present and past. D: (d,) skip or None.
        kernel_rev: (d, L') applied to the future (its entry 0 to x_(t+1)); None for a causal
            convolution. The two together are S4's bidirectional kernel.
        seq_idx: (b, l) integer document ids: no output reads another document (the chunked backend
            unpacks the documents into a zero-padded batch: cost grows with documents × the longest).
        backend: ``"auto"`` (chunked: FFT of size >= l + L, O(l log l)) or ``"reference"`` (direct sums).

    Returns:
        y (b, d, l) in x's dtype, computed in float32 (float64 when an input is). Differentiable.

    NaN: the reference backend propagates a NaN in x[b, d, s] to the outputs that read it (later
    positions of that document, earlier ones too with ``kernel_rev``). The FFT mixes every position,
    so the chunked backend makes the whole document of channel d (row b) NaN. A NaN in the kernel of
    channel d makes channel d NaN in both. Other channels and documents stay finite.

    Example::

        y = fft_conv(torch.randn(2, 4, 100), torch.randn(4, 100), torch.ones(4))
    """
    dims = Dims()
    _check("x", x, ("b", "d", "l"), dims)
    _check("kernel", kernel, ("d", "L"), dims)
    for name, size, what in (("x", "b", "batch"), ("x", "d", "channel"), ("x", "l", "length"),
                             ("kernel", "L", "length")):
        check_nonempty(name, dims[size], what)
    if D is not None:
        _check("D", D, ("d",), dims)
    if kernel_rev is not None:
        _check("kernel_rev", kernel_rev, ("d", "L_rev"), dims)
        check_nonempty("kernel_rev", dims["L_rev"], "length")
    if seq_idx is not None:
        check_tensor("seq_idx", seq_idx, ("b", "l"), dims, floating=False, integer=True)
    device = check_same_device(x=x, kernel=kernel, D=D, kernel_rev=kernel_rev, seq_idx=seq_idx)
    impl = reference.fft_conv_ref if resolve_backend(backend, device) == "reference" else chunked.fft_conv_chunked
    return impl(x, kernel, D, kernel_rev, seq_idx)


def lti_scan(x: torch.Tensor, A_bar: torch.Tensor, B_bar: torch.Tensor, C: torch.Tensor,
             D: torch.Tensor | None = None, *, B_bar_prev: torch.Tensor | None = None,
             initial_state: torch.Tensor | None = None, initial_input: torch.Tensor | None = None,
             seq_idx: torch.Tensor | None = None, return_final_state: bool = False,
             kernel: torch.Tensor | None = None, backend: str = "auto"
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run a discretised LTI SSM over a sequence, with states: ``h_t = Ā h_(t-1) + B̄ x_t + B̄' x_(t-1)``,
    ``y_t = out(C, h_t) + D x_t``.

    Args:
        x: (b, d, l). A_bar: (d, n) or (d, n, n); B_bar, B_bar_prev, C: (d, n); D: (d,) or None.
        initial_state: (b, d, n) the state before position 0 (complex for a complex Ā); only the first
            document of each row inherits it. initial_input: (b, d) the input before position 0 (read
            by B̄' only; zero when None).
        seq_idx: (b, l) integer document ids; the state and the previous input restart at zero where
            the id changes. return_final_state: also return the state after the last position (that
            of the last document).
        kernel: optional precomputed (d, L >= l) kernel of this very system (e.g. :func:`dplr_kernel`,
            cheaper than the dense Krylov kernel); it is trusted, not checked.
        backend: ``"reference"`` is the recurrence, position by position (recurrent mode);
            ``"auto"``/``"chunked"`` is convolution mode: FFT convolution with the kernel, plus
            ``out(C, Ā^t v0)`` for the inherited state and a Vandermonde (diagonal) or Krylov (dense)
            reduction for the final state.

    Returns:
        y (b, d, l) in x's dtype, or ``(y, final_state)`` with the state (b, d, n) in float32/complex64
        (float64/complex128 when an input is double). Differentiable in every tensor input.

    NaN: the recurrence carries a NaN in x forward through its document; convolution mode (FFT)
    spreads it over the whole document of that channel (see :func:`fft_conv`).

    Example::

        y, h = lti_scan(torch.randn(2, 4, 64), torch.full((4, 8), 0.9), torch.ones(4, 8),
                        torch.randn(4, 8), return_final_state=True)
    """
    dims = Dims()
    _check_system(A_bar, B_bar, C, B_bar_prev, dims)
    _check("x", x, ("b", "d", "l"), dims)
    for name, size, what in (("x", "b", "batch"), ("x", "l", "length")):
        check_nonempty(name, dims[size], what)
    if D is not None:
        _check("D", D, ("d",), dims)
    if initial_state is not None:
        _check("initial_state", initial_state, ("b", "d", "n"), dims, complex_ok=A_bar.is_complex())
    if initial_input is not None:
        _check("initial_input", initial_input, ("b", "d"), dims)
    if seq_idx is not None:
        check_tensor("seq_idx", seq_idx, ("b", "l"), dims, floating=False, integer=True)
    if kernel is not None:
        _check("kernel", kernel, ("d", "L"), dims)
        if dims["L"] < dims["l"]:
            raise ValueError(f"kernel must have at least l = {dims['l']} entries, got {dims['L']}")
    if not isinstance(return_final_state, bool):
        raise TypeError(f"return_final_state must be a bool, got {type(return_final_state).__name__}")
    device = check_same_device(x=x, A_bar=A_bar, B_bar=B_bar, C=C, D=D, B_bar_prev=B_bar_prev,
                               initial_state=initial_state, initial_input=initial_input, seq_idx=seq_idx,
                               kernel=kernel)
    args = (x, A_bar, B_bar, C, D, B_bar_prev, initial_state, initial_input, seq_idx, return_final_state)
    if resolve_backend(backend, device) == "reference":
        return reference.lti_scan_ref(*args)
    return chunked.lti_scan_chunked(*args, kernel)


def lti_step(state: torch.Tensor, x: torch.Tensor, A_bar: torch.Tensor, B_bar: torch.Tensor, C: torch.Tensor,
             D: torch.Tensor | None = None, *, B_bar_prev: torch.Tensor | None = None,
             prev_input: torch.Tensor | None = None) -> torch.Tensor:
    """One position of :func:`lti_scan` (decode): updates ``state`` (and ``prev_input``) in place.

    Args:
        state: (b, d, n), complex for a complex Ā; the new state is stored in its dtype.
        x: (b, d). A_bar, B_bar, C, D, B_bar_prev: as :func:`lti_scan`. prev_input: (b, d), the
            previous input; required with B_bar_prev, overwritten with x.

    Returns:
        y (b, d) in x's dtype (computed in float32 at least). One vectorised implementation serves
        every device. A NaN in x[b, d] makes y[b, d] and the state of row b, channel d NaN from then on.
    """
    dims = Dims()
    _check("state", state, ("b", "d", "n"), dims, complex_ok=True)
    _check("x", x, ("b", "d"), dims)
    _check_system(A_bar, B_bar, C, B_bar_prev, dims)
    if state.is_complex() != A_bar.is_complex():
        raise TypeError(f"state must be complex exactly when A_bar is, got {state.dtype} and {A_bar.dtype}")
    if D is not None:
        _check("D", D, ("d",), dims)
    if (B_bar_prev is None) != (prev_input is None):
        raise ValueError("B_bar_prev and prev_input go together (the trapezoidal rule reads the previous input)")
    if prev_input is not None:
        _check("prev_input", prev_input, ("b", "d"), dims)
    check_same_device(state=state, x=x, A_bar=A_bar, B_bar=B_bar, C=C, D=D, B_bar_prev=B_bar_prev,
                      prev_input=prev_input)
    return reference.lti_step_ref(state, x, A_bar, B_bar, C, D, B_bar_prev, prev_input)
