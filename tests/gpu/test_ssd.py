"""Triton SSD on a CUDA GPU against the float64 reference: outputs, final and varlen states, every gradient.

Run on the device machine: ``python -m pytest -m gpu tests/gpu/test_ssd.py -q``.
"""

from __future__ import annotations

import pytest
import torch

from ssmkit.ops.ssd import mamba_chunk_scan_combined
from ssmkit.ops.ssd.launch import CONFIGS as LAUNCH_CONFIGS
from ssmkit.testing import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LENGTHS = [1, 63, 1000, 4097]
# name -> (h, p, g, n, chunk_size, options). p = 48 and n = 40 leave partial tiles; chunk 100 runs as 128.
CONFIGS = {
    "mamba2_gated": (4, 64, 1, 128, 256, "D_h z bias softplus init"),
    "groups_odd_dims": (8, 48, 4, 40, 64, "D_hp z bias softplus limit"),
    "docs_init": (4, 32, 2, 64, 100, "D_h bias softplus init docs"),
    "bare": (2, 16, 1, 16, 128, ""),
    # Mamba-3's route: x weighed by input_scale, Δ only decays; one group per head, as it calls it.
    "input_scale": (4, 64, 4, 128, 64, "D_h z softplus init docs scale"),
    "input_scale_groups": (8, 48, 2, 40, 64, "D_hp z bias softplus limit docs scale"),
}


def make_inputs(b, l, h, p, g, n, dtype, options, device="cuda"):
    opts = options.split()
    shapes = {"x": (b, l, h, p), "dt": (b, l, h), "A": (h,), "B": (b, l, g, n), "C": (b, l, g, n)}
    if "D_h" in opts:
        shapes["D"] = (h,)
    if "D_hp" in opts:
        shapes["D"] = (h, p)
    if "z" in opts:
        shapes["z"] = (b, l, h, p)
    if "bias" in opts:
        shapes["dt_bias"] = (h,)
    if "init" in opts:
        shapes["initial_states"] = (b, h, p, n)
    if "scale" in opts:
        shapes["input_scale"] = (b, l, h)
    inp = {k: torch.randn(s, device=device) for k, s in shapes.items()}
    # Without softplus, Δ = dt itself must be positive for a stable SSM.
    inp["dt"] = inp["dt"] - 1.0 if "softplus" in opts else torch.rand(b, l, h, device=device) * 0.5
    inp["A"] = -torch.rand(h, device=device) * 2 - 0.1
    if "dt_bias" in inp:
        inp["dt_bias"] = inp["dt_bias"] * 0.5
    return {k: v.to(dtype).requires_grad_() for k, v in inp.items()}


def _doc_ids(b, l, device):
    """Documents of random lengths, ids reused (0, 1, 0, ...): runs, not values, separate documents."""
    change = torch.rand(b, l, device=device) < min(0.3, 12 / l)
    return (change.cumsum(1) % 2).to(torch.int32)


def _compare(inp, kw, dtype, launch=None):
    inp64 = {k: v.detach().double().requires_grad_() for k, v in inp.items()}
    got = mamba_chunk_scan_combined(**inp, **kw, backend="triton", launch=launch)
    want = mamba_chunk_scan_combined(**inp64, **kw, backend="reference")
    assert got[0].dtype == dtype and all(s.dtype == torch.float32 for s in got[1:])
    for name, a, e in zip(["out", "final_states", "varlen_states"], got, want):
        assert_close(a, e, dtype, name=name)
    weights = [torch.randn_like(e) for e in want]
    grads = torch.autograd.grad(sum((a.double() * w).sum() for a, w in zip(got, weights)), list(inp.values()))
    grads64 = torch.autograd.grad(sum((e * w).sum() for e, w in zip(want, weights)), list(inp64.values()))
    for name, a, e in zip(inp, grads, grads64):
        assert a.dtype == inp[name].dtype, name
        assert_close(a, e, dtype, name=f"d{name}")


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(dtype, length, config):
    h, p, g, n, chunk_size, options = CONFIGS[config]
    torch.manual_seed(length)
    inp = make_inputs(2, length, h, p, g, n, dtype, options)
    kw = {"chunk_size": chunk_size, "dt_softplus": "softplus" in options, "return_final_states": True}
    if "limit" in options:
        kw["dt_limit"] = (0.05, 2.0)
    if "docs" in options:
        kw["seq_idx"] = _doc_ids(2, length, "cuda")
    _compare(inp, kw, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", [(1, 62, 1, 300, 137), (700, 1), (5,)])
@pytest.mark.parametrize("scale", ["", "scale"])
def test_varlen_states(dtype, lengths, scale):
    torch.manual_seed(len(lengths))
    inp = make_inputs(1, sum(lengths), 4, 32, 1, 64, dtype, f"D_h z bias softplus init {scale}")
    cu = torch.tensor([0, *lengths], device="cuda").cumsum(0)
    kw = {"chunk_size": 64, "dt_softplus": True, "cu_seqlens": cu, "return_final_states": True,
          "return_varlen_states": True}
    _compare(inp, kw, dtype)


def test_final_states_gradient_alone():
    """Only final_states used: the backward works without an output gradient."""
    inp = make_inputs(2, 300, 4, 32, 1, 32, torch.float32, "D_h z init softplus")
    inp64 = {k: v.detach().double().requires_grad_() for k, v in inp.items()}
    _, final = mamba_chunk_scan_combined(**inp, chunk_size=64, dt_softplus=True, return_final_states=True,
                                         backend="triton")
    _, final64 = mamba_chunk_scan_combined(**inp64, chunk_size=64, dt_softplus=True, return_final_states=True,
                                           backend="reference")
    w = torch.randn_like(final64)
    names = [k for k in inp if k not in ("C", "D", "z")]  # C, D and z do not reach the state
    grads = torch.autograd.grad((final.double() * w).sum(), [inp[k] for k in names])
    grads64 = torch.autograd.grad((final64 * w).sum(), [inp64[k] for k in names])
    for name, a, e in zip(names, grads, grads64):
        assert_close(a, e, torch.float32, name=f"d{name}")


def test_auto_picks_triton_and_matches():
    inp = make_inputs(2, 200, 4, 32, 1, 32, torch.bfloat16, "D_h z bias softplus")
    with torch.no_grad():
        auto = mamba_chunk_scan_combined(**inp, chunk_size=64, dt_softplus=True, backend="auto")
        triton = mamba_chunk_scan_combined(**inp, chunk_size=64, dt_softplus=True, backend="triton")
    assert torch.equal(auto, triton)


LAUNCH_NAMES = [name for name in LAUNCH_CONFIGS if name != "default"]


@pytest.mark.parametrize("launch", LAUNCH_NAMES)
def test_every_launch_config_matches_reference(launch):
    """The named launch configs that ``benchmarks/gpu_ssd.py --sweep`` times compute the same thing."""
    torch.manual_seed(3)
    inp = make_inputs(2, 1000, 8, 64, 2, 128, torch.bfloat16, "D_h z bias softplus init")
    kw = {"chunk_size": 256, "dt_softplus": True, "return_final_states": True, "seq_idx": _doc_ids(2, 1000, "cuda")}
    _compare(inp, kw, torch.bfloat16, launch=LAUNCH_CONFIGS[launch])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chained_state_passing_matches_separate_kernels(dtype):
    """Many chunks (256 per head, 2 x 8 heads of chains in flight at once): the chained state passing
    gives the separate kernels' result, every run the same (a race in the flags or the ring would move
    the result between runs)."""
    from ssmkit.ops.ssd.launch import SSDLaunch

    torch.manual_seed(5)
    inp = make_inputs(2, 16384, 8, 64, 2, 128, dtype, "D_h z bias softplus init")
    kw = {"chunk_size": 64, "dt_softplus": True, "return_final_states": True,
          "seq_idx": _doc_ids(2, 16384, "cuda")}
    weights = None
    results = {}
    for chain in (False, True, True, True):
        out, final = mamba_chunk_scan_combined(**inp, **kw, backend="triton", launch=SSDLaunch(chain=chain))
        weights = weights or (torch.randn_like(out), torch.randn_like(final))
        grads = torch.autograd.grad((out.float() * weights[0]).sum() + (final * weights[1]).sum(),
                                    list(inp.values()))
        results.setdefault(chain, []).append((out, final, *grads))
    first = results[True][0]
    for again in results[True][1:]:  # the forward is deterministic; gradients up to atomic-add order
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    for name, a, e in zip(["out", "final_states", *(f"d{k}" for k in inp)], first, results[False][0]):
        assert_close(a, e, dtype, name=name)


@pytest.mark.parametrize("chain", [True, False])
def test_backward_recomputes_the_forwards_states(chain):
    """SSDLaunch.recompute_states on a GPU (programs concurrent; the chained passing orders them by a ticket):
    the backward's Δ, cum, entering states and C Bᵀ are the forward's bits; kept instead, the same forward and
    gradients as close as the atomic sums' order allows."""
    from ssmkit.ops.ssd.launch import SSDLaunch
    from tests.ops.test_ssd_triton_recompute import assert_recomputed_equal, recording

    torch.manual_seed(7)
    inp = make_inputs(2, 8192, 8, 64, 2, 128, torch.bfloat16, "D_h z bias softplus init")
    kw = {"chunk_size": 64, "dt_softplus": True, "return_final_states": True, "seq_idx": _doc_ids(2, 8192, "cuda")}
    results = []
    for recompute in (True, False):
        with recording() as calls:
            out, final = mamba_chunk_scan_combined(**inp, **kw, backend="triton",
                                                   launch=SSDLaunch(chain=chain, recompute_states=recompute))
            grads = torch.autograd.grad(out.float().sum() + final.sum(), list(inp.values()))
        if recompute:
            assert_recomputed_equal(calls)
        results.append((out, final, *grads))
    on, off = results
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])
    for name, a, e in zip(inp, on[2:], off[2:]):
        assert_close(a.float(), e.float(), torch.bfloat16, name=f"d{name}")
