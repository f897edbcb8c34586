"""The Mamba-3 layer as it runs on a GPU (every op's ``auto`` backend resolved as on CUDA: the norm, Δ/A and the
SSD route in Triton) in Triton's CPU interpreter, against the same layer and weights in float64 on the sequential
reference scan: the output and the gradients of the input and of every parameter.

The layer's own glue is what this checks beyond the ops' tests: B and C normalised by one call and handed to the
route as row-strided views of its output (read in place by the rotation kernels), the gate read inside the
in-projection's output, seq_idx, MIMO and the output norm. The interpreter has to be switched on before triton is
imported, so the cases run in a subprocess (this file as a script).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch

import ssmkit.layers.mamba3 as mamba3_layer
import ssmkit.ops.backend as backend_module
from ssmkit.layers import Mamba3
from ssmkit.ops.mamba3 import mamba3_scan
from ssmkit.testing import (
    assert_close,
    report_checks,
    run_checks_in_interpreter,
    tolerance,
)

if __name__ == "__main__":  # run as a script (in the interpreter's subprocess): `tests` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.ops.test_mamba3 import packed_ids

# name -> (dtype, layer settings, packed documents): odd lengths, groups, MIMO (B and C norm weights repeated per
# rank), the output norm.
CASES = {
    "siso_fp32": ("float32", {}, False),
    "siso_bf16": ("bfloat16", {}, False),
    "groups_packed_outproj_norm_fp32": ("float32", {"ngroups": 2, "is_outproj_norm": True}, True),
    "mimo_rank2_fp32": ("float32", {"is_mimo": True, "mimo_rank": 2}, False),
}
D_MODEL, LENGTH = 32, 37


@contextlib.contextmanager
def cuda_choices() -> Iterator[None]:
    """Every op's ``auto`` backend resolves to Triton wherever it has it, as on CUDA (Triton's interpreter)."""
    resolve = backend_module.resolve_backend

    def as_on_cuda(backend: str, device: torch.device, *, has_triton: bool = False) -> str:
        return "triton" if backend == "auto" and has_triton else resolve(backend, device, has_triton=has_triton)

    users = [m for m in list(sys.modules.values()) if getattr(m, "resolve_backend", None) is resolve]
    with contextlib.ExitStack() as stack:
        for module in users:
            stack.enter_context(mock.patch.object(module, "resolve_backend", as_on_cuda))
        yield


def check_layer(dtype: str, settings: dict, packed: bool) -> None:
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    layer = Mamba3(d_model=D_MODEL, d_state=16, headdim=8, chunk_size=16, **settings)
    with torch.no_grad():  # away from the initial values, so that every term matters
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    layer = layer.to(dt)
    want_layer = copy.deepcopy(layer).double()  # the same (rounded) weights
    x = torch.randn(2, LENGTH, D_MODEL).to(dt)
    seq_idx = packed_ids(2, LENGTH) if packed else None
    got_x, want_x = x.clone().requires_grad_(), x.double().requires_grad_()
    cot = torch.randn(2, LENGTH, D_MODEL, dtype=torch.float64)
    with cuda_choices():
        got = layer(got_x, seq_idx=seq_idx)
        (got.double() * cot).sum().backward()
    with mock.patch.object(mamba3_layer, "mamba3_scan", functools.partial(mamba3_scan, backend="reference")):
        want = want_layer(want_x, seq_idx=seq_idx)
        (want * cot).sum().backward()
    assert got.dtype == dt
    # bf16: the layer rounds to bf16 at each stage (projection, norm, the SSD operands, the output, out_proj),
    # so it gets twice one bf16 op's tolerance; float32 the table's.
    rtol, atol = tolerance(dt)
    tol = {"rtol": 2 * rtol, "atol": 2 * atol} if dt == torch.bfloat16 else {}
    assert_close(got, want, dt, name="out", **tol)
    assert_close(got_x.grad, want_x.grad, dt, name="grad x", **tol)
    want_params = dict(want_layer.named_parameters())
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        assert_close(p.grad, want_params[name].grad, dt, name=f"grad {name}", **tol)


def check_layer_cache(settings: dict, batch: int) -> None:
    """A prefill into a cache, a second prefill continuing from it and one decode step: the outputs and the
    cache (the route's final angle, state, last B̃ from B's in-place view, last x) against float64."""
    torch.manual_seed(0)
    layer = Mamba3(d_model=D_MODEL, d_state=16, headdim=8, chunk_size=16, **settings)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    want_layer = copy.deepcopy(layer).double()
    x = torch.randn(batch, 21, D_MODEL)
    cache, want_cache = layer.allocate_state(batch), want_layer.allocate_state(batch)
    with cuda_choices():
        got = [layer(x, cache=cache), layer(x[:, :5], cache=cache), layer(x[:, 5:6], cache=cache)]
    with mock.patch.object(mamba3_layer, "mamba3_scan", functools.partial(mamba3_scan, backend="reference")):
        want = [want_layer(x.double(), cache=want_cache), want_layer(x[:, :5].double(), cache=want_cache),
                want_layer(x[:, 5:6].double(), cache=want_cache)]
    for name, a, e in zip(("prefill", "continued prefill", "step"), got, want):
        assert_close(a, e, torch.float32, name=name)
    for name, t in cache.tensors().items():
        assert_close(t, want_cache.tensors()[name], torch.float32, name=f"cache {name}")


@pytest.mark.slow  # about 60 s: five layers' kernels in the interpreter
def test_layer_on_the_triton_route_matches_the_reference_in_interpreter():
    run_checks_in_interpreter(__file__, "all")


if __name__ == "__main__":
    checks = {name: (check_layer, case) for name, case in CASES.items()}
    # Batch 3 and two groups: B's rows read in place at the projection's stride, per batch row.
    checks["groups_cache_b3_fp32"] = (check_layer_cache, ({"ngroups": 2}, 3))
    report_checks(checks)
