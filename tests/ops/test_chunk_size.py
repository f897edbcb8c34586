"""The one ``chunk_size`` rule (ssmkit.ops.chunking): every backend of the SSD and Mamba-3 scans gives the
float64 reference's outputs, final states and gradients for any allowed chunk size (shorter, longer and
not a power of two, against the sequence), and they check the argument alike.

The Triton backends run in Triton's CPU interpreter, in a subprocess (this file as a script).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ssmkit.ops.chunking import check_chunk_size, chunk_length
from ssmkit.ops.mamba3 import mamba3_scan
from ssmkit.ops.ssd import mamba_chunk_scan_combined
from ssmkit.testing import assert_close, report_checks, run_checks_in_interpreter

if __name__ == "__main__":  # run as a script (in the interpreter's subprocess): `tests` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.ops.test_mamba3 import f64, make_inputs, packed_ids

LENGTH = 37
# Against the length 37: one step, a few, 16 (a tile), odd, past the length, the Triton cap, beyond it.
CHUNK_SIZES = (1, 3, 16, 17, 37, 48, 256, 1000)
TRITON_CHUNK_SIZES = (1, 17, 48, 1000)  # the interpreter is slow: one of each kind


def _ssd_inputs(dtype=torch.float32):
    b, h, p, g, n = 2, 4, 3, 2, 5
    gen = torch.Generator().manual_seed(7)
    inp = {
        "x": torch.randn(b, LENGTH, h, p, generator=gen), "dt": torch.randn(b, LENGTH, h, generator=gen) - 1.0,
        "A": -torch.rand(h, generator=gen) - 0.1, "B": torch.randn(b, LENGTH, g, n, generator=gen),
        "C": torch.randn(b, LENGTH, g, n, generator=gen), "D": torch.randn(h, generator=gen),
        "z": torch.randn(b, LENGTH, h, p, generator=gen), "dt_bias": torch.randn(h, generator=gen) * 0.5,
        "initial_states": torch.randn(b, h, p, n, generator=gen),
    }
    return {k: v.to(dtype) for k, v in inp.items()}


def _ssd_run(inp, backend, chunk_size):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    seq_idx = packed_ids(2, LENGTH)
    out, final = mamba_chunk_scan_combined(**leaves, chunk_size=chunk_size, seq_idx=seq_idx, dt_softplus=True,
                                           return_final_states=True, backend=backend)
    gen = torch.Generator().manual_seed(1)
    loss = sum((t.double() * torch.randn(t.shape, generator=gen, dtype=torch.float64)).sum() for t in (out, final))
    loss.backward()
    return [out, final] + [leaves[k].grad for k in inp]


def _mamba3_run(inp, backend, chunk_size):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    out, final = mamba3_scan(**leaves, chunk_size=chunk_size, seq_idx=packed_ids(2, LENGTH), return_final_state=True,
                             backend=backend)
    gen = torch.Generator().manual_seed(1)
    loss = sum((t.double() * torch.randn(t.shape, generator=gen, dtype=torch.float64)).sum()
               for t in (out, final.ssm, torch.cos(final.angle)))
    loss.backward()
    return [out, final.ssm, final.angle] + [leaves[k].grad for k in inp]


def _mamba3_inputs():
    inp = make_inputs(b=2, l=LENGTH, h=4, r=1, g=1, a=2)
    for k in ("mimo_x", "mimo_z", "mimo_o"):  # rank 1 without projections: every backend takes it
        inp.pop(k)
    return inp


def check_agree(op: str, backend: str, chunk_size: int) -> None:
    """``backend`` at ``chunk_size`` against the float64 reference (whose chunk size is ignored)."""
    inp, run = (_ssd_inputs(), _ssd_run) if op == "ssd" else (_mamba3_inputs(), _mamba3_run)
    got = run(inp, backend, chunk_size)
    want = run(f64(inp), "reference", 1)
    for i, (a, e) in enumerate(zip(got, want)):
        assert_close(a, e, torch.float32, name=f"{op} {backend} chunk_size={chunk_size} result {i}")


@pytest.mark.parametrize("op", ["ssd", "mamba3"])
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_chunked_backend_agrees_with_reference_for_any_chunk_size(op, chunk_size):
    check_agree(op, "chunked", chunk_size)


def test_triton_backends_agree_for_any_chunk_size_in_interpreter():
    run_checks_in_interpreter(__file__, "triton")


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-3, ValueError), (True, TypeError), (16.0, TypeError),
                                        ("16", TypeError)])
def test_every_op_rejects_the_same_chunk_sizes(bad, error):
    with pytest.raises(error, match="chunk_size"):
        check_chunk_size(bad)
    with pytest.raises(error, match="chunk_size"):
        mamba_chunk_scan_combined(**_ssd_inputs(), chunk_size=bad)
    with pytest.raises(error, match="chunk_size"):
        mamba3_scan(**_mamba3_inputs(), chunk_size=bad)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 17, 64, 100, 256, 300, 4096])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 100, 1000, 5000])
def test_chunk_length_rule(chunk_size, length):
    T = chunk_length(chunk_size, length)
    assert T == min(chunk_size, -(-length // 16) * 16)
    T2 = chunk_length(chunk_size, length, power_of_two=True)
    assert 16 <= T2 <= 256 and T2 & (T2 - 1) == 0
    assert T2 >= min(T, 256) and (T2 == 16 or T2 < 2 * T)  # the next power of two of T, within [16, 256]


def _main(group: str) -> None:
    assert group == "triton"
    checks = {f"{op}_chunk_{c}": (check_agree, (op, "triton", c)) for op in ("ssd", "mamba3")
              for c in TRITON_CHUNK_SIZES}
    report_checks(checks)


if __name__ == "__main__":
    _main(sys.argv[1])
