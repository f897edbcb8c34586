"""Triton selective scan under Triton's CPU interpreter: output, last state and every gradient against the
float64 sequential reference, on tiny shapes.

The interpreter is chosen when ``triton.jit`` decorates the kernels, i.e. on the first import of
``ssmkit.ops.selective_scan.triton``, so the cases run in one fresh process (this file as a script,
with ``TRITON_INTERPRET=1``) and each test reads its case's result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest
import torch

pytest.importorskip("triton")

# name -> (b, d, n, l, groups, input dtype, chunk, options)
CASES = {
    "fp64_all_options_groups": (2, 6, 5, 21, 2, torch.float64, 8, {"extras", "init", "packed"}),
    "fp32_plain_length1": (1, 3, 4, 1, None, torch.float32, 8, set()),
    "fp32_plain_odd": (2, 5, 3, 19, None, torch.float32, 4, {"init"}),
    "bf16_time_major_public_api": (2, 8, 4, 24, None, torch.bfloat16, 8, {"extras", "time_major", "public"}),
    "fp16_packed_no_extras": (1, 4, 8, 40, 4, torch.float16, 16, {"packed"}),
    # bfloat16 with every option: the fused-state kernels keep bfloat16 checkpoints here (odd length,
    # groups, documents, initial states), and must still meet bfloat16's tolerances for every gradient.
    "bf16_all_options_groups_odd": (2, 6, 5, 37, 2, torch.bfloat16, 8, {"extras", "init", "packed"}),
    "bf16_plain_groups_init_odd": (1, 4, 16, 29, 2, torch.bfloat16, 4, {"init"}),
    # NaN in u inside the first document: NaN exactly where the reference has it, nothing past the
    # seq_idx change (which falls on a chunk boundary), in the output and every gradient.
    "fp32_nan_stops_at_document_start": (1, 3, 4, 16, None, torch.float32, 4, {"extras", "nan"}),
    # The options one at a time: a gate without D or bias and no softplus; D and bias without a gate.
    "fp32_gate_only_no_softplus_docs_init": (2, 4, 6, 33, 2, torch.float32, 8,
                                             {"extras", "no_D", "no_bias", "no_softplus", "init", "packed"}),
    "bf16_D_bias_no_gate_time_major": (2, 4, 4, 29, None, torch.bfloat16, 16, {"extras", "no_z", "time_major", "packed"}),
    # Tiles of 128 and 64 steps: the time-wise backward's two-channel programs (one warp) walk the adjoint
    # in runs of 8 (bf16) and 4 (float32: one 16-byte vector) steps, as on the GPU; documents and tile
    # boundaries fall inside runs.
    "bf16_runs_of_8_all_options": (1, 4, 3, 301, 2, torch.bfloat16, 128, {"extras", "init", "packed"}),
    "fp32_runs_of_4_all_options": (1, 4, 3, 157, 2, torch.float32, 64, {"extras", "init", "packed"}),
    "fp32_runs_of_4_nan_stops_at_document_start": (1, 2, 3, 140, None, torch.float32, 128, {"extras", "nan"}),
}


def _softplus(options: set[str]) -> bool:
    return "extras" in options and "no_softplus" not in options


def _inputs(b, d, n, l, groups, dtype, options, gen):
    bc = (b, n, l) if groups is None else (b, groups, n, l)

    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift

    kw = {
        "u": randn(b, d, l),
        # Positive Δ unless softplus makes it so: a negative Δ with negative A grows without bound.
        "delta": (randn(b, d, l, shift=-1.0) if _softplus(options)
                  else torch.rand(b, d, l, generator=gen, dtype=torch.float64)),
        "A": -torch.rand(d, n, generator=gen, dtype=torch.float64) * 4 - 0.1,
        "B": randn(*bc),
        "C": randn(*bc),
    }
    if "extras" in options:
        extras = {"D": randn(d), "z": randn(b, d, l), "delta_bias": randn(d, scale=0.5)}
        kw.update({k: v for k, v in extras.items() if f"no_{k.removeprefix('delta_')}" not in options})
    if "init" in options:
        kw["initial_state"] = randn(b, d, n)
    low = {k: (v.to(dtype) if k != "A" or dtype == torch.float64 else v.float()) for k, v in kw.items()}
    if "time_major" in options:
        # (b, l, d) memory seen as (b, d, l), as a Mamba layer hands its projections over.
        for k in ("u", "delta", "z"):
            if k in low:
                low[k] = low[k].transpose(1, 2).contiguous().transpose(1, 2)
    seq_idx = None
    if "nan" in options:
        low["u"][0, 0, 2] = float("nan")
        seq_idx = (torch.arange(l) >= 8).long()[None].expand(b, l).contiguous()
    if "packed" in options:
        cuts = torch.rand(b, l, generator=gen) < 0.2
        cuts[:, 0] = False
        seq_idx = cuts.long().cumsum(dim=1) + 3
    return low, seq_idx


def _call(leaves, low, cfg, options, softplus, seq_idx):
    from ssmkit.ops.selective_scan import ScanInputs, selective_scan_fn
    from ssmkit.ops.selective_scan.triton import selective_scan_triton

    if "public" in options:
        # The public function runs the default launch shapes: made this case's for the call.
        import ssmkit.ops.selective_scan.triton as triton_backend

        triton_backend.DEFAULT_CONFIG = triton_backend.TRAINING_CONFIG = cfg
        out, last = selective_scan_fn(
            **leaves, delta_softplus=softplus, return_last_state=True, seq_idx=seq_idx, backend="triton"
        )
        assert out.stride() == low["u"].stride(), "out must keep u's (time-major) layout"
        return out, last
    B4 = {k: (v if v.dim() == 4 else v[:, None]) for k, v in leaves.items() if k in ("B", "C")}
    return selective_scan_triton(
        ScanInputs.from_args({**leaves, **B4, "delta_softplus": softplus, "seq_idx": seq_idx}), config=cfg
    )


KERNELS = ("state_loop", "fused_states", "timewise")


def _run_case(name: str, kernel: str) -> None:
    from ssmkit.ops.selective_scan import ScanInputs
    from ssmkit.ops.selective_scan.reference import selective_scan_reference
    from ssmkit.ops.selective_scan.triton import ScanConfig
    from ssmkit.testing import assert_close

    b, d, n, l, groups, dtype, chunk, options = CASES[name]
    gen = torch.Generator().manual_seed(len(name))
    low, seq_idx = _inputs(b, d, n, l, groups, dtype, options, gen)
    softplus = _softplus(options)
    fused = kernel == "fused_states"
    # The fused forward walks tiles of two checkpoint intervals: checkpoints inside a tile and past the end.
    # The time-wise kernels run one channel a program in the forward (the mamba_ssm layout), two in the
    # backward (the block's dB, dC summed before the atomics), shrunk to the group's channels.
    cfg = ScanConfig(
        chunk=chunk, fwd_block_d=1 if kernel == "timewise" else 4, fwd_warps=1, bwd_block_d=2, bwd_warps=1,
        fused_states=fused, fwd_chunk=2 * chunk if fused else None, timewise=kernel == "timewise",
    )
    leaves = {k: v.detach().requires_grad_(True) for k, v in low.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, last = _call(leaves, low, cfg, options, softplus, seq_idx)
    # The checkpoints (b, d, cdiv(l, chunk) + 1, n): bfloat16 for bfloat16 u on the fused-state kernels.
    ckpt = [t for t in saved if t.shape == (b, d, -(-l // chunk) + 1, n)]
    ckpt_dtype = torch.bfloat16 if fused and dtype == torch.bfloat16 else last.dtype
    assert len(ckpt) == 1 and ckpt[0].dtype == ckpt_dtype, [(t.shape, t.dtype) for t in ckpt]
    ref_in = {k: v.detach().double().requires_grad_(True) for k, v in low.items()}
    B4 = {k: (v if v.dim() == 4 else v[:, None]) for k, v in ref_in.items() if k in ("B", "C")}
    ref_out, ref_last = selective_scan_reference(
        ScanInputs.from_args({**ref_in, **B4, "delta_softplus": softplus, "seq_idx": seq_idx})
    )
    assert out.dtype == dtype and last.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, ref_out, dtype, name="out")
    assert_close(last, ref_last, torch.float32 if dtype != torch.float64 else dtype, name="last_state")

    dout = torch.randn(ref_out.shape, generator=gen, dtype=torch.float64)
    dlast = torch.randn(ref_last.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out * dout.to(dtype)).sum() + (last * dlast.to(last.dtype)).sum(), list(leaves.values()))
    ref_grads = torch.autograd.grad((ref_out * dout).sum() + (ref_last * dlast).sum(), list(ref_in.values()))
    for key, g, rg in zip(leaves, grads, ref_grads):
        assert g.dtype == leaves[key].dtype, key
        assert_close(g, rg, dtype, name=f"d{key}")


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str]:
    """Every case in one fresh interpreter process (one torch import): case -> "ok" or the failure."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreter_matches_reference(interpreter_results, name, kernel):
    key = f"{name}[{kernel}]"
    assert interpreter_results[key] == "ok", interpreter_results[key]


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    from ssmkit.ops.selective_scan import selective_scan_fn

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    u = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="CUDA"):
        selective_scan_fn(u, u, -torch.ones(2, 4), torch.randn(1, 4, 3), torch.randn(1, 4, 3), backend="triton")


def test_scan_config_rejects_forward_tiles_off_the_checkpoints():
    from ssmkit.ops.selective_scan.triton import ScanConfig

    with pytest.raises(ValueError, match="multiple of chunk"):
        ScanConfig(chunk=16, fused_states=True, fwd_chunk=24)
    with pytest.raises(ValueError, match="fused_states"):
        ScanConfig(chunk=16, fwd_chunk=32)
    assert ScanConfig(chunk=16, fused_states=True, fwd_chunk=64).fwd_chunk == 64
    with pytest.raises(ValueError, match="set one"):
        ScanConfig(chunk=16, fused_states=True, timewise=True)
    with pytest.raises(ValueError, match="power of two"):
        ScanConfig(chunk=96, timewise=True)
    assert ScanConfig(chunk=1024, timewise=True).timewise


def _run_all() -> dict[str, str]:
    results = {}
    for name in CASES:
        for kernel in KERNELS:
            key = f"{name}[{kernel}]"
            try:
                _run_case(name, kernel)
                results[key] = "ok"
            except AssertionError:
                results[key] = traceback.format_exc(limit=3)
    return results


if __name__ == "__main__":
    print(json.dumps(_run_all()))
