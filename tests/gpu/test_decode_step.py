"""The fused decode-step kernels (``ssmkit.ops.decode_step``) on a CUDA GPU: at the shapes of the 130m
models against the float64 composition of the separate ops' references, many steps in a row (a race on the
B/C windows a group shares would show as a wrong conv state); and decoding a model through them, eager and
in a CUDA graph, equals its parallel forward at batch 1 and 4 with prompts of mixed lengths.

Run on the device machine: ``python -m pytest -m gpu tests/gpu/test_decode_step.py -q``.
"""

from __future__ import annotations

import pytest
import torch

from ssmkit.generation.decode import DecodeState, GraphedStep, forward_one
from ssmkit.generation.generate import _left_pad
from ssmkit.generation.sampling import SamplingParams
from ssmkit.models import LanguageModel, ModelConfig
from ssmkit.models.config import Mamba2Config, MambaConfig
from ssmkit.ops.decode_step import conv1d_selective_state_update, mamba_inner_step
from ssmkit.testing import assert_close, raise_dt_bias

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEV = "cuda"


def _f64(args):
    return {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _run_steps(fn, args, kw, new_inputs, steps, tol):
    ref = _f64(args)
    for step in range(steps):
        for k, v in new_inputs().items():
            args[k].copy_(v)
            ref[k].copy_(v)
        y = fn(**args, **kw)
        y_ref = fn(**ref, **kw, backend="reference")
        assert_close(y, y_ref, tol, name=f"y, step {step}")
        assert_close(args["conv_state"], ref["conv_state"], tol, name=f"conv state, step {step}")
        assert_close(args["state"], ref["state"], tol, name=f"ssm state, step {step}")


@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("heads, headdim, ngroups, d_state", [(24, 64, 1, 128), (32, 64, 8, 64), (48, 32, 1, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba2_step_kernel_against_float64(batch, heads, headdim, ngroups, d_state, dtype):
    torch.manual_seed(0)
    conv_dim = heads * headdim + 2 * ngroups * d_state
    zxbcdt = torch.randn(batch, heads * headdim + conv_dim + heads, device=DEV, dtype=dtype)
    args = {
        "xBC": zxbcdt[:, heads * headdim : heads * headdim + conv_dim],
        "conv_state": torch.randn(batch, conv_dim, 4, device=DEV, dtype=dtype),
        "conv_weight": torch.randn(conv_dim, 4, device=DEV, dtype=dtype) * 0.5,
        "conv_bias": torch.randn(conv_dim, device=DEV, dtype=dtype) * 0.1,
        "state": torch.randn(batch, heads, headdim, d_state, device=DEV),
        "dt": zxbcdt[:, -heads:],
        "A": -torch.rand(heads, device=DEV) * 4,
        "D": torch.randn(heads, device=DEV),
        "dt_bias": torch.randn(heads, device=DEV) - 2,
    }

    def new_inputs():
        return {"xBC": torch.randn_like(args["xBC"]), "dt": torch.randn_like(args["dt"])}

    _run_steps(conv1d_selective_state_update, args, {"ngroups": ngroups, "dt_limit": (0.0, 0.5)}, new_inputs, 12,
               dtype)


@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("d, n, rank, norms", [(1536, 16, 48, False), (5120, 16, 160, False), (512, 16, 32, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba1_step_kernels_against_float64(batch, d, n, rank, norms, dtype):
    torch.manual_seed(0)
    args = {
        "xz": torch.randn(batch, 2 * d, device=DEV, dtype=dtype),
        "conv_state": torch.randn(batch, d, 4, device=DEV, dtype=dtype),
        "conv_weight": torch.randn(d, 4, device=DEV, dtype=dtype) * 0.5,
        "conv_bias": torch.randn(d, device=DEV, dtype=dtype) * 0.1,
        "x_proj_weight": torch.randn(rank + 2 * n, d, device=DEV, dtype=dtype) / d**0.5,
        "dt_proj_weight": torch.randn(d, rank, device=DEV, dtype=dtype) / rank**0.5,
        "dt_proj_bias": torch.randn(d, device=DEV) - 2,
        "state": torch.randn(batch, d, n, device=DEV),
        "A": -torch.rand(d, n, device=DEV) * 4,
        "D": torch.randn(d, device=DEV),
    }
    if norms:
        args |= {"dt_rms_weight": 1 + 0.1 * torch.randn(rank, device=DEV),
                 "b_rms_weight": 1 + 0.1 * torch.randn(n, device=DEV),
                 "c_rms_weight": 1 + 0.1 * torch.randn(n, device=DEV)}
    _run_steps(mamba_inner_step, args, {"rms_eps": 1e-5}, lambda: {"xz": torch.randn_like(args["xz"])}, 12, dtype)


MODELS = {
    "mamba": ModelConfig(vocab_size=300, d_model=128, n_layer=3, layer_pattern="M", mamba=MambaConfig(d_state=16)),
    "mamba2": ModelConfig(vocab_size=300, d_model=128, n_layer=3, layer_pattern="2",
                          mamba2=Mamba2Config(d_state=64, headdim=32, ngroups=2, chunk_size=32)),
}


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", list(MODELS))
def test_decode_through_fused_steps_equals_parallel_forward(name, batch, graph):
    torch.manual_seed(0)
    model = raise_dt_bias(LanguageModel(MODELS[name], device=DEV).eval())
    with torch.no_grad():
        g = torch.Generator().manual_seed(batch)
        prompts = [torch.randint(0, 300, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g)
                   for _ in range(batch)]
        ids, seq_idx = _left_pad([p.to(DEV) for p in prompts])
        cache = model.allocate_cache(batch)
        # Logits over the real vocabulary: the embedding is padded to 304 rows, whose logits no token may take.
        logits = model(ids, seq_idx=seq_idx, cache=cache).logits[:, -1, :300]
        decoded, tokens = [logits], []
        token = logits.argmax(-1)
        if graph:
            state = DecodeState(cache, SamplingParams(temperature=0), 300, None,
                                torch.zeros(0, dtype=torch.long, device=DEV),
                                torch.zeros(batch, dtype=torch.bool, device=DEV), None)
            step = GraphedStep(model, token, state)
        for _ in range(8):
            tokens.append(token)
            if graph:
                # The graph's step picks the next token itself: read the logits by replaying forward_one's result.
                step.replay()
                token = step.token.clone()
            else:
                logits = forward_one(model, token, cache)[..., :300]
                decoded.append(logits)
                token = logits.argmax(-1)
        for i, prompt in enumerate(prompts):
            full = torch.cat([prompt.to(DEV), torch.stack([t[i] for t in tokens]), token[i : i + 1]])[None]
            expected = model(full).logits[0, len(prompt) - 1 :, :300]
            assert full[0, len(prompt):].tolist() == expected[:-1].argmax(-1).tolist(), f"row {i}: tokens"
            if not graph:
                assert_close(torch.stack([d[i] for d in decoded]), expected[:-1], torch.float32, name=f"row {i}")
