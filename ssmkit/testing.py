"""One tolerance helper for every test and benchmark check.

Errors are measured relative to the size of the expected tensor (``max|a - e| / max(max|e|, floor)``),
which is meaningful for outputs of any scale, plus an absolute floor for tensors that are ~0.
The per-dtype table follows mamba_ssm's test tolerances.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import weakref
from collections.abc import Callable, Iterable

import torch

# (rtol, atol) per dtype of the computation under test.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (3e-4, 1e-5),
    torch.float16: (5e-3, 1e-3),
    torch.bfloat16: (2e-2, 5e-3),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for computations done in ``dtype``."""
    if dtype not in TOLERANCES:
        raise ValueError(f"no tolerance defined for dtype {dtype}")
    return TOLERANCES[dtype]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` computed in float64."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    scale = e.abs().max().item() if e.numel() else 0.0
    diff = (a - e).abs().max().item() if e.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    name: str = "tensor",
) -> None:
    """Assert ``actual`` matches ``expected`` within the tolerance of ``dtype``.

    Passes when ``max|a - e| <= atol + rtol * max|e|``. ``dtype`` defaults to ``actual.dtype``;
    explicit ``rtol``/``atol`` override the table. On failure the message gives the max and mean
    absolute error, the relative error and where the worst element is. NaN in either tensor fails
    unless both have NaN at the same places.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    d_rtol, d_atol = tolerance(dtype or actual.dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        raise AssertionError(
            f"{name}: NaN pattern differs ({int(nan_a.sum())} NaN in actual, {int(nan_e.sum())} in expected)"
        )
    a, e = a[~nan_a], e[~nan_e]
    if e.numel() == 0:
        return
    # Equal values (infinities included) count as exact; inf - inf would otherwise be NaN.
    diff = torch.where(a == e, torch.zeros_like(a), (a - e).abs())
    finite = e[torch.isfinite(e)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    max_err = diff.max().item()
    bound = atol + rtol * scale
    if not max_err <= bound:
        worst = int(diff.argmax())
        raise AssertionError(
            f"{name}: max abs err {max_err:.3e} > bound {bound:.3e} (rtol {rtol:g}, atol {atol:g}, "
            f"max|expected| {scale:.3e}); mean abs err {diff.mean().item():.3e}, "
            f"relative err {max_err / scale if scale else max_err:.3e}, worst at flat index {worst}: "
            f"actual {a.flatten()[worst].item():.6g} vs expected {e.flatten()[worst].item():.6g}"
        )


@torch.no_grad()
def raise_dt_bias(model: torch.nn.Module, by: float = 2.0) -> torch.nn.Module:
    """Add ``by`` to every Δ bias (``dt_bias``, ``dt_proj.bias``) of ``model`` in place, so that its state moves
    within a few tokens (the default init barely moves it) and carrying it across calls shows; returns ``model``."""
    for name, p in model.named_parameters():
        if name.endswith(("dt_bias", "dt_proj.bias")):
            p.add_(by)
    return model


def float64_leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    """A float64 copy of ``t`` that requires grad (the reference's input), or None."""
    return t.detach().double().requires_grad_() if t is not None else None


def saved_activation_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of memory that autograd holds for the backward after ``fn()`` (a forward pass) returns.

    Every tensor saved for backward is seen through ``torch.autograd.graph.saved_tensors_hooks``; what counts
    is the distinct storages still alive when ``fn`` returns, at their size then (a storage released after
    the forward, as the fused functions' recomputed intermediates, counts 0; a view counts its storage
    once). Storages of ``exclude`` (the parameters, the input) are not activations and are left out.
    Device-agnostic: the same number on CPU and CUDA for the same ops and shapes.
    """
    from ssmkit.ops.fused._recompute import KEEPS_SAVED_TENSORS

    refs: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        refs.append(weakref.ref(t))
        return t

    # It stores the tensor itself: the fused functions may release their recomputed intermediates under it.
    setattr(pack, KEEPS_SAVED_TENSORS, True)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    skip = {(str(t.device), t.untyped_storage().data_ptr()) for t in exclude}
    storages: dict[tuple[str, int], int] = {}
    for ref in refs:
        t = ref()
        if t is None:
            continue
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key not in skip:
            storages[key] = t.untyped_storage().nbytes()
    del result
    return sum(storages.values())


def assert_outputs_and_grads_close(
    outs: list[torch.Tensor],
    expected: list[torch.Tensor],
    inputs: dict[str, torch.Tensor | None],
    inputs64: dict[str, torch.Tensor | None],
    dtype: torch.dtype,
    *,
    names: list[str] | None = None,
) -> None:
    """A fast path against its float64 reference: each output, then the gradient of every given input.

    ``inputs`` / ``inputs64`` map names to the tensors each side was called with (None: not given);
    the gradients are those of a random projection of all outputs, the same for both sides. Outputs are
    held to their own dtype's tolerance, gradients to ``dtype``'s and must come back in their input's dtype.
    """
    names = names or [f"output {i}" for i in range(len(outs))]
    for name, got, exp in zip(names, outs, expected):
        assert_close(got, exp, got.dtype, name=name)
    cotangents = [torch.randn_like(e) for e in expected]
    given = [k for k, t in inputs.items() if t is not None]
    grads = torch.autograd.grad(sum((o.double() * c).sum() for o, c in zip(outs, cotangents)),
                                [inputs[k] for k in given])
    exp_grads = torch.autograd.grad(sum((o * c).sum() for o, c in zip(expected, cotangents)),
                                    [inputs64[k] for k in given])
    for name, got, exp in zip(given, grads, exp_grads):
        assert got.dtype == inputs[name].dtype, f"d{name}: dtype {got.dtype} != its input's {inputs[name].dtype}"
        assert_close(got, exp, dtype, name=f"d{name}")


def run_checks_in_interpreter(script: str, group: str, timeout: float = 900) -> None:
    """Run ``python script group`` with ``TRITON_INTERPRET=1`` (it must be set before triton is imported,
    hence a subprocess) and fail with the message of every case that failed there.

    The script's ``__main__`` reports its cases with :func:`report_checks`. Skips (pytest) where triton is
    not installed: the test extra has it only on Linux, where its wheels exist.
    """
    if importlib.util.find_spec("triton") is None:
        import pytest

        pytest.skip("triton is not installed (the test extra installs it on Linux only)")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, script, group], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {name: msg for name, msg in results.items() if msg != "ok"}
    assert not failed, "\n".join(f"{name}: {msg}" for name, msg in failed.items())
    assert results, "no case ran"


def report_checks(checks: dict[str, tuple[Callable[..., None], tuple]]) -> None:
    """Run each ``check(*case)`` from seed 0 on one thread and print ``{name: "ok" | error}`` as JSON."""
    torch.set_num_threads(1)
    results = {}
    for name, (check, case) in checks.items():
        torch.manual_seed(0)
        try:
            check(*case)
            results[name] = "ok"
        except Exception as err:  # noqa: BLE001 - reported per case by the parent test
            results[name] = f"{type(err).__name__}: {err}"
    print(json.dumps(results))



def assert_prenorm_step_matches(layer: torch.nn.Module, d_model: int, batch: int = 3, steps: int = 6,
                                scale: float = 1.0) -> None:
    """A float64 ``layer``'s fused ``step_from_residual(r, norm, state, scale=scale)`` equals
    ``r + scale * layer(norm(r), cache=…)`` token after token, for a block's RMSNorm with non-unit weights;
    so do the states left behind."""
    from ssmkit.layers.norm import RMSNorm

    norm = RMSNorm(d_model).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    r = torch.randn(batch, steps, d_model, dtype=torch.float64)
    fused_state, plain_state = layer.allocate_state(batch), layer.allocate_state(batch)
    for t in range(steps):
        token = r[:, t:t + 1]
        got = layer.step_from_residual(token, norm, fused_state, scale=scale)
        assert_close(got, token + scale * layer(norm(token), cache=plain_state), torch.float64,
                     name=f"position {t}")
    plain = plain_state.tensors()
    for name, value in fused_state.tensors().items():
        assert_close(value, plain[name], torch.float64, name=f"{name} state")
