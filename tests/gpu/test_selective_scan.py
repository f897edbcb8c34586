"""Triton selective scan on the GPU: output, last state and every gradient against the float64 sequential
reference (run on upcast copies of the same low-precision inputs), over dtypes, odd lengths, groups,
packed documents, initial states and layouts.

Run on a CUDA machine: ``python -m pytest -m gpu tests/gpu/test_selective_scan.py -q``.
"""

from __future__ import annotations

import pytest
import torch

from ssmkit.ops.selective_scan import ScanInputs, selective_scan_fn
from ssmkit.ops.selective_scan.reference import selective_scan_reference
from ssmkit.testing import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
pytest.importorskip("triton")

from ssmkit.ops.selective_scan import triton as triton_backend
from ssmkit.ops.selective_scan.triton import ScanConfig

CUDA = "cuda"
FP = (torch.float32, torch.bfloat16, torch.float16)
# Every kernel family, whichever is the default: the state-index loop, the fused-state tiles, time-wise.
VARIANTS = {
    "state_loop": ScanConfig(chunk=128, fwd_block_d=8, fwd_warps=4, bwd_block_d=16, bwd_warps=8),
    "fused_states": ScanConfig(
        chunk=16, fwd_block_d=8, fwd_warps=4, bwd_block_d=8, bwd_warps=4, fused_states=True, fwd_chunk=32
    ),
    # The time-wise kernels: short tiles (several per test sequence; two-channel backward programs) and the
    # longest candidate tile.
    "timewise_256": ScanConfig(chunk=256, fwd_block_d=1, fwd_warps=2, bwd_block_d=2, bwd_warps=4, timewise=True),
    "timewise_2048": ScanConfig(chunk=2048, fwd_block_d=1, fwd_warps=8, bwd_block_d=1, bwd_warps=8, timewise=True),
    "training_default": triton_backend.TRAINING_CONFIG,
    "timewise_default": triton_backend.TIMEWISE_CONFIG,
}


@pytest.fixture(autouse=True, params=list(VARIANTS))
def variant(request, monkeypatch):
    """Every test runs once per kernel variant: the public function reads its configs per call (the
    training one when a gradient is needed, the time-wise one for time-contiguous inputs), so all three are
    set to the variant."""
    monkeypatch.setattr(triton_backend, "DEFAULT_CONFIG", VARIANTS[request.param])
    monkeypatch.setattr(triton_backend, "TRAINING_CONFIG", VARIANTS[request.param])
    monkeypatch.setattr(triton_backend, "TIMEWISE_CONFIG", VARIANTS[request.param])
    return request.param


def _inputs(b, d, n, l, groups, dtype, *, extras, init, packed, time_major=False, seed=0):
    """Low-precision inputs (A, D, delta_bias in float32 as a Mamba layer keeps them) and seq_idx."""
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    bc = (b, n, l) if groups is None else (b, groups, n, l)

    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=gen, device=CUDA, dtype=torch.float64) * scale + shift

    kw = {
        "u": randn(b, d, l),
        # Positive Δ unless softplus makes it so: a negative Δ with negative A grows without bound.
        "delta": randn(b, d, l, shift=-1.0)
        if extras
        else torch.rand(b, d, l, generator=gen, device=CUDA, dtype=torch.float64) * 0.5,
        "A": -torch.rand(d, n, generator=gen, device=CUDA, dtype=torch.float64) * 4 - 0.1,
        "B": randn(*bc),
        "C": randn(*bc),
    }
    if extras:
        kw.update(D=randn(d), z=randn(b, d, l), delta_bias=randn(d, scale=0.5))
    if init:
        kw["initial_state"] = randn(b, d, n)
    params = {"A", "D", "delta_bias", "initial_state"}
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    low = {k: v.to(param_dtype if k in params else dtype) for k, v in kw.items()}
    if time_major:
        for k in ("u", "delta", "z"):
            if k in low:
                low[k] = low[k].transpose(1, 2).contiguous().transpose(1, 2)
    seq_idx = None
    if packed:
        cuts = torch.rand(b, l, generator=gen, device=CUDA) < 0.002 + 4.0 / max(l, 1)
        cuts[:, 0] = False
        seq_idx = cuts.long().cumsum(dim=1)
    return low, seq_idx


def _check(low, seq_idx, dtype, softplus, backend="triton"):
    leaves = {k: v.detach().requires_grad_(True) for k, v in low.items()}
    out, last = selective_scan_fn(
        **leaves, delta_softplus=softplus, return_last_state=True, seq_idx=seq_idx, backend=backend
    )
    ref_in = {k: v.detach().double().requires_grad_(True) for k, v in low.items()}
    ref_out, ref_last = selective_scan_reference(
        ScanInputs.from_args({**ref_in, "delta_softplus": softplus, "seq_idx": seq_idx})
    )
    assert out.dtype == low["u"].dtype and out.stride() == low["u"].stride()
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert last.dtype == state_dtype
    assert_close(out, ref_out, dtype, name="out")
    assert_close(last, ref_last, state_dtype, name="last_state")

    gen = torch.Generator(device=CUDA).manual_seed(123)
    dout = torch.randn(ref_out.shape, generator=gen, device=CUDA, dtype=torch.float64)
    dlast = torch.randn(ref_last.shape, generator=gen, device=CUDA, dtype=torch.float64)
    grads = torch.autograd.grad(
        (out * dout.to(out.dtype)).sum() + (last * dlast.to(last.dtype)).sum(), list(leaves.values())
    )
    ref_grads = torch.autograd.grad((ref_out * dout).sum() + (ref_last * dlast).sum(), list(ref_in.values()))
    for key, g, rg in zip(leaves, grads, ref_grads):
        assert g.dtype == leaves[key].dtype and g.shape == leaves[key].shape, key
        # Gradients of float32 parameters are sums over b·l of low-precision products: judged by the
        # precision of the inputs they come from.
        assert_close(g, rg, dtype, name=f"d{key}")


@pytest.mark.parametrize("dtype", FP)
@pytest.mark.parametrize("l", [1, 63, 1000])
def test_all_options(dtype, l):
    groups = None if l == 1 else 4
    low, seq_idx = _inputs(2, 48, 16, l, groups, dtype, extras=True, init=True, packed=l > 1, seed=l)
    _check(low, seq_idx, dtype, softplus=True)


@pytest.mark.parametrize("dtype", FP)
def test_long_sequence_plain(dtype):
    low, seq_idx = _inputs(1, 32, 16, 4097, None, dtype, extras=False, init=False, packed=False, seed=7)
    _check(low, seq_idx, dtype, softplus=False)


def test_long_sequence_packed_groups_bf16():
    low, seq_idx = _inputs(2, 64, 16, 4097, 2, torch.bfloat16, extras=True, init=True, packed=True, seed=8)
    _check(low, seq_idx, torch.bfloat16, softplus=True)


@pytest.mark.parametrize("n", [1, 5, 64])
def test_state_sizes_and_one_channel_groups(n):
    # g = d: one channel per group, and state sizes that are not powers of two.
    low, seq_idx = _inputs(2, 6, n, 77, 6, torch.float32, extras=True, init=True, packed=True, seed=n)
    _check(low, seq_idx, torch.float32, softplus=True)


def test_time_major_layout_bf16():
    low, seq_idx = _inputs(2, 64, 16, 300, None, torch.bfloat16, extras=True, init=False, packed=False,
                           time_major=True, seed=3)
    _check(low, seq_idx, torch.bfloat16, softplus=True)


def test_float64_is_exact_to_rounding():
    low, seq_idx = _inputs(2, 24, 8, 200, 3, torch.float64, extras=True, init=True, packed=True, seed=4)
    _check(low, seq_idx, torch.float64, softplus=True)


def test_auto_backend_picks_triton_and_matches():
    low, seq_idx = _inputs(1, 32, 16, 129, None, torch.bfloat16, extras=True, init=False, packed=False, seed=5)
    _check(low, seq_idx, torch.bfloat16, softplus=True, backend="auto")


def test_large_delta_and_decay_stay_finite():
    # Δ up to ~30 (softplus past its threshold) and A down to -100: decays underflow to exactly 0.
    low, _ = _inputs(1, 16, 16, 257, None, torch.float32, extras=True, init=True, packed=False, seed=6)
    low["delta"] = low["delta"] * 10
    low["A"] = low["A"] * 25
    _check(low, None, torch.float32, softplus=True)
