"""The decode launch table: its settings are checked, switched for a block and restored, and programmatic
dependent launch is never asked of a device or a Triton that cannot do it."""

from __future__ import annotations

import pytest
import torch

from ssmkit.ops import decode_launch
from ssmkit.ops.decode_launch import VARIANTS, DecodeLaunch


def test_every_variant_is_valid_the_default_is_pdl_head_and_plain_changes_nothing():
    assert VARIANTS["plain"] == DecodeLaunch()
    assert not any(getattr(VARIANTS["plain"], f) for f in ("pdl", "greedy_head", "mamba1_out_gemv"))
    assert VARIANTS["default"] == VARIANTS["pdl_head"]
    assert all(getattr(VARIANTS["default"], f) for f in ("pdl", "greedy_head", "mamba1_out_gemv"))
    for name, settings in VARIANTS.items():
        assert isinstance(settings, DecodeLaunch), name


@pytest.mark.parametrize("bad, message", [
    ({"gemv_tile": 3000}, "gemv_tile must be a power of two"),
    ({"gemv_tile": 0}, "gemv_tile must be a power of two"),
    ({"step_block_p": True}, "step_block_p must be a power of two"),
    ({"gemv_warps": 3}, "gemv_warps must be one of"),
])
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        DecodeLaunch(**bad)


def test_use_switches_for_the_block_and_restores_after_an_error():
    before = decode_launch.current()
    with pytest.raises(RuntimeError), decode_launch.use("best") as settings:
        assert decode_launch.current() is settings is VARIANTS["best"]
        raise RuntimeError
    assert decode_launch.current() is before
    custom = DecodeLaunch(gemv_tile=2048)
    with decode_launch.use(custom):
        assert decode_launch.current() is custom
    assert decode_launch.current() is before
    with pytest.raises(ValueError, match="unknown decode launch variant"), decode_launch.use("fastest"):
        pass
    with pytest.raises(TypeError, match="must be a DecodeLaunch"):
        decode_launch.set_current("best")


def test_pdl_is_off_where_it_cannot_run(monkeypatch):
    with decode_launch.use("pdl"):
        assert decode_launch.pdl_launch(torch.device("cpu")) == (False, {})
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert not decode_launch.pdl_available(torch.device("cuda"))


def test_the_environment_names_the_variant_at_import(monkeypatch):
    monkeypatch.setenv("SSMKIT_DECODE_LAUNCH", "wide")
    assert decode_launch._from_environment() is VARIANTS["wide"]
    monkeypatch.setenv("SSMKIT_DECODE_LAUNCH", "")
    assert decode_launch._from_environment() is VARIANTS["default"]
    monkeypatch.setenv("SSMKIT_DECODE_LAUNCH", "turbo")
    with pytest.raises(ValueError, match="SSMKIT_DECODE_LAUNCH='turbo' is not a decode launch variant"):
        decode_launch._from_environment()


def test_the_mamba2_step_reads_only_layer_parameters_before_its_pdl_wait():
    """Under PDL the step kernel may start before the kernel right before it has finished: what it reads before
    ``pdl_wait`` must be written by no kernel of a step. The conv taps and bias, dt_bias and D are views of the
    layer's parameters; A is not (``-exp(A_log)``, computed by a kernel on decode_A's first call, and by every
    step in mamba_ssm's and transformers' layers), nor any activation or state."""
    import ast
    import inspect
    import textwrap

    triton = pytest.importorskip("triton")
    del triton
    from ssmkit.ops.decode_step.triton import _conv_ssm_step_kernel

    body = ast.parse(textwrap.dedent(inspect.getsource(_conv_ssm_step_kernel.fn))).body[0].body
    wait = next(i for i, stmt in enumerate(body) if "pdl_wait" in ast.unparse(stmt))
    # Pointer arguments, and the names computed from them (row pointers), mapped to the arguments they come from.
    roots: dict[str, set[str]] = {}

    def pointers_in(node: ast.AST) -> set[str]:
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        return {p for name in names for p in ({name} if name.endswith("_ptr") else roots.get(name, set()))}

    read = set()
    for stmt in body[:wait]:
        for call in (n for n in ast.walk(stmt) if isinstance(n, ast.Call)):
            read |= pointers_in(ast.Tuple(elts=[*call.args, *(k.value for k in call.keywords)]))
        if isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                for name in (n.id for n in ast.walk(target) if isinstance(n, ast.Name)):
                    roots[name] = pointers_in(stmt.value)
    assert read == {"w_ptr", "cb_ptr", "bias_ptr", "D_ptr"}, read
