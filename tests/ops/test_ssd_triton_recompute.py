"""The Triton SSD's backward with and without recomputing Δ, cum, the chunk states and C Bᵀ
(``SSDLaunch.recompute_states``), in Triton's CPU interpreter.

Both settings against the float64 reference (every gradient, groups, documents, initial states, odd lengths,
several chunks); then, per case, that the backward's recomputed tensors are the forward's bit for bit and
the two settings give the same outputs and gradients bit for bit (the interpreter runs programs in order,
so the backward's atomic sums are deterministic there); and that the forward saves exactly those tensors'
bytes fewer. test_ssd_triton.py runs its whole grid with the default (on).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

from ssmkit.ops.chunking import chunk_length
from ssmkit.ops.ssd import mamba_chunk_scan_combined
from ssmkit.testing import (
    report_checks,
    run_checks_in_interpreter,
    saved_activation_bytes,
)

if __name__ == "__main__":  # run as a script (in the interpreter's subprocess): `tests` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.ops.test_ssd_triton import case_launch, check_case, make_case

# name -> (b, l, h, p, g, n, chunk_size, tile, dtype, options), as test_ssd_triton.CASES.
CASES = {
    # Two groups of two heads, three documents (one change at a chunk edge), odd length, three chunks.
    "groups_docs_init": (2, 37, 4, 3, 2, 5, 16, 16, "float32", "D_h z bias init softplus limit docs"),
    # The state passing as a kernel of its own (its states buffer and final state recomputed too).
    "unchained": (2, 40, 2, 4, 1, 8, 16, 16, "float32", "D_hp z init softplus docs no_chain"),
    # Chunk 64 in 32-row tiles read by the backward in 16-row quarters: C Bᵀ's causal tiles only.
    "mixed_tiles": (1, 70, 2, 4, 1, 8, 64, 32, "float32", "D_h z bias softplus docs bwd_tile16"),
    # input_scale apart from Δ (its buffer holds the scale), the one-pass chunk states.
    "scale_online": (2, 37, 4, 3, 2, 5, 32, 16, "float32", "D_h z bias init softplus docs scale online"),
    # The entering states also leave the forward for the varlen states.
    "varlen": (1, 39, 2, 2, 1, 4, 16, 16, "float32", "D_h init softplus varlen"),
    # bf16: entering states in bf16, C Bᵀ in bf16 (cb_lowp).
    "bf16_lowp": (1, 33, 2, 8, 1, 8, 16, 64, "bfloat16", "D_h z bias softplus limit docs one_slice lowp"),
    "bf16_init": (2, 45, 4, 8, 2, 8, 16, 16, "bfloat16", "D_hp z init softplus docs"),
}


@contextlib.contextmanager
def recording():
    """Record every result of the forward's chunk-state and C Bᵀ launchers (forward and backward calls)."""
    from ssmkit.ops.ssd import triton as ssd_triton

    calls: dict[str, list] = {"states": [], "cb": []}
    originals = ssd_triton._chunk_states, ssd_triton._chunk_cb

    def states(*args, **kw):
        calls["states"].append(originals[0](*args, **kw))
        return calls["states"][-1]

    def cb(B, C, T, BM, dtype, launch):
        calls["cb"].append((originals[1](B, C, T, BM, dtype, launch), BM))
        return calls["cb"][-1][0]

    ssd_triton._chunk_states, ssd_triton._chunk_cb = states, cb
    try:
        yield calls
    finally:
        ssd_triton._chunk_states, ssd_triton._chunk_cb = originals


def assert_recomputed_equal(calls: dict[str, list]) -> None:
    """The forward's and the backward's results of both launchers (``recording``) are the same bits."""
    assert len(calls["states"]) == 2 and len(calls["cb"]) == 2, {k: len(v) for k, v in calls.items()}
    names = ("delta", "cum", "final", "prev")
    for name, fwd, bwd in zip(names, *calls["states"]):
        assert fwd.dtype == bwd.dtype and torch.equal(fwd, bwd), f"recomputed {name} differs from the forward's"
    (cb_fwd, bm), (cb_bwd, _) = calls["cb"]
    pos = torch.arange(cb_fwd.shape[-1], device=cb_fwd.device) // bm
    causal = pos[:, None] >= pos[None, :]  # the tiles the kernel writes; the rest of the buffer is never read
    assert torch.equal(cb_fwd[..., causal], cb_bwd[..., causal]), "recomputed C Bᵀ differs from the forward's"


def _run(inp, kw, launch):
    """Outputs and every gradient (one weighted loss over all outputs) of one Triton call."""
    args = {k: v.detach().requires_grad_() for k, v in inp.items()}
    outs = mamba_chunk_scan_combined(**args, **kw, backend="triton", launch=launch)
    torch.manual_seed(1)
    loss = sum((o.double() * torch.randn(o.shape, dtype=torch.float64)).sum() for o in outs)
    return [o.detach() for o in outs], torch.autograd.grad(loss, list(args.values()))


def check_same_bits(b, l, h, p, g, n, chunk_size, tile, dtype, options) -> None:
    """The backward's recomputation equals the forward's tensors exactly; on and off give the same bits."""
    inp, kw = make_case(b, l, h, p, g, n, chunk_size, dtype, options)
    with recording() as calls:
        outs_on, grads_on = _run(inp, kw, case_launch(tile, options))
    assert_recomputed_equal(calls)
    with recording() as calls:
        outs_off, grads_off = _run(inp, kw, case_launch(tile, options + " keep"))
    assert len(calls["states"]) == 1 and len(calls["cb"]) == 1, "keep_states recomputed in the backward"
    for i, (a, e) in enumerate(zip(outs_on, outs_off)):
        assert torch.equal(a, e), f"output {i} differs between recompute_states on and off"
    for name, a, e in zip(inp, grads_on, grads_off):
        assert torch.equal(a, e), f"d{name} differs between recompute_states on and off"


def check_saved_bytes(b, l, h, p, g, n, chunk_size, tile, dtype, options) -> None:
    """On, the forward saves exactly Δ, cum (float32), the entering states and C Bᵀ fewer bytes than off."""
    inp, kw = make_case(b, l, h, p, g, n, chunk_size, dtype, options)
    kw["return_final_states"] = False

    def saved(extra: str) -> int:
        launch = case_launch(tile, options + extra)
        return saved_activation_bytes(lambda: mamba_chunk_scan_combined(**inp, **kw, backend="triton", launch=launch),
                                      exclude=inp.values())

    T = chunk_length(chunk_size, l, power_of_two=True)
    nc = -(-l // T)
    low = getattr(torch, dtype).itemsize
    cb_size = low if "lowp" in options.split() and low == 2 else 4
    expected = 2 * b * h * nc * T * 4 + b * nc * h * p * n * low + b * nc * g * T * T * cb_size
    if "init" in options.split() and dtype != "float32":
        expected -= b * h * p * n * 4  # on, the float32 copy of bf16 initial states is saved (to recompute)
    on, off = saved(""), saved(" keep")
    assert off - on == expected, (on, off, expected)


def check_autograd_uses(b, l, h, p, g, n, chunk_size, tile, dtype, options) -> None:
    """With the recomputation on: a retained graph's second backward, and non-reentrant activation checkpointing
    (its forward run again in the backward), give the plain backward's bits; a second-order gradient fails clearly;
    the initial states and input_scale, now read again by the backward, may not change in place in between
    (autograd's error, never stale values)."""
    from torch.utils.checkpoint import checkpoint

    inp, kw = make_case(b, l, h, p, g, n, chunk_size, dtype, options)
    launch = case_launch(tile, options)

    def grads(args, outs, **backward):
        torch.manual_seed(1)
        loss = sum((o.double() * torch.randn(o.shape, dtype=torch.float64)).sum() for o in outs)
        return torch.autograd.grad(loss, list(args.values()), **backward)

    def scan(*tensors):
        return mamba_chunk_scan_combined(**dict(zip(inp, tensors)), **kw, backend="triton", launch=launch)

    args = {k: v.detach().requires_grad_() for k, v in inp.items()}
    outs = scan(*args.values())
    first, second = grads(args, outs, retain_graph=True), grads(args, outs)
    args_ckpt = {k: v.detach().requires_grad_() for k, v in inp.items()}
    ckpt = grads(args_ckpt, checkpoint(scan, *args_ckpt.values(), use_reentrant=False))
    for name, a, e, c in zip(inp, first, second, ckpt):
        assert torch.equal(a, e), f"d{name} differs in a retained graph's second backward"
        assert torch.equal(a, c), f"d{name} differs under activation checkpointing"
    # The backward is first-order only: a gradient penalty through it must fail, not leave the SSD's terms out.
    args = {k: v.detach().requires_grad_() for k, v in inp.items()}
    out = scan(*args.values())[0]
    dx, = torch.autograd.grad(out.pow(2).sum(), [args["x"]], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (dx.pow(2).sum() + args["x"].sum()).backward()
    for name in ("initial_states", "input_scale"):
        args = {k: v.detach().requires_grad_() for k, v in inp.items()}
        changed = args[name] * 1.0  # float32, contiguous: the very tensor the backward reads
        outs = scan(*(changed if k == name else v for k, v in args.items()))
        with torch.no_grad():
            changed.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            grads(args, outs)


@pytest.mark.parametrize("group", ["reference", "bits"])
def test_recompute_states_in_interpreter(group):
    run_checks_in_interpreter(__file__, group)


def _main(group: str) -> None:
    if group == "reference":
        # On, the default, runs test_ssd_triton.py's grid; here both settings over this one.
        checks = {f"{name}_{mode}": (check_case, case[:9] + (case[9] + extra,))
                  for name, case in CASES.items() for mode, extra in (("on", ""), ("off", " keep"))}
    else:
        checks = {f"{name}_bits": (check_same_bits, case) for name, case in CASES.items()}
        checks["saved_bytes_float32"] = (check_saved_bytes, CASES["groups_docs_init"])
        checks["saved_bytes_bf16_lowp"] = (check_saved_bytes, CASES["bf16_lowp"])
        checks["saved_bytes_bf16"] = (check_saved_bytes, CASES["bf16_init"])
        checks["autograd_uses"] = (check_autograd_uses, CASES["scale_online"])
    report_checks(checks)


if __name__ == "__main__":
    _main(sys.argv[1])
