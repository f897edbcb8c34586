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

# Time-wise kernels only, on their own launch shapes: name -> (b, d, n, l, groups, input dtype,
# (chunk, forward channels, backward channels) a program, options). One warp: a backward thread holds
# chunk x channels / 32 steps, walked by hand in runs of min(that, one 16-byte vector) where that is 4 or 8.
TIMEWISE_CASES = {
    # N = 1; dg = 3 on two-channel programs in both passes (the second block half masked).
    "n1_masked_channels_docs": (1, 6, 1, 21, 2, torch.float32, (8, 2, 2), {"extras", "init", "docs:8,13"}),
    # N = 12 on runs of 8, a document starting exactly at the second tile.
    "n12_runs_of_8_doc_at_tile_start": (1, 2, 12, 140, None, torch.bfloat16, (128, 1, 2),
                                        {"extras", "init", "docs:128"}),
    # EVEN_T (l a multiple of the tile) with runs: documents at t = 1, a tile start and a tile's last step.
    "fp32_even_tiles_runs_of_4_docs": (1, 2, 3, 128, None, torch.float32, (64, 1, 2),
                                       {"extras", "init", "docs:1,64,127"}),
    "fp16_even_tiles_runs_of_8_docs": (1, 4, 4, 256, 2, torch.float16, (128, 1, 2),
                                       {"extras", "init", "docs:1,128,255"}),
    # The Mamba layer's layout: u, delta, z time-major, B and C strided views of one x_proj output.
    "bf16_layer_layout_runs_of_8": (2, 4, 3, 150, 2, torch.bfloat16, (128, 1, 2),
                                    {"extras", "init", "proj", "time_major", "docs:100"}),
    "fp32_layer_layout_two_channel_forward": (2, 4, 3, 40, 2, torch.float32, (16, 2, 2),
                                              {"extras", "proj", "time_major"}),
    # Forward programs of two channels, one masked (dg = 3); backward blocks of 4 (16 steps a thread, runs of 8).
    "bf16_fwd_two_channels_bwd_runs_of_8": (1, 6, 3, 150, 2, torch.bfloat16, (128, 2, 4),
                                            {"extras", "init", "docs:50"}),
    # Shorter than one run, and one step, on the run paths.
    "fp32_shorter_than_a_run": (2, 2, 3, 5, None, torch.float32, (64, 1, 2), {"extras", "init", "docs:3"}),
    "bf16_length1_runs_of_8": (1, 2, 3, 1, None, torch.bfloat16, (128, 1, 2), {"extras", "init"}),
    # No softplus, Δ partly negative (decays above 1); a gate without D or bias.
    "fp32_negative_delta_runs_of_4": (1, 2, 3, 150, None, torch.float32, (64, 1, 2),
                                      {"extras", "no_D", "no_bias", "no_softplus", "neg_delta", "init"}),
    # Every third Δ = 300: exp(Δ A) underflows to 0 inside runs and at tile starts.
    "fp32_huge_delta_runs_of_4": (1, 2, 3, 150, None, torch.float32, (64, 1, 2), {"extras", "init", "huge_delta"}),
    "fp32_huge_delta_scan": (1, 2, 3, 40, None, torch.float32, (16, 1, 2), {"extras", "init", "huge_delta"}),
    # float32 B and C with bfloat16 u (mamba_ssm's float weight type).
    "bf16_fp32_BC_runs_of_8": (1, 2, 3, 140, None, torch.bfloat16, (128, 1, 2), {"extras", "init", "fp32_BC"}),
    # NaN in the initial state reaches the first document only (which ends inside a run).
    "fp32_nan_initial_state_first_document": (1, 2, 3, 150, None, torch.float32, (64, 1, 2),
                                              {"extras", "init", "nan_h0", "docs:9"}),
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
    if "neg_delta" in options:
        # Some Δ < 0 (decays above 1), with |A| small enough that the states stay bounded.
        kw["delta"], kw["A"] = kw["delta"] - 0.3, kw["A"] / 8
    if "huge_delta" in options:
        kw["delta"][..., 1::3] = 300.0
    if "extras" in options:
        extras = {"D": randn(d), "z": randn(b, d, l), "delta_bias": randn(d, scale=0.5)}
        kw.update({k: v for k, v in extras.items() if f"no_{k.removeprefix('delta_')}" not in options})
    if "init" in options:
        kw["initial_state"] = randn(b, d, n)
    low = {k: (v.to(dtype) if k != "A" or dtype == torch.float64 else v.float()) for k, v in kw.items()}
    if "fp32_BC" in options:
        low["B"], low["C"] = low["B"].float(), low["C"].float()
    if "proj" in options:
        # B and C as the Mamba layer passes them: strided (b, g, n, l) views of one (b, l, 2 g n + 3) tensor.
        g = 1 if groups is None else groups
        proj = torch.cat([low["B"].reshape(b, g * n, l), low["C"].reshape(b, g * n, l)], 1).mT
        proj = torch.cat([torch.zeros(b, l, 3, dtype=proj.dtype), proj], 2)
        low["B"], low["C"] = (proj[..., 3 + k * g * n:3 + (k + 1) * g * n].unflatten(2, (g, n)).permute(0, 2, 3, 1)
                              for k in (0, 1))
        if groups is None:
            low["B"], low["C"] = low["B"][:, 0], low["C"][:, 0]
    if "nan_h0" in options:
        low["initial_state"][0, 0, 0] = float("nan")
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
    for option in options:
        if option.startswith("docs:"):
            # Documents starting at the listed steps.
            seq_idx = torch.zeros(b, l, dtype=torch.long)
            for start in option.removeprefix("docs:").split(","):
                seq_idx[:, int(start):] += 1
    return low, seq_idx


def _call(leaves, low, cfg, options, softplus, seq_idx):
    from ssmkit.ops.selective_scan import ScanInputs, selective_scan_fn
    from ssmkit.ops.selective_scan.triton import selective_scan_triton

    if "public" in options:
        # The public function runs the default launch shapes: made this case's for the call.
        import ssmkit.ops.selective_scan.triton as triton_backend

        names = ("DEFAULT_CONFIG", "TRAINING_CONFIG", "TIMEWISE_CONFIG")
        saved = [getattr(triton_backend, name) for name in names]
        for name in names:
            setattr(triton_backend, name, cfg)
        try:
            out, last = selective_scan_fn(
                **leaves, delta_softplus=softplus, return_last_state=True, seq_idx=seq_idx, backend="triton"
            )
        finally:
            for name, value in zip(names, saved):
                setattr(triton_backend, name, value)
        assert out.stride() == low["u"].stride(), "out must keep u's (time-major) layout"
        return out, last
    B4 = {k: (v if v.dim() == 4 else v[:, None]) for k, v in leaves.items() if k in ("B", "C")}
    return selective_scan_triton(
        ScanInputs.from_args({**leaves, **B4, "delta_softplus": softplus, "seq_idx": seq_idx}), config=cfg
    )


KERNELS = ("state_loop", "fused_states", "timewise")


def _config(name: str, kernel: str):
    """The launch shape a case runs on."""
    from ssmkit.ops.selective_scan.triton import ScanConfig

    if kernel == "timewise" and name in TIMEWISE_CASES:
        chunk, fwd_block_d, bwd_block_d = TIMEWISE_CASES[name][6]
        return ScanConfig(chunk, fwd_block_d, 1, bwd_block_d, 1, timewise=True)
    chunk = CASES[name][6]
    fused = kernel == "fused_states"
    # The fused forward walks tiles of two checkpoint intervals: checkpoints inside a tile and past the end.
    # The time-wise kernels run one channel a program in the forward (the mamba_ssm layout), two in the
    # backward (the block's dB, dC summed before the atomics), shrunk to the group's channels.
    return ScanConfig(
        chunk=chunk, fwd_block_d=1 if kernel == "timewise" else 4, fwd_warps=1, bwd_block_d=2, bwd_warps=1,
        fused_states=fused, fwd_chunk=2 * chunk if fused else None, timewise=kernel == "timewise",
    )


def _run_case(name: str, kernel: str) -> None:
    from ssmkit.ops.selective_scan import ScanInputs
    from ssmkit.ops.selective_scan.reference import selective_scan_reference
    from ssmkit.testing import assert_close

    b, d, n, l, groups, dtype, _launch, options = {**CASES, **TIMEWISE_CASES}[name]
    gen = torch.Generator().manual_seed(len(name))
    low, seq_idx = _inputs(b, d, n, l, groups, dtype, options, gen)
    softplus = _softplus(options)
    fused = kernel == "fused_states"
    cfg = _config(name, kernel)
    chunk = cfg.chunk
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


@pytest.mark.parametrize("name", list(TIMEWISE_CASES))
def test_timewise_interpreter_matches_reference(interpreter_results, name):
    key = f"{name}[timewise]"
    assert interpreter_results[key] == "ok", interpreter_results[key]


def test_timewise_cases_cover_every_backward_adjoint_path():
    """The time-wise cases reach the reverse scan (RUN 0) and the by-hand runs of 4 and 8."""
    from ssmkit.ops.selective_scan.triton import _block_d, _timewise_run

    runs = set()
    for name, (_b, d, _n, _l, groups, dtype, _launch, _options) in TIMEWISE_CASES.items():
        cfg = _config(name, "timewise")
        block_d = _block_d(d // (groups or 1), cfg.bwd_block_d)
        runs.add(_timewise_run(cfg.chunk, block_d, cfg.bwd_warps, dtype.itemsize))
    assert runs == {0, 4, 8}


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    from ssmkit.ops.selective_scan import selective_scan_fn

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    u = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="CUDA"):
        selective_scan_fn(u, u, -torch.ones(2, 4), torch.randn(1, 4, 3), torch.randn(1, 4, 3), backend="triton")


def test_triton_refuses_row_offsets_past_32_bits():
    """The kernels index within a batch row with 32-bit offsets: a call whose offsets pass 2^31 - 1 (here
    time-major, d (l - 1) + d - 1 = 2^31 + 4095: a 512k-token prefill of a 4096-channel layer) is refused
    before anything is allocated or launched (meta tensors: shapes and strides only), where it would reach
    the wrong memory."""
    from ssmkit.ops.selective_scan import ScanInputs
    from ssmkit.ops.selective_scan.triton import (
        _check_row_offsets,
        selective_scan_triton,
    )

    d, n, l = 2**12, 4, 2**19 + 1

    def time_major(length):
        return torch.empty(1, length, d, device="meta").mT

    def rows(length):
        return torch.empty(1, 1, n, length, device="meta")

    A = torch.empty(d, n, device="meta")
    inputs = {"u": time_major(l), "delta": time_major(l), "A": A, "B": rows(l), "C": rows(l)}
    with pytest.raises(ValueError, match=r"u \(1, 4096, 524289\).*32-bit"):
        selective_scan_triton(ScanInputs.from_args(inputs))
    # One step shorter fits: the last element's offset is then 2^31 - 1.
    _check_row_offsets(u=time_major(l - 1), B=rows(l - 1))
    # B as a strided view of a wide projection: offsets of step x row stride.
    proj = torch.empty(1, 2**24, 160, device="meta")
    with pytest.raises(ValueError, match="B"):
        _check_row_offsets(B=proj[..., :n].mT[:, None])
    # The backward's incoming gradient, in whatever layout it comes.
    with pytest.raises(ValueError, match="dout"):
        _check_row_offsets(dout=torch.empty_strided((1, 3, 8), (0, 2**30, 1), device="meta"))


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
    runs = [(name, kernel) for name in CASES for kernel in KERNELS] + [(name, "timewise") for name in TIMEWISE_CASES]
    for name, kernel in runs:
        key = f"{name}[{kernel}]"
        try:
            _run_case(name, kernel)
            results[key] = "ok"
        except AssertionError:
            results[key] = traceback.format_exc(limit=3)
    return results


if __name__ == "__main__":
    print(json.dumps(_run_all()))


def test_auto_backend_leaves_triton_past_32_bit_row_offsets():
    """backend="auto" picks the chunked scan where the Triton kernels' 32-bit row offsets would not reach (the
    explicit backend="triton" refuses, above); one step shorter, Triton still fits."""
    from ssmkit.ops.selective_scan import _triton_rows_fit

    d, n, l = 2**12, 4, 2**19 + 1
    u = torch.empty(1, l, d, device="meta").mT
    B = torch.empty(1, 1, n, l, device="meta")
    assert not _triton_rows_fit(u, u, None, B, B)
    short = torch.empty(1, l - 1, d, device="meta").mT
    assert _triton_rows_fit(short, short, short, B[..., :-1], B[..., :-1])
    # The backward's contiguous (b, g, n, l) dB buffer can pass the limit where B itself does not: B read with
    # a zero stride over its state index (one row broadcast), 2^12 x 2^19 + 2^12 - 1 elements a dB row.
    broadcast = torch.empty(1, 1, 1, l, device="meta").expand(1, 1, 2**12, l)
    assert not _triton_rows_fit(short[..., :1], short[..., :1], None, broadcast, broadcast)
