"""mamba_ssm / causal_conv1d's serving and fused arguments on a CUDA GPU (Triton) against float64.

Run on the device machine: ``python -m pytest -m gpu tests/gpu/test_compat_ops.py -q``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ssmkit.ops import (
    causal_conv1d_update,
    layernorm_fn,
    mamba_inner_fn,
    mamba_split_conv1d_scan_combined,
    selective_state_update,
)
from ssmkit.testing import assert_close, assert_outputs_and_grads_close, float64_leaf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEV = "cuda"


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mamba2", [False, True])
def test_state_update_pool_padding_and_half_states(mamba2, state_dtype):
    b, slots = 6, 16
    if mamba2:
        h, p, n, g = 24, 64, 128, 2
        pool = torch.randn(slots, h, p, n, device=DEV).to(state_dtype)
        args = (torch.randn(b, h, p, device=DEV, dtype=torch.bfloat16), torch.randn(b, h, device=DEV),
                -torch.rand(h, device=DEV), torch.randn(b, g, n, device=DEV), torch.randn(b, g, n, device=DEV))
        kw = {"D": torch.randn(h, device=DEV), "z": torch.randn(b, h, p, device=DEV, dtype=torch.bfloat16),
              "dt_bias": torch.randn(h, device=DEV), "dt_softplus": True}
    else:
        d, n = 1536, 16
        pool = torch.randn(slots, d, n, device=DEV).to(state_dtype)
        args = (torch.randn(b, d, device=DEV), torch.randn(b, d, device=DEV), -torch.rand(d, n, device=DEV),
                torch.randn(b, n, device=DEV), torch.randn(b, n, device=DEV))
        kw = {"D": torch.randn(d, device=DEV), "z": torch.randn(b, d, device=DEV), "dt_bias": torch.randn(d, device=DEV),
              "dt_softplus": True}
    indices = torch.tensor([15, -1, 3, 0, 7, -1], device=DEV, dtype=torch.int32)
    expected_state = pool.double()
    expected = selective_state_update(expected_state, *[a.double() for a in args],
                                      **{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()},
                                      state_batch_indices=indices, backend="reference")
    y = selective_state_update(pool, *args, **kw, state_batch_indices=indices)
    assert not y[[1, 5]].any()
    assert_close(y, expected, args[0].dtype, name="y")
    assert_close(pool, expected_state, state_dtype, name="pool")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [0, 3])
def test_conv_update_ring_and_pool(tokens, dtype):
    b, d, w, state_len, slots = 5, 2048 + 96, 4, 6, 9
    pool = torch.randn(slots, d, state_len, device=DEV, dtype=dtype)
    pool64 = pool.double()
    x = torch.randn((b, d, tokens) if tokens else (b, d), device=DEV, dtype=dtype)
    weight, bias = torch.randn(d, w, device=DEV, dtype=dtype), torch.randn(d, device=DEV, dtype=dtype)
    seqlens = torch.tensor([0, 5, 17, 2, 11], device=DEV, dtype=torch.int32)
    indices = torch.tensor([8, 2, -1, 0, 5], device=DEV, dtype=torch.int32)
    out = causal_conv1d_update(x, pool, weight, bias, "silu", seqlens, indices)
    exp = causal_conv1d_update(x.double(), pool64, weight.double(), bias.double(), "silu", seqlens, indices,
                               backend="reference")
    assert_close(out, exp, dtype, name="out")
    assert_close(pool, pool64, dtype, name="pool")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layernorm_fn_triton_every_gradient(dtype):
    shape, n = (4, 257, 1536), 1536
    named = {
        "x": (torch.randn(shape, device=DEV) + 1).to(dtype).requires_grad_(),
        "weight": (1 + 0.1 * torch.randn(n, device=DEV)).to(dtype).requires_grad_(),
        "bias": torch.randn(n, device=DEV, dtype=dtype, requires_grad=True),
        "z": torch.randn(shape, device=DEV, dtype=dtype, requires_grad=True),
    }
    named64 = {k: float64_leaf(t) for k, t in named.items()}
    out = layernorm_fn(named["x"], named["weight"], named["bias"], named["z"], 1e-5, 768, False)
    exp = layernorm_fn(named64["x"], named64["weight"], named64["bias"], named64["z"], 1e-5, 768, False,
                       backend="chunked")
    assert_outputs_and_grads_close([out], [exp], named, named64, dtype)


def test_split_conv1d_scan_on_gpu_matches_float64():
    b, l, h, p, g, n, w, chunk = 2, 300, 8, 32, 2, 64, 4, 64
    dim = h * p
    conv_dim = dim + 2 * g * n
    named = {
        "zxbcdt": torch.randn(b, l, dim + conv_dim + h, device=DEV, dtype=torch.bfloat16),
        "conv1d_weight": torch.randn(conv_dim, w, device=DEV) * 0.5,
        "conv1d_bias": torch.randn(conv_dim, device=DEV) * 0.1,
        "dt_bias": torch.randn(h, device=DEV) - 2,
        "A": -torch.rand(h, device=DEV) - 0.2,
        "D": torch.randn(h, device=DEV),
        "rmsnorm_weight": 1 + 0.1 * torch.randn(dim, device=DEV),
        "outproj_weight": torch.randn(128, dim, device=DEV) * 0.05,
    }
    named = {k: t.requires_grad_() for k, t in named.items()}
    named64 = {k: float64_leaf(t) for k, t in named.items()}
    seq_idx = torch.cat([torch.zeros(b, 170), torch.ones(b, 130)], dim=1).int().to(DEV)

    def run(t, backend):
        return mamba_split_conv1d_scan_combined(
            t["zxbcdt"], t["conv1d_weight"].to(t["zxbcdt"].dtype), t["conv1d_bias"].to(t["zxbcdt"].dtype),
            t["dt_bias"], t["A"], t["D"], chunk, seq_idx=seq_idx, rmsnorm_weight=t["rmsnorm_weight"].to(t["zxbcdt"].dtype),
            outproj_weight=t["outproj_weight"].to(t["zxbcdt"].dtype), headdim=p, ngroups=g, norm_before_gate=False,
            backend=backend)

    out = run(named, "auto")
    exp = run(named64, "chunked")
    assert_outputs_and_grads_close([out], [exp], named, named64, torch.bfloat16)


def test_mamba_inner_fn_on_gpu_matches_float64():
    b, d, l, n, r, w = 2, 512, 257, 16, 32, 4
    named = {
        "xz": torch.randn(b, 2 * d, l, device=DEV),
        "conv1d_weight": torch.randn(d, 1, w, device=DEV) * 0.5,
        "conv1d_bias": torch.randn(d, device=DEV) * 0.1,
        "x_proj_weight": torch.randn(r + 2 * n, d, device=DEV) * 0.05,
        "delta_proj_weight": torch.randn(d, r, device=DEV) * 0.1,
        "out_proj_weight": torch.randn(256, d, device=DEV) * 0.05,
        "A": -torch.rand(d, n, device=DEV) - 0.2,
        "D": torch.randn(d, device=DEV),
        "delta_bias": torch.randn(d, device=DEV) - 2,
    }
    named = {k: t.requires_grad_() for k, t in named.items()}
    named64 = {k: float64_leaf(t) for k, t in named.items()}

    def run(t, backend):
        return mamba_inner_fn(t["xz"], t["conv1d_weight"], t["conv1d_bias"], t["x_proj_weight"],
                              t["delta_proj_weight"], t["out_proj_weight"], None, t["A"], D=t["D"],
                              delta_bias=t["delta_bias"], backend=backend)

    assert_outputs_and_grads_close([run(named, "auto")], [run(named64, "chunked")], named, named64, torch.float32)


def test_transformers_mamba2_on_cuda_takes_ssmkit_after_install():
    code = """
import sys, warnings, importlib, torch
import transformers
if not hasattr(transformers.integrations.hub_kernels, "use_kernel_func_from_hub_with_fallback"):
    print("ok"); sys.exit()
torch.manual_seed(0)
cfg = transformers.Mamba2Config(vocab_size=256, hidden_size=256, num_hidden_layers=2, state_size=64, expand=2,
                                head_dim=64, num_heads=8, n_groups=1, chunk_size=64)
base = transformers.Mamba2ForCausalLM(cfg).cuda().eval()
ids = torch.randint(0, 256, (2, 300), device="cuda")
with torch.no_grad():
    expected = base(ids, use_cache=False).logits
state = base.state_dict()
for name in [n for n in sys.modules if n.startswith("transformers.models.mamba2.")]:
    del sys.modules[name]
import ssmkit.compat
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ssmkit.compat.install()
mm = importlib.import_module("transformers.models.mamba2.modeling_mamba2")
model = mm.Mamba2ForCausalLM(cfg).cuda().eval()
model.load_state_dict(state)
with torch.no_grad():
    got = model(ids, use_cache=False).logits
err = ((got - expected).abs().max() / expected.abs().max()).item()
assert err < 1e-3, err
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]
