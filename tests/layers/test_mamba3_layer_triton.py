"""The Mamba-3 layer as it runs on a GPU (every op's ``auto`` backend resolved as on CUDA: the SSD route in Triton,
single input from the projection's raw slices with Δ/A and the B/C norms inside its kernels, MIMO with the norm and
Δ/A kernels before the scan) in Triton's CPU interpreter, against the same layer and weights in float64 on the
sequential reference scan: the output and the gradients of the input, of every parameter and of an initial state.

The layer's own glue is what this checks beyond the ops' tests: B, C, dd_dt, dd_A, trap and the angles handed to
the route as strided views of the projection's output (read in place by the kernels), the gate read inside it,
seq_idx, an initial state, B's and C's own norm eps, both ways of the rotation backward (a group's heads in one
program, the norm's backward in its epilogue; or split, with the norm's own kernel), MIMO and the output norm. The interpreter has to be switched on before triton is
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
from ssmkit.ops.mamba3.projected import mamba3_scan_from_projection
from ssmkit.testing import (
    assert_close,
    report_checks,
    run_checks_in_interpreter,
    tolerance,
)

if __name__ == "__main__":  # run as a script (in the interpreter's subprocess): `tests` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.ops.test_mamba3 import packed_ids

# name -> (dtype, layer settings, packed documents[, extras]): odd lengths, groups, MIMO (B and C norm weights
# repeated per rank), the output norm. Extras: "initial" (an initial state with gradients), "unsplit" (a group's
# heads in one program of the rotation backward, which the interpreter's tiny grids otherwise split), "eps" (C's
# norm eps apart from B's).
CASES = {
    "siso_fp32": ("float32", {}, False),
    "siso_bf16": ("bfloat16", {}, False),
    "groups_packed_outproj_norm_fp32": ("float32", {"ngroups": 2, "is_outproj_norm": True}, True),
    "mimo_rank2_fp32": ("float32", {"is_mimo": True, "mimo_rank": 2}, False),
    "siso_initial_unsplit_packed_bf16": ("bfloat16", {"ngroups": 2}, True, ("initial", "unsplit")),
    "siso_initial_eps_softplus_fp32": ("float32", {"decay_activation": "softplus"}, False, ("initial", "eps")),
}
D_MODEL, LENGTH = 32, 37


@contextlib.contextmanager
def reference_scans() -> Iterator[None]:
    """The layer's scans on the sequential reference backend."""
    with mock.patch.object(mamba3_layer, "mamba3_scan", functools.partial(mamba3_scan, backend="reference")), \
            mock.patch.object(mamba3_layer, "mamba3_scan_from_projection",
                              functools.partial(mamba3_scan_from_projection, backend="reference")):
        yield


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


def check_layer(dtype: str, settings: dict, packed: bool, extras: tuple[str, ...] = ()) -> None:
    from ssmkit.ops.mamba3 import triton_rotary

    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    layer = Mamba3(d_model=D_MODEL, d_state=16, headdim=8, chunk_size=16, **settings)
    with torch.no_grad():  # away from the initial values, so that every term matters
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    if "eps" in extras:
        layer.C_norm.eps = 0.3
    layer = layer.to(dt)
    want_layer = copy.deepcopy(layer).double()  # the same (rounded) weights
    x = torch.randn(2, LENGTH, D_MODEL).to(dt)
    seq_idx = packed_ids(2, LENGTH) if packed else None
    got_x, want_x = x.clone().requires_grad_(), x.double().requires_grad_()
    got_init = want_init = None
    if "initial" in extras:
        init = layer.allocate_state(2)
        for t in init.tensors().values():
            t.copy_(torch.randn_like(t))
        got_init = type(init)(**{k: v.clone().requires_grad_() for k, v in init.tensors().items()})
        want_init = type(init)(**{k: v.double().requires_grad_() for k, v in init.tensors().items()})
    cot = torch.randn(2, LENGTH, D_MODEL, dtype=torch.float64)
    split = mock.patch.object(triton_rotary, "_SPLIT_PROGRAMS", 0) if "unsplit" in extras else contextlib.nullcontext()
    with cuda_choices(), split:
        got = layer(got_x, seq_idx=seq_idx, initial_state=got_init)
        (got.double() * cot).sum().backward()
    with reference_scans():
        want = want_layer(want_x, seq_idx=seq_idx, initial_state=want_init)
        (want * cot).sum().backward()
    assert got.dtype == dt
    # bf16: the layer rounds to bf16 at each stage (projection, the SSD operands, the output, out_proj), so it
    # gets twice one bf16 op's tolerance; float32 the table's.
    rtol, atol = tolerance(dt)
    tol = {"rtol": 2 * rtol, "atol": 2 * atol} if dt == torch.bfloat16 else {}
    assert_close(got, want, dt, name="out", **tol)
    assert_close(got_x.grad, want_x.grad, dt, name="grad x", **tol)
    want_params = dict(want_layer.named_parameters())
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        assert_close(p.grad, want_params[name].grad, dt, name=f"grad {name}", **tol)
    if got_init is not None:
        for name, t in got_init.tensors().items():
            assert_close(t.grad, want_init.tensors()[name].grad, dt, name=f"grad initial {name}", **tol)


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
    with reference_scans():
        want = [want_layer(x.double(), cache=want_cache), want_layer(x[:, :5].double(), cache=want_cache),
                want_layer(x[:, 5:6].double(), cache=want_cache)]
    for name, a, e in zip(("prefill", "continued prefill", "step"), got, want):
        assert_close(a, e, torch.float32, name=name)
    for name, t in cache.tensors().items():
        assert_close(t, want_cache.tensors()[name], torch.float32, name=f"cache {name}")


@pytest.mark.slow  # about 60 s: eight layers' kernels in the interpreter
def test_layer_on_the_triton_route_matches_the_reference_in_interpreter():
    run_checks_in_interpreter(__file__, "all")


if __name__ == "__main__":
    checks = {name: (check_layer, case) for name, case in CASES.items()}
    # Batch 3 and two groups: B's rows read in place at the projection's stride, per batch row.
    checks["groups_cache_b3_fp32"] = (check_layer_cache, ({"ngroups": 2}, 3))
    # MIMO rank 2: the prefill's final state and last B̃ in the cache, then a continued prefill and a decode step.
    checks["mimo_rank2_cache_b2_fp32"] = (check_layer_cache, ({"is_mimo": True, "mimo_rank": 2}, 2))
    report_checks(checks)
