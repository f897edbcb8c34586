"""The Triton decode step under Triton's CPU interpreter, against the float64 torch step.

Each case runs in a subprocess with ``TRITON_INTERPRET=1`` set before triton is imported (the flag is
read at import time, and other test modules of the same worker must not see it). Sizes are tiny: the
interpreter runs every program in Python.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

CASES = ("mamba1", "mamba2", "options", "inplace_views", "slots_and_half_states", "errors")


@pytest.mark.parametrize("case", CASES)
def test_triton_state_update_under_interpreter(case):
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, __file__, case], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"case {case} failed:\n{result.stdout}\n{result.stderr}"
    assert f"{case}: ok" in result.stdout


# ---------------------------------------------------------------------------------------------------
# Everything below runs inside the subprocess.


def _compare(state, args, kw, dtype):
    """Step a copy of ``state`` with Triton and the float64 torch step on upcast inputs; compare."""
    from ssmkit.ops.state_update import selective_state_update
    from ssmkit.testing import assert_close

    up = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    kw64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    expected_state = state.double()
    expected = selective_state_update(expected_state, *up, **kw64, backend="reference")
    actual_state = state.clone()
    actual = selective_state_update(actual_state, *args, **kw, backend="triton")
    assert actual.dtype == args[0].dtype and actual.shape == args[0].shape
    assert_close(actual, expected, dtype, name="y")
    assert_close(actual_state, expected_state, torch.float32, name="state")


def _inputs(shapes, dtype):
    return [torch.randn(s, dtype=dtype) if s is not None else None for s in shapes]


def case_mamba1():
    b, d, n = 3, 8, 5
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for groups in (None, 2):
            bc = (b, n) if groups is None else (b, groups, n)
            x, dt, B, C, z = _inputs([(b, d), (b, d), bc, bc, (b, d)], dtype)
            A = -torch.rand(d, n) * 3
            kw = dict(D=torch.randn(d), z=z, dt_bias=torch.randn(d) * 0.5 - 2, dt_softplus=True)
            _compare(torch.randn(b, d, n), (x, dt - 1, A, B, C), kw, dtype)


def case_mamba2():
    b, h, p, n, g = 2, 4, 3, 6, 2
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for compact in (True, False):
            x, B, C, z = _inputs([(b, h, p), (b, g, n), (b, g, n), (b, h, p)], dtype)
            dt = torch.randn((b, h) if compact else (b, h, p), dtype=dtype)
            A = -torch.rand(h) * 4 if compact else -torch.rand(h, p, n) * 4
            D = torch.randn(h) if compact else torch.randn(h, p)
            bias = torch.randn(h) - 3 if compact else torch.randn(h, p) - 3
            kw = dict(D=D, z=z, dt_bias=bias, dt_softplus=True, dt_limit=(0.01, 0.5))
            _compare(torch.randn(b, h, p, n), (x, dt, A, B, C), kw, dtype)
    # Ungrouped B/C as (b, n); odd p and n beyond one block.
    b, h, p, n = 1, 3, 70, 9
    x, dt, B, C = _inputs([(b, h, p), (b, h), (b, n), (b, n)], torch.float32)
    _compare(torch.randn(b, h, p, n), (x, dt.abs(), -torch.rand(h), B, C), {}, torch.float32)


def case_options():
    """Each optional part off, softplus of very negative Δ (log1p accuracy), and large Δ (threshold)."""
    b, h, p, n = 2, 2, 4, 4
    x, B, C, z = _inputs([(b, h, p), (b, 1, n), (b, 1, n), (b, h, p)], torch.float32)
    A = -torch.rand(h)
    for kw in (dict(), dict(D=torch.randn(h)), dict(z=z), dict(dt_bias=torch.randn(h), dt_softplus=False)):
        _compare(torch.randn(b, h, p, n), (x, torch.rand(b, h), A, B, C), kw, torch.float32)
    for scale in (-25.0, 30.0, -8.0):
        dt = torch.full((b, h), scale) + torch.rand(b, h)
        _compare(torch.randn(b, h, p, n), (x, dt, A, B, C), dict(dt_softplus=True), torch.float32)


def case_inplace_views():
    """The state is updated in its own memory, also when it is a strided slice of a larger cache."""
    from ssmkit.ops.state_update import selective_state_update
    from ssmkit.testing import assert_close

    b, h, p, n = 2, 2, 4, 8
    cache = torch.randn(b, h, n, p + 3).transpose(-1, -2)[:, :, 1 : p + 1]  # (b, h, p, n), not contiguous
    before = cache.clone()
    ptr = cache.data_ptr()
    x, dt, B, C = _inputs([(b, h, p), (b, h), (b, 1, n), (b, 1, n)], torch.float32)
    A = -torch.rand(h)
    expected_state = before.double()
    expected = selective_state_update(expected_state, x.double(), dt.double(), A.double(), B.double(), C.double(),
                                      dt_softplus=True, backend="reference")
    y = selective_state_update(cache, x, dt, A, B, C, dt_softplus=True, backend="triton")
    assert cache.data_ptr() == ptr
    assert_close(cache, expected_state, torch.float32, name="state")
    assert_close(y, expected, torch.float32, name="y")
    # Mamba-1 state as a slice of a batch.
    big = torch.randn(4, 6, 3)
    sub = big[1:3]
    before = sub.clone().double()
    x, dt = torch.randn(2, 6), torch.randn(2, 6)
    A, B, C = -torch.rand(6, 3), torch.randn(2, 3), torch.randn(2, 3)
    y = selective_state_update(sub, x, dt, A, B, C, dt_softplus=True, backend="triton")
    ref = selective_state_update(before, x.double(), dt.double(), A.double(), B.double(), C.double(),
                                 dt_softplus=True, backend="reference")
    assert_close(big[1:3], before, torch.float32, name="state slice")
    assert_close(y, ref, torch.float32, name="y")


def case_slots_and_half_states():
    """A pool of states stepped through state_batch_indices (padding skipped), and fp16/bf16 states."""
    from ssmkit.ops.state_update import selective_state_update
    from ssmkit.testing import assert_close

    for mamba2 in (False, True):
        if mamba2:
            b, h, p, n, g = 4, 4, 3, 5, 2
            pool = torch.randn(6, h, p, n)
            args = (torch.randn(b, h, p), torch.randn(b, h), -torch.rand(h), torch.randn(b, g, n), torch.randn(b, g, n))
            kw = dict(D=torch.randn(h), z=torch.randn(b, h, p), dt_bias=torch.randn(h), dt_softplus=True)
        else:
            b, d, n = 4, 6, 4
            pool = torch.randn(6, d, n)
            args = (torch.randn(b, d), torch.randn(b, d), -torch.rand(d, n), torch.randn(b, n), torch.randn(b, n))
            kw = dict(D=torch.randn(d), z=torch.randn(b, d), dt_bias=torch.randn(d), dt_softplus=True)
        for state_dtype in (torch.float32, torch.float16, torch.bfloat16):
            indices = torch.tensor([5, -1, 0, 7], dtype=torch.int32)  # 7: a custom pad_slot_id
            state = pool.to(state_dtype)
            expected_state = state.double()
            up = [a.double() for a in args]
            kw64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            expected = selective_state_update(expected_state, *up, **kw64, state_batch_indices=indices,
                                              pad_slot_id=7, backend="reference")
            y = selective_state_update(state, *args, **kw, state_batch_indices=indices, pad_slot_id=7,
                                       backend="triton")
            assert torch.equal(y[[1, 3]], torch.zeros_like(y[[1, 3]]))
            assert_close(y, expected, torch.float32, name=f"y {state_dtype}")
            assert_close(state, expected_state, state_dtype, name=f"state {state_dtype}")


def case_errors():
    import pytest as pt

    from ssmkit.ops.state_update import selective_state_update

    b, h, p, n = 1, 2, 2, 2
    args = (torch.randn(b, h, p), torch.randn(b, h), -torch.rand(h), torch.randn(b, n), torch.randn(b, n))
    with pt.raises(ValueError, match="computes in float32"):
        selective_state_update(torch.zeros(b, h, p, n, dtype=torch.float64), *args, backend="triton")
    with pt.raises(ValueError, match="backend must be one of"):
        selective_state_update(torch.zeros(b, h, p, n), *args, backend="cuda")
    # "chunked" is the torch step, equal to "reference".
    s1, s2 = torch.zeros(b, h, p, n), torch.zeros(b, h, p, n)
    assert torch.equal(selective_state_update(s1, *args, backend="chunked"),
                       selective_state_update(s2, *args, backend="reference"))


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through pytest (it sets TRITON_INTERPRET=1)"
    torch.manual_seed(0)
    name = sys.argv[1]
    globals()[f"case_{name}"]()
    print(f"{name}: ok")
