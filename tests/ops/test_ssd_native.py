"""The SSD's intra-chunk scores in one native pass (ops/ssd/native.py) against torch's five ops in chunked.py."""

from __future__ import annotations

import pytest
import torch

from ssmkit.ops.ssd import chunked, mamba_chunk_scan_combined
from ssmkit.ops.ssd.native import native_scores

pytestmark = pytest.mark.skipif(native_scores(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1, 1), -43.0) is None,
                                reason="no C compiler here: the native kernels are not built")


def _torch_scores(cum: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """chunked.py's own path: (k, h, T, T) from cum (k, T, h) and cb (k, g, T, T)."""
    k, T, h = cum.shape
    _, upper = chunked._masks(T, None, cum.dtype, cum.device)
    scores = chunked._decay(cum, upper)
    scores.view(k, cb.shape[1], h // cb.shape[1], T, T).mul_(cb[:, :, None])
    return scores


@pytest.mark.parametrize("T", [1, 15, 16, 17, 50, 256])
@pytest.mark.parametrize("g", [1, 2])
def test_scores_equal_torchs_decay_times_cb(T, g):
    """Mixed decays: slow heads (factors near 1), fast ones (most factors exactly 0, never denormal)."""
    torch.manual_seed(T + g)
    k, h = 3, 6
    rates = torch.tensor([0.01, 0.3, 2.0, 8.0, 30.0, 60.0])
    cum = (-torch.rand(k, T, h) * rates).cumsum(1)
    drop, _ = chunked._masks(T, None, torch.float32, cum.device)
    cb = chunked._masked_cb(torch.randn(k, T, g, 8), torch.randn(k, T, g, 8), drop)
    want = _torch_scores(cum, cb)
    got = native_scores(cum.transpose(1, 2), cb, chunked._log_floor(torch.float32))
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert torch.equal(got == 0, want == 0)  # the same factors dropped (exactly 0, never tiny)
    assert ((got == 0) | (got.abs() >= torch.finfo(torch.float32).tiny)).all()


def test_a_nan_reaches_the_positions_after_it_only():
    """NaN in cum from position 5 of head 1: NaN scores at and below the diagonal from row 5 on (what
    the recurrence reaches), finite everywhere else (torch's path also spreads it above the diagonal)."""
    T, h = 12, 3
    cum = (-torch.rand(1, T, h)).cumsum(1)
    cum[0, 5:, 1] = float("nan")
    drop, _ = chunked._masks(T, None, torch.float32, cum.device)
    cb = chunked._masked_cb(torch.randn(1, T, 1, 4), torch.randn(1, T, 1, 4), drop)
    got = native_scores(cum.transpose(1, 2), cb, chunked._log_floor(torch.float32))
    nan = torch.isnan(got)
    rows, cols = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    assert torch.equal(nan[0, 1], (rows >= 5) & (cols <= rows))
    assert not nan[0, [0, 2]].any()


def test_only_float32_cpu_inputs():
    assert native_scores(torch.zeros(1, 1, 4, dtype=torch.float64), torch.zeros(1, 1, 4, 4), -43.0) is None
    assert native_scores(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4, 4, dtype=torch.bfloat16), -43.0) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_ssd_with_and_without_the_native_scores(monkeypatch, dtype):
    """The whole chunked forward (mamba2-130m's chunk 256, 300 positions: a chunk and a part; groups; strong
    decays) gives the same outputs and final states either way, to float32 rounding."""
    torch.manual_seed(0)
    b, l, h, p, g, n = 2, 300, 4, 8, 2, 16
    args = (torch.randn(b, l, h, p).to(dtype), torch.randn(b, l, h).to(dtype) - 1,
            -torch.tensor([0.5, 4.0, 16.0, 60.0]), torch.randn(b, l, g, n).to(dtype), torch.randn(b, l, g, n).to(dtype))
    kw = {"chunk_size": 256, "D": torch.randn(h), "dt_bias": torch.randn(h), "dt_softplus": True,
          "return_final_states": True, "backend": "chunked"}
    out, final = mamba_chunk_scan_combined(*args, **kw)
    monkeypatch.setattr(chunked, "native_scores", lambda *a: None)
    want, want_final = mamba_chunk_scan_combined(*args, **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding may move by one step
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    torch.testing.assert_close(final, want_final, rtol=1e-5, atol=1e-5)
