"""Linear time-invariant SSMs as plain loops: the definitions the fast backends are checked against.

Dimensions:
    b  batch                     d  channels (independent single-input single-output systems)
    l  sequence length           L  kernel length
    n  state size (per channel)  c  output channels sharing one state (bidirectional layers: 2)
    r  rank of a low-rank term   N  full state size of a conjugate-pair system (N = 2 n)

One channel's system, after discretisation (``discretize``)::

    h_t = Ā h_{t-1} + B̄ x_t + B̄' x_{t-1}         (B̄' only for the trapezoidal rule)
    y_t = out(C, h_t) + D x_t

Ā is diagonal (d, n) or dense (d, n, n). ``out(C, h) = Σ_n C_n h_n`` for real systems; a complex
diagonal Ā stores one state of each conjugate pair, the other half being the conjugate, so
``out(C, h) = 2 Re Σ_n C_n h_n``. The convolution kernel is the impulse response
``K_k = out(C, Ā^k B̄) + out(C, Ā^(k-1) B̄')`` (the second term for k >= 1), and ``y = K * x + D x``.
``seq_idx`` restarts the state (and the previous input) at zero wherever its value changes.
"""

from __future__ import annotations

import torch

METHODS = ("zoh", "bilinear", "trapezoidal")


def real_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is (complex) double precision, else float32."""
    double = any(t is not None and t.dtype in (torch.float64, torch.complex128) for t in tensors)
    return torch.float64 if double else torch.float32


def work_dtype(t: torch.Tensor, real: torch.dtype) -> torch.dtype:
    """``real`` or its complex counterpart, following ``t``."""
    if t.is_complex():
        return torch.complex128 if real == torch.float64 else torch.complex64
    return real


def _phi1(z: torch.Tensor) -> torch.Tensor:
    """(exp(z) - 1) / z, equal to 1 at z = 0 (the zero-order-hold input factor)."""
    small = z.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(z), z)
    return torch.where(small, 1 + z / 2, torch.expm1(safe) / safe)


def discretize_ref(A: torch.Tensor, B: torch.Tensor, dt: torch.Tensor, method: str, lam: float):
    """(Ā, B̄, B̄' or None) for diagonal A (d, n) or dense A (d, n, n); B (d, n); dt (d,).

    zoh: Ā = exp(ΔA), B̄ = (ΔA)⁻¹(exp(ΔA) - I) ΔB (dense: one matrix exponential of [[ΔA, ΔB], [0, 0]],
    which needs no inverse). bilinear: Ā = (I - ΔA/2)⁻¹(I + ΔA/2), B̄ = (I - ΔA/2)⁻¹ ΔB.
    trapezoidal (exponential-trapezoidal with weight λ): Ā = exp(ΔA), B̄ = λ Δ B, B̄' = (1 - λ) Δ Ā B.
    """
    diagonal = A.dim() == 2
    dtc = dt.to(A.dtype)
    if diagonal:
        dA = dtc[:, None] * A
        if method == "zoh":
            return torch.exp(dA), _phi1(dA) * dtc[:, None] * B, None
        if method == "bilinear":
            return (1 + dA / 2) / (1 - dA / 2), dtc[:, None] * B / (1 - dA / 2), None
        A_bar = torch.exp(dA)
        return A_bar, lam * dtc[:, None] * B, (1 - lam) * dtc[:, None] * A_bar * B
    d, n = B.shape
    dA = dtc[:, None, None] * A
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    if method == "zoh":
        M = torch.zeros(d, n + 1, n + 1, dtype=A.dtype, device=A.device)
        M[:, :n, :n] = dA
        M[:, :n, n] = dtc[:, None] * B
        E = torch.linalg.matrix_exp(M)
        return E[:, :n, :n], E[:, :n, n], None
    if method == "bilinear":
        left = eye - dA / 2
        return torch.linalg.solve(left, eye + dA / 2), torch.linalg.solve(left, dtc[:, None] * B), None
    A_bar = torch.linalg.matrix_exp(dA)
    B_prev = (1 - lam) * dtc[:, None] * (A_bar @ B.unsqueeze(-1)).squeeze(-1)
    return A_bar, lam * dtc[:, None] * B, B_prev


def transition(A_bar: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Ā h for states h (..., d, n): elementwise for diagonal Ā (d, n), a matrix product for (d, n, n)."""
    if A_bar.dim() == 2:
        return A_bar * h
    return (A_bar @ h.unsqueeze(-1)).squeeze(-1)


def readout(C: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """out(C, h): Σ_n C_n h_n over the last dimension, 2·Re of it for conjugate-pair (complex) states."""
    y = (C * h).sum(-1)
    return 2 * y.real if y.is_complex() else y


def ssm_kernel_ref(A_bar, B_bar, C, length, B_bar_prev=None):
    """K (..., d, L) by iterating v ← Ā v from v = B̄; C (..., d, n)."""
    real = real_dtype(A_bar, B_bar, C, B_bar_prev)
    A_bar, B_bar, C = (t.to(work_dtype(t, real)) for t in (A_bar, B_bar, C))
    v = B_bar
    v_prev = None if B_bar_prev is None else B_bar_prev.to(work_dtype(B_bar_prev, real))
    ks, prev_term = [], None
    for _ in range(length):
        k = readout(C, v)
        if prev_term is not None:
            k = k + prev_term
        ks.append(k)
        if v_prev is not None:
            prev_term = readout(C, v_prev)
            v_prev = transition(A_bar, v_prev)
        v = transition(A_bar, v)
    return torch.stack(ks, dim=-1)


def dplr_recurrence_ref(Lambda, P, Q, B, C, dt, length):
    """The real dense system (Ā (d, N, N), B̄ (d, N), C (..., d, N)) of a conjugate-pair DPLR SSM.

    Full complex system: A = diag([Λ, Λ̄]) - Σ_r [P_r, P̄_r][Q_r, Q̄_r]*, bilinear step Δ; the given
    C is S4's C̃ for ``length``, so the true output matrix is C̃ (I - Ā^L)⁻¹. The change of basis
    s = [u + iv, u - iv] (a conjugate-symmetric state is two real vectors u, v) makes it real.
    """
    real = real_dtype(Lambda, P, B, C, dt)
    cplx = torch.complex128 if real == torch.float64 else torch.complex64
    Lambda, P, Q, B, C = (t.to(cplx) for t in (Lambda, P, Q, B, C))
    n = Lambda.shape[-1]

    def full(t):
        return torch.cat([t, t.conj()], dim=-1)

    A = torch.diag_embed(full(Lambda)) - torch.einsum("rdn,rdm->dnm", full(P), full(Q).conj())
    eye = torch.eye(2 * n, dtype=cplx, device=A.device)
    dA = dt.to(real)[:, None, None] * A
    A_bar = torch.linalg.solve(eye - dA / 2, eye + dA / 2)
    B_bar = torch.linalg.solve(eye - dA / 2, dt.to(real)[:, None] * full(B))
    power = torch.linalg.matrix_power(A_bar, length)
    # Row vector C = C̃ (I - Ā^L)⁻¹, i.e. (I - Ā^L)ᵀ Cᵀ = C̃ᵀ.
    C_true = torch.linalg.solve((eye - power).transpose(-1, -2), full(C).unsqueeze(-1)).squeeze(-1)
    T = torch.cat([torch.cat([eye[:n, :n], 1j * eye[:n, :n]], 1), torch.cat([eye[:n, :n], -1j * eye[:n, :n]], 1)])
    T_inv = torch.linalg.inv(T)
    return (T_inv @ A_bar @ T).real, (T_inv @ B_bar.unsqueeze(-1)).squeeze(-1).real, (C_true @ T).real


def dplr_kernel_ref(Lambda, P, Q, B, C, dt, length):
    """S4's kernel through the dense real system: K_k = C Ā^k B̄ with C = C̃ (I - Ā^L)⁻¹."""
    A_bar, B_bar, C_real = dplr_recurrence_ref(Lambda, P, Q, B, C, dt, length)
    return ssm_kernel_ref(A_bar, B_bar, C_real, length)


def document_runs(seq_idx: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """(b, l) run number of each position: 0 for the first document, +1 at every change of seq_idx."""
    if seq_idx is None:
        return torch.zeros(batch, length, dtype=torch.long, device=device)
    change = torch.zeros(batch, length, dtype=torch.long, device=device)
    change[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
    return change.cumsum(dim=1)


def fft_conv_ref(x, kernel, D=None, kernel_rev=None, seq_idx=None):
    """Direct sums: y_t = Σ_{j<L} K_j x_{t-j} + Σ_{i<L} K'_i x_{t+1+i} + D x_t, within a document."""
    batch, dim, length = x.shape
    real = real_dtype(x, kernel, kernel_rev, D)
    xs, K = x.to(real), kernel.to(real)
    runs = document_runs(seq_idx, batch, length, x.device)
    pos = torch.arange(length, device=x.device)
    ys = []
    for t in range(length):
        acc = torch.zeros(batch, dim, dtype=real, device=x.device)
        past = pos[max(0, t - K.shape[-1] + 1) : t + 1]
        same = (runs[:, past] == runs[:, t : t + 1])[:, None, :]
        # where, not a multiply by 0: a NaN in another document must not leak into this one.
        acc = acc + torch.where(same, K[:, t - past] * xs[:, :, past], 0.0).sum(-1)
        if kernel_rev is not None:
            Kr = kernel_rev.to(real)
            future = pos[t + 1 : t + 1 + Kr.shape[-1]]
            same = (runs[:, future] == runs[:, t : t + 1])[:, None, :]
            acc = acc + torch.where(same, Kr[:, future - t - 1] * xs[:, :, future], 0.0).sum(-1)
        ys.append(acc)
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(real)[:, None] * xs
    return y.to(x.dtype)


def lti_scan_ref(x, A_bar, B_bar, C, D=None, B_bar_prev=None, initial_state=None, initial_input=None,
                 seq_idx=None, return_final_state=False):
    """The recurrence, one position at a time."""
    batch, dim, length = x.shape
    real = real_dtype(x, A_bar, B_bar, C, D, B_bar_prev, initial_state)
    A_bar, B_bar, C = (t.to(work_dtype(t, real)) for t in (A_bar, B_bar, C))
    Bp = None if B_bar_prev is None else B_bar_prev.to(work_dtype(B_bar_prev, real))
    xs = x.to(real)
    h = torch.zeros(batch, *B_bar.shape, dtype=B_bar.dtype, device=x.device)
    if initial_state is not None:
        h = h + initial_state.to(h.dtype)
    x_prev = torch.zeros(batch, dim, dtype=real, device=x.device)
    if initial_input is not None:
        x_prev = x_prev + initial_input.to(real)
    runs = document_runs(seq_idx, batch, length, x.device)
    ys = []
    for t in range(length):
        if t > 0:
            new = (runs[:, t] != runs[:, t - 1])[:, None]
            h = torch.where(new[..., None], torch.zeros_like(h), h)
            x_prev = torch.where(new, torch.zeros_like(x_prev), x_prev)
        h = transition(A_bar, h) + B_bar * xs[:, :, t, None]
        if Bp is not None:
            h = h + Bp * x_prev[..., None]
        y = readout(C, h)
        if D is not None:
            y = y + D.to(real) * xs[:, :, t]
        ys.append(y)
        x_prev = xs[:, :, t]
    y = torch.stack(ys, dim=-1).to(x.dtype)
    return (y, h) if return_final_state else y


def lti_step_ref(state, x, A_bar, B_bar, C, D=None, B_bar_prev=None, prev_input=None):
    """One position: state (b, d, n) and prev_input (b, d) are updated in place; returns y (b, d)."""
    real = real_dtype(state, x, A_bar, B_bar, C)
    xs = x.to(real)
    h = transition(A_bar.to(state.dtype), state) + B_bar.to(state.dtype) * xs[..., None].to(state.dtype)
    if B_bar_prev is not None:
        h = h + B_bar_prev.to(state.dtype) * prev_input.to(state.dtype)[..., None]
        prev_input.copy_(x)
    state.copy_(h)
    y = readout(C.to(work_dtype(C, real)), h.to(work_dtype(h, real)))
    if D is not None:
        y = y + D.to(real) * xs
    return y.to(x.dtype)
