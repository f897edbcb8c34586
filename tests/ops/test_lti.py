"""Tests for ssmkit.ops.lti: HiPPO, discretisation, kernels, FFT convolution, recurrence — every mode agrees."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.ops.lti import (
    MEASURES,
    discretize,
    dplr_kernel,
    dplr_recurrence,
    fft_conv,
    hippo,
    hippo_low_rank,
    lti_scan,
    lti_step,
    nplr,
    s4d_init,
    ssm_kernel,
)
from ssmkit.testing import assert_close as _assert_close

F64, C128 = torch.float64, torch.complex128
KINDS = ("real", "complex", "dense")
METHODS = ("zoh", "bilinear", "trapezoidal")


def assert_close(actual, expected, dtype=None, **kw):
    """ssmkit.testing.assert_close, complex tensors compared as (real, imag) pairs."""
    if actual.is_complex() or expected.is_complex():
        real = torch.float32 if actual.dtype == torch.complex64 else F64
        actual, expected = (torch.view_as_real(t.to(C128)) for t in (actual, expected))
        dtype = dtype or real
    _assert_close(actual, expected, dtype, **kw)
    return True


def continuous(kind: str, d: int = 3, n: int = 4, dtype=F64):
    """A stable continuous system (A, B, C (2, d, n), dt) of the given kind."""
    if kind == "real":
        A, B, C = -torch.rand(d, n, dtype=F64) - 0.1, torch.randn(d, n, dtype=F64), torch.randn(2, d, n, dtype=F64)
    elif kind == "complex":
        A = torch.complex(-torch.rand(d, n, dtype=F64) - 0.1, 3 * torch.randn(d, n, dtype=F64))
        B, C = torch.randn(d, n, dtype=C128), torch.randn(2, d, n, dtype=C128)
    else:
        A = torch.randn(d, n, n, dtype=F64) / n**0.5 - 1.5 * torch.eye(n, dtype=F64)
        B, C = torch.randn(d, n, dtype=F64), torch.randn(2, d, n, dtype=F64)
    dt = torch.rand(d, dtype=F64) * 0.3 + 0.05
    if dtype == torch.float32:
        A, B, C = (t.to(torch.complex64 if t.is_complex() else torch.float32) for t in (A, B, C))
        dt = dt.float()
    return A, B, C, dt


def system(kind: str, method: str, **kw):
    A, B, C, dt = continuous(kind, **kw)
    return (*discretize(A, B, dt, method), C)


def packed_seq_idx(batch: int, length: int) -> torch.Tensor:
    cuts = torch.rand(batch, length) < 0.1
    cuts[:, 0] = False
    return cuts.long().cumsum(1).to(torch.int32) + 2


def dplr_params(measure: str, N: int = 8, d: int = 3, dtype=C128):
    Lambda, P, B, _ = nplr(measure, N)
    # LegT/Fourier spectra are purely imaginary; S4 keeps a small decay.
    Lambda = torch.complex(Lambda.real.clamp(max=-1e-2), Lambda.imag)
    expand = lambda t: t.unsqueeze(-2).expand(*t.shape[:-1], d, t.shape[-1]).to(dtype)  # noqa: E731
    C = torch.randn(2, d, N // 2, dtype=C128).to(dtype)
    dt = torch.tensor([0.01, 0.1, 0.5][:d], dtype=F64 if dtype == C128 else torch.float32)
    return expand(Lambda), expand(P), expand(B[None])[0], C, dt


# ---------------------------------------------------------------- HiPPO


@pytest.mark.parametrize("N", [2, 8, 33])
def test_hippo_legs_entries_and_normal_plus_low_rank_identity(N):
    A, B = hippo("legs", N)
    n, k = 3 % N, 1 % N
    if n > k:
        assert math.isclose(A[n, k].item(), -math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1))
    assert torch.equal(torch.diagonal(A), -torch.arange(1, N + 1, dtype=F64))
    assert torch.equal(torch.triu(A, 1), torch.zeros(N, N, dtype=F64))
    assert_close(B, torch.sqrt(2 * torch.arange(N, dtype=F64) + 1), name="B")
    P = hippo_low_rank("legs", N)
    assert_close(P[0], torch.sqrt(torch.arange(N, dtype=F64) + 0.5), name="P")
    S = A + P.T @ P + 0.5 * torch.eye(N, dtype=F64)
    assert_close(S + S.T, torch.zeros(N, N, dtype=F64), atol=1e-12, name="A + P Pᵀ + I/2 is skew")


@pytest.mark.parametrize("measure", ["legt", "fourier"])
def test_hippo_legt_fourier_low_rank_makes_a_skew_matrix(measure):
    A, _ = hippo(measure, 16)
    P = hippo_low_rank(measure, 16)
    assert P.shape == ((2, 16) if measure == "legt" else (1, 16))
    S = A + P.T @ P
    assert_close(S + S.T, torch.zeros(16, 16, dtype=F64), atol=1e-12, name="skew")


@pytest.mark.parametrize("N", [2, 8, 64])
@pytest.mark.parametrize("measure", MEASURES)
def test_nplr_reconstructs_the_hippo_matrix(measure, N):
    A, B = hippo(measure, N)
    P = hippo_low_rank(measure, N)
    Lambda, Pt, Bt, V = nplr(measure, N)
    assert Lambda.shape == (N // 2,) and Pt.shape == (P.shape[0], N // 2) and V.shape == (N, N // 2)
    assert bool((Lambda.imag <= 1e-12).all())
    full = torch.cat([V, V.conj()], dim=1)
    assert_close(full.conj().T @ full, torch.eye(N, dtype=C128), atol=1e-12, name="[V, V̄] unitary")
    rebuilt = 2 * (V @ torch.diag(Lambda) @ V.conj().T).real - P.T @ P
    assert_close(rebuilt, A, rtol=1e-12, name="A = 2Re(VΛV*) - PᵀP")
    assert_close(2 * (V @ Bt).real, B, rtol=1e-12, name="B = 2Re(V V*B)")
    if measure == "legs":
        assert_close(Lambda.real, torch.full((N // 2,), -0.5, dtype=F64), name="Re Λ = -1/2")


def test_s4d_initialisations():
    Lambda, B = s4d_init("lin", 8)
    assert_close(Lambda, torch.complex(torch.full((4,), -0.5, dtype=F64), math.pi * torch.arange(4, dtype=F64)))
    assert torch.equal(B, torch.ones(4, dtype=C128))
    Lambda, _ = s4d_init("inv", 8)
    n = torch.arange(4, dtype=F64)
    assert_close(Lambda.imag, (8 / math.pi) * (8 / (2 * n + 1) - 1), name="S4D-Inv")
    Lambda, B = s4d_init("legs", 8)
    ref = nplr("legs", 8)
    assert torch.equal(Lambda, ref.Lambda) and torch.equal(B, ref.B)
    with pytest.raises(ValueError, match="N must be an even int"):
        s4d_init("lin", 7)
    with pytest.raises(ValueError, match="kind must be one of"):
        s4d_init("fourier", 8)
    with pytest.raises(ValueError, match="measure must be one of"):
        nplr("chebyshev", 8)


# ---------------------------------------------------------------- discretisation


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["real", "complex"])
def test_diagonal_and_dense_discretisations_agree(kind, method):
    A, B, _, dt = continuous(kind)
    diag = discretize(A, B, dt, method, lam=0.3)
    dense = discretize(torch.diag_embed(A), B, dt, method, lam=0.3)
    assert_close(torch.diag_embed(diag.A_bar), dense.A_bar, name="A_bar")
    assert_close(diag.B_bar, dense.B_bar, name="B_bar")
    assert (diag.B_bar_prev is None) == (method != "trapezoidal")
    if diag.B_bar_prev is not None:
        assert_close(diag.B_bar_prev, dense.B_bar_prev, name="B_bar_prev")


def test_discretisation_formulas():
    A, B, _, dt = continuous("dense")
    A_bar, B_bar, _ = discretize(A, B, dt, "zoh")
    assert_close(A_bar, torch.linalg.matrix_exp(dt[:, None, None] * A), name="zoh Ā")
    # ZOH: A B̄ = (Ā - I) B exactly.
    assert_close((A @ B_bar[..., None])[..., 0], ((A_bar - torch.eye(4, dtype=F64)) @ B[..., None])[..., 0])
    A_bar, B_bar, _ = discretize(A, B, dt, "bilinear")
    left = torch.eye(4, dtype=F64) - dt[:, None, None] * A / 2
    assert_close(left @ A_bar, torch.eye(4, dtype=F64) + dt[:, None, None] * A / 2, name="bilinear Ā")
    A_bar, B_bar, B_prev = discretize(A, B, dt, "trapezoidal", lam=1.0)
    assert_close(B_bar, dt[:, None] * B) and assert_close(B_prev, torch.zeros_like(B))
    # A = 0: zero-order hold integrates the input exactly, B̄ = ΔB.
    zero = discretize(torch.zeros(2, 3, dtype=F64), torch.ones(2, 3, dtype=F64), torch.tensor([0.5, 2.0], dtype=F64))
    assert_close(zero.B_bar, torch.tensor([[0.5] * 3, [2.0] * 3], dtype=F64))


# ---------------------------------------------------------------- kernels


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("length", [1, 63, 257])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_ssm_kernel_chunked_matches_reference(kind, method, length, dtype):
    A_bar, B_bar, B_prev, C = system(kind, method, dtype=dtype)
    expected = ssm_kernel(*(t.to(C128 if t.is_complex() else F64) for t in (A_bar, B_bar, C)), length,
                          B_bar_prev=None if B_prev is None else B_prev.to(C128 if B_prev.is_complex() else F64),
                          backend="reference")
    K = ssm_kernel(A_bar, B_bar, C, length, B_bar_prev=B_prev)
    assert K.shape == (2, 3, length) and K.dtype == dtype
    assert_close(K, expected, dtype, name=f"{kind} {method} kernel")


@pytest.mark.parametrize("length", [1, 2, 63, 256])
@pytest.mark.parametrize("measure", MEASURES)
def test_dplr_kernel_cauchy_matches_dense_reference(measure, length):
    Lambda, P, B, C, dt = dplr_params(measure)
    expected = dplr_kernel(Lambda, P, B, C, dt, length, backend="reference")
    assert_close(dplr_kernel(Lambda, P, B, C, dt, length), expected, name="cauchy kernel")
    A_bar, B_bar, C_real = dplr_recurrence(Lambda, P, B, C, dt, length)
    assert A_bar.dtype == F64 and A_bar.shape == (3, 8, 8) and C_real.shape == (2, 3, 8)
    assert_close(ssm_kernel(A_bar, B_bar, C_real, length), expected, name="recurrent form's kernel")
    Q = torch.randn_like(P) * 0.1 + P
    assert_close(dplr_kernel(Lambda, P, B, C, dt, length, Q=Q),
                 dplr_kernel(Lambda, P, B, C, dt, length, Q=Q, backend="reference"), name="Q != P")


def test_s4_kernel_equals_the_real_hippo_system():
    """nplr + Cauchy kernel == the bilinear kernel of the original real HiPPO-LegS matrices."""
    N, L = 8, 100
    A, B = hippo("legs", N)
    Lambda, P, Bt, V = nplr("legs", N)
    dt = torch.tensor([0.05, 0.3], dtype=F64)
    C_tilde = torch.randn(2, N, dtype=F64)  # the real system's C̃ = C (I - Ā^L)
    eye = torch.eye(N, dtype=F64)
    A_bar = torch.linalg.solve(eye - dt[:, None, None] * A / 2, eye + dt[:, None, None] * A / 2)
    B_bar = torch.linalg.solve(eye - dt[:, None, None] * A / 2, dt[:, None] * B)
    C = torch.linalg.solve((eye - torch.linalg.matrix_power(A_bar, L)).transpose(-1, -2), C_tilde[..., None])[..., 0]
    expected = ssm_kernel(A_bar, B_bar, C, L, backend="reference")
    K = dplr_kernel(Lambda.expand(2, -1), P[:, None].expand(-1, 2, -1), Bt.expand(2, -1),
                    C_tilde.to(C128) @ V, dt, L)
    assert_close(K, expected, rtol=1e-11, name="DPLR kernel vs real HiPPO")


def test_modes_agree_at_16k_without_overflow():
    """Convolution mode == recurrent mode == dense float64 reference at L = 16384 (S4D-Lin and S4-LegS)."""
    L, d = 16384, 2
    dt = torch.tensor([1e-3, 0.1], dtype=F64)
    Lambda, B = s4d_init("lin", 16)
    C = torch.randn(d, 8, dtype=C128)
    A_bar, B_bar, _ = discretize(Lambda.expand(d, -1), B.expand(d, -1), dt, "zoh")
    reference = ssm_kernel(A_bar, B_bar, C, L, backend="reference")
    K32 = ssm_kernel(A_bar.to(torch.complex64), B_bar.to(torch.complex64), C.to(torch.complex64), L)
    assert bool(torch.isfinite(K32).all())
    assert_close(ssm_kernel(A_bar, B_bar, C, L), reference, name="Vandermonde fp64")
    assert_close(K32, reference, torch.float32, name="Vandermonde fp32")
    x = torch.randn(1, d, L, dtype=F64)
    recurrent = lti_scan(x, A_bar, B_bar, C, backend="reference")
    assert_close(fft_conv(x, reference), recurrent, rtol=1e-11, name="FFT conv vs recurrence")
    assert_close(fft_conv(x.float(), K32), recurrent, torch.float32, name="FFT conv fp32")

    Lambda, P, B, C, dt = dplr_params("legs", N=16, d=2)
    reference = dplr_kernel(Lambda, P, B, C[0], dt, L, backend="reference")
    assert_close(dplr_kernel(Lambda, P, B, C[0], dt, L), reference, name="Cauchy fp64")
    K32 = dplr_kernel(*(t.to(torch.complex64) for t in (Lambda, P, B, C[0])), dt.float(), L)
    assert bool(torch.isfinite(K32).all())
    assert_close(K32, reference, torch.float32, name="Cauchy fp32")


# ---------------------------------------------------------------- FFT convolution


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("length,klen", [(1, 1), (63, 63), (63, 10), (257, 300)])
def test_fft_conv_matches_direct_sums(length, klen, two_sided, packed, dtype):
    x = torch.randn(2, 3, length, dtype=dtype)
    K, Kr, D = torch.randn(3, klen, dtype=dtype), torch.randn(3, klen + 3, dtype=dtype), torch.randn(3, dtype=dtype)
    seq_idx = packed_seq_idx(2, length) if packed else None
    kw = {"kernel_rev": Kr if two_sided else None, "seq_idx": seq_idx}
    expected = fft_conv(x.double(), K.double(), D.double(), backend="reference",
                        **{**kw, "kernel_rev": None if not two_sided else Kr.double()})
    y = fft_conv(x, K, D, **kw)
    assert y.dtype == dtype
    assert_close(y, expected, dtype, name="fft_conv")


def test_fft_conv_packed_equals_documents_alone_and_nan_behaviour():
    x, K, Kr = torch.randn(1, 2, 30, dtype=F64), torch.randn(2, 30, dtype=F64), torch.randn(2, 30, dtype=F64)
    seq_idx = torch.tensor([[0] * 12 + [1] * 18])
    y = fft_conv(x, K, kernel_rev=Kr, seq_idx=seq_idx)
    assert_close(y[..., :12], fft_conv(x[..., :12], K, kernel_rev=Kr), name="doc 0")
    assert_close(y[..., 12:], fft_conv(x[..., 12:], K, kernel_rev=Kr), name="doc 1")
    x[0, 0, 15] = float("nan")
    ref = fft_conv(x, K, seq_idx=seq_idx, backend="reference")
    assert torch.isnan(ref[0, 0, 15:]).all() and not torch.isnan(ref[0, 0, :15]).any()
    fast = fft_conv(x, K, seq_idx=seq_idx)
    assert torch.isnan(fast[0, 0, 12:]).all(), "FFT spreads a NaN over its document"
    assert not torch.isnan(fast[0, 0, :12]).any() and not torch.isnan(fast[0, 1]).any()


# ---------------------------------------------------------------- recurrence and convolution mode


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("packed,init", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("length", [1, 63])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_lti_scan_convolution_mode_matches_recurrence(kind, method, length, packed, init, dtype):
    A_bar, B_bar, B_prev, C = system(kind, method, dtype=dtype)
    x = torch.randn(2, 3, length, dtype=dtype)
    D = torch.randn(3, dtype=dtype)
    kw = {
        "B_bar_prev": B_prev,
        "initial_state": torch.randn(2, 3, 4, dtype=B_bar.dtype) if init else None,
        "initial_input": torch.randn(2, 3, dtype=dtype) if init and B_prev is not None else None,
        "seq_idx": packed_seq_idx(2, length) if packed else None,
        "return_final_state": True,
    }
    up = lambda t: t if t is None or not torch.is_tensor(t) or not (t.is_floating_point() or t.is_complex()) \
        else t.to(C128 if t.is_complex() else F64)  # noqa: E731
    y_ref, h_ref = lti_scan(up(x), up(A_bar), up(B_bar), up(C[0]), up(D), backend="reference",
                            **{k: up(v) for k, v in kw.items()})
    y, h = lti_scan(x, A_bar, B_bar, C[0], D, **kw)
    assert y.dtype == dtype and h.dtype == B_bar.dtype
    assert_close(y, y_ref, dtype, name="y")
    assert_close(h, h_ref, dtype, name="final state")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_steps_equal_scan_and_packing_equals_documents_alone(kind, method):
    A_bar, B_bar, B_prev, C = system(kind, method)
    x, D = torch.randn(2, 3, 20, dtype=F64), torch.randn(3, dtype=F64)
    y, h = lti_scan(x, A_bar, B_bar, C[0], D, B_bar_prev=B_prev, return_final_state=True)
    state = torch.zeros(2, 3, 4, dtype=B_bar.dtype)
    prev = torch.zeros(2, 3, dtype=F64) if B_prev is not None else None
    steps = torch.stack([lti_step(state, x[..., t], A_bar, B_bar, C[0], D, B_bar_prev=B_prev, prev_input=prev)
                         for t in range(20)], dim=-1)
    assert_close(steps, y, name="steps") and assert_close(state, h, name="state")
    seq_idx = torch.tensor([[4] * 7 + [5] * 13] * 2)
    packed, h_packed = lti_scan(x, A_bar, B_bar, C[0], D, B_bar_prev=B_prev, seq_idx=seq_idx, return_final_state=True)
    alone, h_alone = lti_scan(x[..., 7:], A_bar, B_bar, C[0], D, B_bar_prev=B_prev, return_final_state=True)
    assert_close(packed[..., :7], y[..., :7], name="doc 0") and assert_close(packed[..., 7:], alone, name="doc 1")
    assert_close(h_packed, h_alone, name="state of the last document")


@given(batch=st.integers(1, 3), d=st.integers(1, 4), n=st.integers(1, 5), length=st.integers(1, 40),
       kind=st.sampled_from(KINDS), packed=st.booleans())
def test_fuzz_shapes(batch, d, n, length, kind, packed):
    A_bar, B_bar, _, C = system(kind, "zoh", d=d, n=n)
    x = torch.randn(batch, d, length, dtype=F64)
    seq_idx = packed_seq_idx(batch, length) if packed else None
    h0 = torch.randn(batch, d, n, dtype=B_bar.dtype)
    ref = lti_scan(x, A_bar, B_bar, C[0], initial_state=h0, seq_idx=seq_idx, return_final_state=True,
                   backend="reference")
    out = lti_scan(x, A_bar, B_bar, C[0], initial_state=h0, seq_idx=seq_idx, return_final_state=True)
    assert_close(out[0], ref[0], name="y") and assert_close(out[1], ref[1], name="state")


def test_nan_in_the_recurrence_stays_in_its_channel_and_document():
    A_bar, B_bar, _, C = system("complex", "zoh")
    x = torch.randn(1, 3, 12, dtype=F64)
    x[0, 1, 4] = float("nan")
    seq_idx = torch.tensor([[0] * 8 + [1] * 4])
    ref = lti_scan(x, A_bar, B_bar, C[0], seq_idx=seq_idx, backend="reference")
    assert torch.isnan(ref[0, 1, 4:8]).all() and not torch.isnan(ref[0, 1, :4]).any()
    assert not torch.isnan(ref[0, 1, 8:]).any() and not torch.isnan(ref[0, [0, 2]]).any()
    fast = lti_scan(x, A_bar, B_bar, C[0], seq_idx=seq_idx)
    assert torch.isnan(fast[0, 1, :8]).all() and not torch.isnan(fast[0, 1, 8:]).any()


# ---------------------------------------------------------------- gradients


def test_gradcheck_float64():
    A, B, C, dt = continuous("complex", d=2, n=2)
    for t in (A, B, C, dt):
        t.requires_grad_()

    def kernel(A, B, C, dt):
        return ssm_kernel(*discretize(A, B, dt, "zoh")[:2], C, 7)

    assert torch.autograd.gradcheck(kernel, (A, B, C, dt))
    Lambda, P, Bd, Cd, dtd = (t.detach()[..., :2, :] if t.dim() > 1 else t[:2] for t in dplr_params("legs", N=4, d=2))
    args = tuple(t.clone().requires_grad_() for t in (Lambda, P, Bd, Cd[0], dtd))
    assert torch.autograd.gradcheck(lambda *a: dplr_kernel(*a, 6), args)
    x, K, Kr = (torch.randn(s, dtype=F64, requires_grad=True) for s in ((2, 2, 6), (2, 4), (2, 3)))
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 2]])
    assert torch.autograd.gradcheck(lambda x, K, Kr: fft_conv(x, K, kernel_rev=Kr, seq_idx=seq_idx), (x, K, Kr))
    A_bar, B_bar, B_prev, Cs = (t.detach().requires_grad_() for t in system("dense", "trapezoidal", d=2, n=2))
    h0 = torch.randn(2, 2, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, A, B, Bp, C, h0: lti_scan(x, A, B, C[0], B_bar_prev=Bp, initial_state=h0, seq_idx=seq_idx,
                                            return_final_state=True),
        (x, A_bar, B_bar, B_prev, Cs, h0))


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_gradients_match_reference_fp32(kind):
    grads = {}
    for backend in ("reference", "chunked"):
        torch.manual_seed(3)
        A, B, C, dt = continuous(kind, dtype=torch.float32)
        leaves = [t.requires_grad_() for t in (A, B, C, dt)]
        x = torch.randn(2, 3, 33, requires_grad=True)
        h0 = torch.randn(2, 3, 4, dtype=B.dtype, requires_grad=True)
        A_bar, B_bar, _ = discretize(A, B, dt, "zoh")
        y, h = lti_scan(x, A_bar, B_bar, C[0], initial_state=h0, seq_idx=packed_seq_idx(2, 33),
                        return_final_state=True, backend=backend)
        (y.square().sum() + torch.view_as_real(h.to(torch.complex64)).sum()).backward()
        grads[backend] = [t.grad for t in (*leaves, x, h0)]
    for name, g, e in zip("A B C dt x h0".split(), grads["chunked"], grads["reference"]):
        assert_close(g, e, torch.float32, rtol=1e-3, name=f"d{name}")


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_name_the_argument():
    A_bar, B_bar, _, C = system("real", "zoh")
    x = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"A_bar must have shape \(d, n\) \(diagonal\) or \(d, n, n\)"):
        ssm_kernel(torch.ones(3), B_bar, C[0], 4)
    with pytest.raises(ValueError, match="B_bar must have shape"):
        ssm_kernel(A_bar, B_bar[:, :2], C[0], 4)
    with pytest.raises(TypeError, match="A_bar must be a floating-point or complex tensor"):
        ssm_kernel(A_bar.long(), B_bar, C[0], 4)
    with pytest.raises(TypeError, match="B_bar must be complex exactly when A_bar is"):
        ssm_kernel(A_bar, B_bar.to(C128), C[0], 4)
    with pytest.raises(ValueError, match="length must be a positive int"):
        ssm_kernel(A_bar, B_bar, C[0], 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        ssm_kernel(A_bar, B_bar, C[0], 4, backend="fast")
    with pytest.raises(ValueError, match="x must have shape"):
        lti_scan(torch.randn(2, 4, 5, dtype=F64), A_bar, B_bar, C[0])
    with pytest.raises(ValueError, match="x has an empty batch"):
        lti_scan(torch.randn(0, 3, 5, dtype=F64), A_bar, B_bar, C[0])
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        fft_conv(x.long(), torch.randn(3, 5))
    with pytest.raises(ValueError, match="seq_idx must have shape"):
        fft_conv(x, torch.randn(3, 5), seq_idx=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="seq_idx must be an integer tensor"):
        fft_conv(x, torch.randn(3, 5), seq_idx=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        lti_scan(x, A_bar, B_bar, C[0], initial_state=torch.zeros(2, 3, 5, dtype=F64))
    with pytest.raises(ValueError, match="kernel must have at least l = 5"):
        lti_scan(x, A_bar, B_bar, C[0], kernel=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        fft_conv(x, torch.randn(3, 5, device="meta"))
    with pytest.raises(ValueError, match="B_bar_prev and prev_input go together"):
        lti_step(torch.zeros(2, 3, 4, dtype=F64), x[..., 0], A_bar, B_bar, C[0], B_bar_prev=B_bar)
    with pytest.raises(TypeError, match="state must be complex exactly when A_bar is"):
        lti_step(torch.zeros(2, 3, 4, dtype=C128), x[..., 0], A_bar, B_bar, C[0])
    with pytest.raises(ValueError, match="method must be one of"):
        discretize(-torch.ones(3, 4), torch.ones(3, 4), torch.ones(3), "euler")
    with pytest.raises(ValueError, match="P must have shape"):
        dplr_kernel(torch.ones(3, 4, dtype=C128), torch.ones(3, 4, dtype=C128), torch.ones(3, 4, dtype=C128),
                    torch.ones(3, 4, dtype=C128), torch.ones(3), 8)
