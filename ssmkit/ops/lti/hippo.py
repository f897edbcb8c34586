"""HiPPO matrices, their normal-plus-low-rank (NPLR) form, and the S4D diagonal initialisations.

Dimensions: ``N`` state size (even), ``r`` rank of the low-rank correction, ``N/2`` one state of
each complex-conjugate pair.

HiPPO (Gu et al. 2020, "HiPPO: Recurrent Memory with Optimal Polynomial Projections") gives a
continuous-time ``x' = A x + B u`` whose state holds the coefficients of the input's history in an
orthogonal basis: scaled Legendre (``"legs"``, all of the past), translated Legendre (``"legt"``, a
sliding window) or Fourier (``"fourier"``). The matrices follow the S4 code (state-spaces/s4,
``hippo.py``: ``transition`` and ``rank_correction``), signs included.

Each has a low-rank ``P`` (r, N) with ``A + Σ_r P_r P_rᵀ = c·I + S``, ``S`` skew-symmetric
(``c = -1/2`` for LegS, 0 for the other two): a normal matrix, unitarily diagonalisable. So
``A = V Λ V* - P̃ P̃*`` with ``P̃ = V* P`` (S4 paper, Theorem 1). Since A is real its eigenvalues
come in conjugate pairs, and only one of each pair is kept (:func:`nplr`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

MEASURES = ("legs", "legt", "fourier")
S4D_INITS = ("lin", "inv", "legs")


def _check_size(N: int, what: str) -> None:
    if isinstance(N, bool) or not isinstance(N, int) or N < 2 or N % 2:
        raise ValueError(f"{what}: N must be an even int >= 2 (states come in conjugate pairs), got {N!r}")


def _check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")


def hippo(measure: str, N: int, *, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The HiPPO matrices ``(A, B)``: A (N, N), B (N,), real.

    ``"legs"``: ``A[n, k] = -sqrt(2n+1) sqrt(2k+1)`` (n > k), ``-(n+1)`` (n = k), 0 (n < k);
    ``B[n] = sqrt(2n+1)``. ``"legt"``: ``A[n, k] = -½ sqrt(2n+1) sqrt(2k+1) · (1 if n >= k else
    (-1)^(n-k))``, ``B[n] = ½ sqrt(2n+1)`` (S4's halved LegT). ``"fourier"``: rotation blocks at
    frequencies 0, π·1, π·2, ... minus ``B Bᵀ``, ``B = [1, 0, √2, 0, √2, ...]``.
    N may be odd for ``legs`` and ``legt``; ``fourier`` needs it even.

    Example::

        A, B = hippo("legs", 8)
    """
    _check_measure(measure)
    if isinstance(N, bool) or not isinstance(N, int) or N < 1:
        raise ValueError(f"hippo: N must be a positive int, got {N!r}")
    n = torch.arange(N, dtype=torch.float64)
    r = torch.sqrt(2 * n + 1)
    if measure == "legs":
        A = -torch.tril(r[:, None] * r[None, :], diagonal=-1) - torch.diag(n + 1)
        B = r.clone()
    elif measure == "legt":
        i, j = n[:, None], n[None, :]
        sign = torch.where(i < j, (-1.0) ** (i - j), torch.ones(()))
        A = -0.5 * r[:, None] * sign * r[None, :]
        B = 0.5 * r
    else:
        _check_size(N, "hippo('fourier')")
        freqs = torch.arange(N // 2, dtype=torch.float64)
        d = torch.stack([torch.zeros(N // 2, dtype=torch.float64), freqs], dim=-1).reshape(-1)[1:]
        B = _fourier_p(N)
        A = math.pi * (torch.diag(d, -1) - torch.diag(d, 1)) - B[:, None] * B[None, :]
    return A.to(dtype), B.to(dtype)


def _fourier_p(N: int) -> torch.Tensor:
    p = torch.zeros(N, dtype=torch.float64)
    p[0::2] = math.sqrt(2.0)
    p[0] = 1.0
    return p


def hippo_low_rank(measure: str, N: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The low-rank term P (r, N) with ``A + Pᵀ P`` normal: r = 1 for LegS and Fourier, 2 for LegT.

    LegS: ``P[n] = sqrt(n + ½)``, and then ``A + P Pᵀ = -½ I + S`` with S skew-symmetric.
    """
    _check_measure(measure)
    n = torch.arange(N, dtype=torch.float64)
    if measure == "legs":
        P = torch.sqrt(n + 0.5)[None]
    elif measure == "legt":
        p = torch.sqrt(2 * n + 1) * 2**-0.5
        P = torch.stack([torch.where(n % 2 == 0, 0.0, p), torch.where(n % 2 == 1, 0.0, p)])
    else:
        _check_size(N, "hippo_low_rank('fourier')")
        P = _fourier_p(N)[None]
    return P.to(dtype)


class NPLR(NamedTuple):
    """Normal-plus-low-rank form ``A = V Λ V* - P̃ P̃*`` keeping one state of each conjugate pair.

    Lambda: (N/2,) complex eigenvalues of the normal part (imaginary parts <= 0);
    P: (r, N/2) = V* Pᵀ; B: (N/2,) = V* B; V: (N, N/2) orthonormal columns. With the conjugate
    halves appended (``[Λ, conj Λ]``, ``[V, conj V]``, ...) the full matrix is recovered exactly:
    ``A = 2 Re(V diag(Λ) V*) - Pᵀ P``.
    """

    Lambda: torch.Tensor
    P: torch.Tensor
    B: torch.Tensor
    V: torch.Tensor


def nplr(measure: str, N: int, *, dtype: torch.dtype = torch.complex128) -> NPLR:
    """Diagonalise the normal part of a HiPPO matrix (S4 paper, Theorem 1; S4's ``nplr``).

    Computed in float64: ``A + Pᵀ P = c I + S``, the eigenvalues of S are ``i μ`` with ``μ`` those of
    the Hermitian ``-i S``. Eigenvalues are sorted by imaginary part and the half with ``Im <= 0``
    kept. A pair of zero eigenvalues (Fourier's constant term) has no conjugate partner of its own,
    so its two real eigenvectors ``u1, u2`` are merged into the one complex ``(u1 + i u2)/√2``.

    Example::

        Lambda, P, B, V = nplr("legs", 64)      # Lambda: (32,) with real parts -1/2
    """
    _check_measure(measure)
    _check_size(N, "nplr")
    A, B = hippo(measure, N)
    P = hippo_low_rank(measure, N)
    AP = A + P.T @ P
    c = torch.diagonal(AP).mean()
    S = AP - c * torch.eye(N, dtype=torch.float64)
    mu, V = torch.linalg.eigh(-1j * S.to(torch.complex128))  # ascending mu
    zero = mu.abs() < 1e-9
    if int(zero.sum()) not in (0, 2):
        raise ValueError(f"nplr({measure!r}, {N}): {int(zero.sum())} zero eigenvalues; at most one pair is handled")
    if bool(zero.any()):
        # The pair sits in the middle of the sorted spectrum (columns N/2 - 1 and N/2): merge the
        # real basis of its eigenspace into one complex column, kept in the first half.
        basis = torch.linalg.svd(torch.cat([V[:, zero].real, V[:, zero].imag], dim=1)).U[:, :2]
        V[:, N // 2 - 1] = torch.complex(basis[:, 0], basis[:, 1]) / math.sqrt(2.0)
    mu, V = mu[: N // 2], V[:, : N // 2]
    Lambda = c + 1j * mu
    Vh = V.conj().T
    return NPLR(Lambda.to(dtype), (Vh @ P.T.to(V.dtype)).T.to(dtype), (Vh @ B.to(V.dtype)).to(dtype), V.to(dtype))


def s4d_init(kind: str, N: int, *, dtype: torch.dtype = torch.complex128) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal initialisations of S4D (Gu et al. 2022, "On the Parameterization and Initialization
    of Diagonal State Space Models"): ``(Lambda, B)``, both (N/2,) complex, one of each conjugate pair.

    ``"lin"``: ``Λ_n = -½ + iπn``, B = 1. ``"inv"``: ``Λ_n = -½ + i (N/π)(N/(2n+1) - 1)``, B = 1.
    ``"legs"``: the diagonal of HiPPO-LegS's normal part and ``V* B`` (the low-rank term dropped).

    Example::

        Lambda, B = s4d_init("inv", 64)
    """
    if kind not in S4D_INITS:
        raise ValueError(f"s4d_init: kind must be one of {S4D_INITS}, got {kind!r}")
    _check_size(N, "s4d_init")
    n = torch.arange(N // 2, dtype=torch.float64)
    if kind == "legs":
        Lambda, _, B, _ = nplr("legs", N)
        return Lambda.to(dtype), B.to(dtype)
    imag = math.pi * n if kind == "lin" else (N / math.pi) * (N / (2 * n + 1) - 1)
    Lambda = torch.complex(torch.full_like(n, -0.5), imag)
    return Lambda.to(dtype), torch.ones(N // 2, dtype=dtype)
