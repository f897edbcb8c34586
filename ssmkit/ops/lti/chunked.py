"""Parallel LTI SSM: kernels by Vandermonde products, Krylov doubling or Cauchy sums, FFT convolution.

Diagonal Ā (Vandermonde). ``Ā^k`` for k < L is never materialised as an (n, L) table: with
T = ceil(sqrt(L)) and k = jT + i, ``Ā^k = (Ā^T)^j · Ā^i``, both factors come from running products
(no logarithm, so an Ā that underflows to 0 is harmless and the rounding error grows with sqrt(L)
multiplications, not with k·|log Ā|), and ``Σ_n coef_n Ā_n^k`` is one batched (J × n)·(n × T)
matrix product per channel: O(n·sqrt(L)) memory.

Dense Ā (Krylov doubling). ``[v, Āv, ..., Ā^(2m-1) v] = [V_m, Ā^m V_m]`` with ``Ā^m`` squared at
each round: log2(L) matrix products.

DPLR (S4 paper, Algorithm 1). For the bilinear rule the generating function of the kernel at the
L-th roots of unity z is ``K̂(z) = 2 C̃ (a - bA)⁻¹ B`` with a = (2/Δ)(1 - z), b = 1 + z (the paper's
``2/(1+z) · C̃ (g(z) - A)⁻¹ B`` multiplied through by 1 + z, which stays finite at z = -1), and with
A = Λ - P Q* Woodbury's identity turns the inverse into four Cauchy sums over the diagonal Λ.

FFT convolution: y = irfft(rfft(x, n) · rfft(K, n))[:l] with n >= l + L - 1 (n >= 2l for two-sided
kernels, whose backward half wraps around to the end of the circular kernel). Packed documents are
unpacked into a zero-padded (documents, d, longest) batch, convolved, and gathered back.
"""

from __future__ import annotations

import math

import torch

from ssmkit.ops.lti.reference import document_runs, real_dtype, transition, work_dtype


def _fast_len(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (sizes the FFT is fast for)."""
    best = 1 << max(n - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


class Powers:
    """Powers of a diagonal Ā (d, n) up to L - 1 as two tables: ``Ā^(jT + i) = high[j] · low[i]``."""

    def __init__(self, A_bar: torch.Tensor, length: int) -> None:
        self.T = math.isqrt(length - 1) + 1 if length > 1 else 1  # ceil(sqrt(L))
        self.J = -(-length // self.T)
        self.length = length
        ones = torch.ones_like(A_bar).unsqueeze(-1)
        self.low = torch.cumprod(torch.cat([ones, A_bar.unsqueeze(-1).expand(*A_bar.shape, self.T - 1)], -1), -1)
        step = (self.low[..., -1] * A_bar).unsqueeze(-1)
        self.high = torch.cumprod(torch.cat([ones, step.expand(*A_bar.shape, self.J - 1)], -1), -1)

    def vandermonde(self, coef: torch.Tensor) -> torch.Tensor:
        """``Σ_n coef_n Ā_n^k`` for k < L (2·Re for complex): coef (..., d, n) -> (..., d, L)."""
        left = coef.unsqueeze(-2) * self.high.transpose(-1, -2)  # (..., d, J, n)
        out = (left @ self.low).flatten(-2)[..., : self.length]
        return 2 * out.real if out.is_complex() else out

    def reverse_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``Σ_k Ā^(L-1-k) x_k``: x (b, d, L) real -> (b, d, n)."""
        xr = torch.nn.functional.pad(x.flip(-1), (0, self.J * self.T - self.length)).unflatten(-1, (self.J, self.T))
        inner = xr.to(self.low.dtype) @ self.low.transpose(-1, -2)  # (b, d, J, n)
        return (inner * self.high.transpose(-1, -2)).sum(-2)

    def power(self, k: int) -> torch.Tensor:
        """Ā^k for 0 <= k < L."""
        return self.high[..., k // self.T] * self.low[..., k % self.T]


def krylov(A_bar: torch.Tensor, v: torch.Tensor, length: int) -> torch.Tensor:
    """[v, Āv, ..., Ā^(L-1) v]: A_bar (d, n, n), v (..., d, n) -> (..., d, n, L)."""
    V = v.unsqueeze(-1)
    power = A_bar
    while V.shape[-1] < length:
        V = torch.cat([V, power @ V], dim=-1)
        if V.shape[-1] < length:
            power = power @ power
    return V[..., :length]


def _cast(real, *tensors):
    return [None if t is None else t.to(work_dtype(t, real)) for t in tensors]


def ssm_kernel_chunked(A_bar, B_bar, C, length, B_bar_prev=None):
    """Fast path of :func:`ssmkit.ops.lti.ssm_kernel` (same arguments and result)."""
    real = real_dtype(A_bar, B_bar, C, B_bar_prev)
    A_bar, B_bar, C, B_bar_prev = _cast(real, A_bar, B_bar, C, B_bar_prev)
    if A_bar.dim() == 2:
        powers = Powers(A_bar, length)
        K = powers.vandermonde(C * B_bar)
        prev = None if B_bar_prev is None else powers.vandermonde(C * B_bar_prev)
    else:
        K = torch.einsum("...dn,dnl->...dl", C, krylov(A_bar, B_bar, length))
        prev = None if B_bar_prev is None else torch.einsum("...dn,dnl->...dl", C, krylov(A_bar, B_bar_prev, length))
    if prev is not None:
        K = K + torch.nn.functional.pad(prev[..., :-1], (1, 0))
    return K


def dplr_kernel_chunked(Lambda, P, Q, B, C, dt, length):
    """Fast path of :func:`ssmkit.ops.lti.dplr_kernel`: Cauchy sums + Woodbury at the roots of unity."""
    real = real_dtype(Lambda, P, B, C, dt)
    cplx = torch.complex128 if real == torch.float64 else torch.complex64
    Lambda, P, Q, B, C = (t.to(cplx) for t in (Lambda, P, Q, B, C))

    def full(t):
        return torch.cat([t, t.conj()], dim=-1)

    Lambda, P, Q, B, C = full(Lambda), full(P), full(Q).conj(), full(B), full(C)
    lead, (d, N) = C.shape[:-2], C.shape[-2:]
    C = C.reshape(-1, d, N)
    c, rank = C.shape[0], P.shape[0]
    # Every Cauchy sum Σ_n left_i,n right_j,n R_n(z), left ∈ {C̃, Q*}, right ∈ {B, P}, is one row of W @ R.
    W = (torch.cat([C, Q])[:, None] * torch.cat([B[None], P])[None]).permute(2, 0, 1, 3).reshape(d, -1, N)
    theta = 2 * math.pi * torch.arange(length // 2 + 1, device=Lambda.device, dtype=real) / length
    nyquist = length % 2 == 0
    # On the unit circle (2/Δ)(1 - z)/(1 + z) = i (2/Δ) tan(θ/2): R = 1/(g - Λ) has the real part -Re Λ in
    # every frequency, so it is built from real tensors. At z = -1 (θ = π) the 1/(1 + z) factor is
    # infinite and K̂ = Δ/2 · Σ C̃ B instead (the limit); that bin gets a harmless placeholder first.
    tan_half = torch.tan(theta / 2)
    if nyquist:
        tan_half[-1] = 0.0
    dt = dt.to(real)
    # Channel blocks of at most 2^22 (n, frequency) pairs bound the memory of R.
    step = max(1, (1 << 22) // (N * theta.shape[0]))
    k = torch.cat([_cauchy(W[i:i + step], Lambda[i:i + step], (2 / dt[i:i + step])[:, None] * tan_half)
                   for i in range(0, d, step)]).unflatten(1, (c + rank, 1 + rank))  # (d, c + r, 1 + r, F)
    k00, k01, k10, k11 = k[:, :c, 0], k[:, :c, 1:], k[:, c:, 0], k[:, c:, 1:]
    if rank == 1:
        inner = k01[:, :, 0] * k10 / (1 + k11[:, :, 0])
    else:
        M = torch.eye(rank, dtype=cplx, device=k.device) + k11.permute(0, 3, 1, 2)  # (d, F, r, r)
        sol = torch.linalg.solve(M, k10.permute(0, 2, 1).unsqueeze(-1)).squeeze(-1)  # (d, F, r)
        inner = torch.einsum("dcrf,dfr->dcf", k01, sol)
    one_plus_z = 1 + torch.polar(torch.ones_like(theta), -theta)
    if nyquist:
        one_plus_z[-1] = 1.0
    K_hat = 2 * (k00 - inner) / one_plus_z
    if nyquist:
        limit = dt[:, None] / 2 * (C * B).sum(-1).transpose(0, 1)  # (d, c)
        K_hat = torch.cat([K_hat[..., :-1], limit.unsqueeze(-1).to(cplx)], dim=-1)
    return torch.fft.irfft(K_hat, n=length).transpose(0, 1).reshape(*lead, d, length)


def _cauchy(W, Lambda, g_imag):
    """``W @ R`` with ``R[n, f] = 1 / (i g_imag[f] - Λ_n)``: W (d, M, N), Lambda (d, N), g_imag (d, F)."""
    u = -Lambda.real[..., None]
    t = g_imag[:, None, :] - Lambda.imag[..., None]  # (d, N, F)
    inv = (u * u + t * t).reciprocal()
    # R = (u - i t) / (u² + t²) = R_re - i T
    R_re, T = u * inv, t * inv
    W_re, W_im = W.real, W.imag
    return torch.complex(W_re @ R_re + W_im @ T, W_im @ R_re - W_re @ T)


def _conv_fft(x, kernel, kernel_rev):
    """Causal (and, with kernel_rev, anti-causal) convolution of x (b, d, l) along l."""
    length = x.shape[-1]
    K = kernel[..., :length]
    Kr = None if kernel_rev is None else kernel_rev[..., :length]
    span = max(K.shape[-1] - 1, 0 if Kr is None else Kr.shape[-1])
    n = _fast_len(length + span)
    pieces = [K, K.new_zeros(*K.shape[:-1], n - K.shape[-1] - (0 if Kr is None else Kr.shape[-1]))]
    if Kr is not None:
        pieces.append(Kr.flip(-1))
    circ = torch.cat(pieces, dim=-1)
    y = torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(circ, n=n), n=n)
    return y[..., :length]


def _unpack_index(seq_idx: torch.Tensor):
    """Each position's (document, offset in it) over the whole batch, and the documents' count and
    longest length (two host synchronisations)."""
    batch, length = seq_idx.shape
    runs = document_runs(seq_idx, batch, length, seq_idx.device)
    n_runs = runs[:, -1] + 1
    doc = runs + (torch.cumsum(n_runs, 0) - n_runs)[:, None]
    pos = torch.arange(length, device=seq_idx.device)
    new = torch.ones_like(runs, dtype=torch.bool)
    new[:, 1:] = runs[:, 1:] != runs[:, :-1]
    offset = pos - torch.cummax(torch.where(new, pos, 0), dim=1).values
    return doc, offset, int(n_runs.sum()), int(offset.max()) + 1


def fft_conv_chunked(x, kernel, D=None, kernel_rev=None, seq_idx=None):
    """Fast path of :func:`ssmkit.ops.lti.fft_conv` (same arguments and result)."""
    real = real_dtype(x, kernel, kernel_rev, D)
    xs = x.to(real)
    K = kernel.to(real)
    Kr = None if kernel_rev is None else kernel_rev.to(real)
    if seq_idx is None:
        y = _conv_fft(xs, K, Kr)
    else:
        doc, offset, n_docs, longest = _unpack_index(seq_idx)
        packed = xs.new_zeros(n_docs, longest, xs.shape[1])
        packed = packed.index_put((doc.flatten(), offset.flatten()), xs.transpose(1, 2).flatten(0, 1))
        out = _conv_fft(packed.transpose(1, 2), K, Kr)
        y = out.transpose(1, 2)[doc, offset].transpose(1, 2)
    if D is not None:
        y = y + D.to(real)[:, None] * xs
    return y.to(x.dtype)


def lti_scan_chunked(x, A_bar, B_bar, C, D=None, B_bar_prev=None, initial_state=None, initial_input=None,
                     seq_idx=None, return_final_state=False, kernel=None):
    """Fast path of :func:`ssmkit.ops.lti.lti_scan`: convolution plus the terms of the initial state.

    With v0 = Ā h_(-1) + B̄' x_(-1) (what the first position inherits), the first document reads
    ``y_t += out(C, Ā^t v0)``, and the last document ends in the state
    ``Σ_s Ā^(L-1-s) (B̄ x_s + B̄' x_(s-1)) + Ā^(L-1) v0`` (v0 only when it is also the first).
    """
    batch, dim, length = x.shape
    real = real_dtype(x, A_bar, B_bar, C, D, B_bar_prev, initial_state)
    A_bar, B_bar, C, B_bar_prev = _cast(real, A_bar, B_bar, C, B_bar_prev)
    xs = x.to(real)
    diagonal = A_bar.dim() == 2
    powers = Powers(A_bar, length) if diagonal else None
    if kernel is None:
        kernel = ssm_kernel_chunked(A_bar, B_bar, C, length, B_bar_prev)
    y = fft_conv_chunked(xs, kernel, D, None, seq_idx)

    v0 = None
    if initial_state is not None:
        v0 = transition(A_bar, initial_state.to(B_bar.dtype))
    if initial_input is not None and B_bar_prev is not None:
        term = B_bar_prev * initial_input.to(real)[..., None]
        v0 = term if v0 is None else v0 + term
    runs = document_runs(seq_idx, batch, length, x.device)
    if v0 is not None:
        if diagonal:
            inherited = powers.vandermonde(C * v0)
        else:
            inherited = torch.einsum("dnl,bdn->bdl", krylov(A_bar.transpose(-1, -2), C, length), v0)
        y = y + torch.where((runs == 0)[:, None, :], inherited, 0.0)
    if not return_final_state:
        return y.to(x.dtype)

    last = (runs == runs[:, -1:])[:, None, :]  # (b, 1, l)
    x_last = torch.where(last, xs, 0.0)
    inputs = [(B_bar, x_last)]
    if B_bar_prev is not None:
        same_prev = torch.zeros_like(last)
        same_prev[..., 1:] = last[..., 1:] & (runs[:, 1:] == runs[:, :-1])[:, None, :]
        shifted = torch.nn.functional.pad(xs[..., :-1], (1, 0))
        inputs.append((B_bar_prev, torch.where(same_prev, shifted, 0.0)))
    h = torch.zeros(batch, *B_bar.shape, dtype=B_bar.dtype, device=x.device)
    for vec, u in inputs:
        if diagonal:
            h = h + vec * powers.reverse_sum(u)
        else:
            h = h + torch.einsum("dnl,bdl->bdn", krylov(A_bar, vec, length), u.flip(-1).to(vec.dtype))
    if v0 is not None:
        carried = powers.power(length - 1) * v0 if diagonal else transition(
            torch.linalg.matrix_power(A_bar, length - 1), v0)
        h = h + torch.where((runs[:, -1] == 0).view(-1, 1, 1), carried, 0.0)
    return y.to(x.dtype), h

