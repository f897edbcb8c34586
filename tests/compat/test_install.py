"""``ssmkit.compat``: the import paths of mamba_ssm / causal_conv1d and the opt-in ``install()``.

``install()`` changes the process's import system, so every check runs in a fresh interpreter (this file
run as a script), grouped in one subprocess per test.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch


def _run(code: str, tmp_path=None) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_compat_modules_are_ssmkits_functions_under_mamba_ssm_paths():
    from ssmkit import ops
    from ssmkit.compat.causal_conv1d import (
        causal_conv1d_fn,
        causal_conv1d_update,
        causal_conv1d_varlen_states,
    )
    from ssmkit.compat.mamba_ssm.ops.selective_scan_interface import (
        mamba_inner_fn,
        selective_scan_fn,
    )
    from ssmkit.compat.mamba_ssm.ops.triton.layernorm_gated import (
        layernorm_fn,
        rmsnorm_fn,
    )
    from ssmkit.compat.mamba_ssm.ops.triton.selective_state_update import (
        selective_state_update,
    )
    from ssmkit.compat.mamba_ssm.ops.triton.ssd_combined import (
        mamba_chunk_scan_combined,
        mamba_split_conv1d_scan_combined,
    )

    assert causal_conv1d_fn is ops.causal_conv1d_fn and causal_conv1d_update is ops.causal_conv1d_update
    assert causal_conv1d_varlen_states is ops.causal_conv1d_varlen_states
    assert selective_scan_fn is ops.selective_scan_fn and mamba_inner_fn is ops.mamba_inner_fn
    assert rmsnorm_fn is ops.rmsnorm_fn and layernorm_fn is ops.layernorm_fn
    assert selective_state_update is ops.selective_state_update
    assert mamba_chunk_scan_combined is ops.mamba_chunk_scan_combined
    assert mamba_split_conv1d_scan_combined is ops.mamba_split_conv1d_scan_combined


def test_gated_norm_modules_match_the_functions():
    from ssmkit.compat.mamba_ssm.ops.triton.layernorm_gated import LayerNorm, RMSNorm
    from ssmkit.ops import layernorm_fn, rmsnorm_fn

    x, z = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    norm = LayerNorm(16, eps=1e-5, group_size=8, norm_before_gate=False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    assert torch.equal(norm(x, z), layernorm_fn(x, norm.weight, norm.bias, z, 1e-5, 8, False))
    rms = RMSNorm(16, group_size=4)
    assert rms.bias is None
    assert torch.equal(rms(x, z), rmsnorm_fn(x, rms.weight, None, z, 1e-5, 4, True))


def test_importing_ssmkit_installs_nothing():
    out = _run("""
        import importlib.util, sys
        import ssmkit, ssmkit.ops, ssmkit.compat
        print(importlib.util.find_spec("mamba_ssm") is None, importlib.util.find_spec("causal_conv1d") is None,
              ssmkit.compat.is_installed())
    """)
    assert out.split() == ["True", "True", "False"]


def test_install_aliases_every_path_and_uninstall_restores():
    out = _run("""
        import sys
        import ssmkit.compat
        ssmkit.compat.install(transformers=False)
        ssmkit.compat.install(transformers=False)  # idempotent
        import mamba_ssm, causal_conv1d
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn, layernorm_fn, RMSNorm
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, mamba_inner_fn
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
        from causal_conv1d.causal_conv1d_varlen import causal_conv1d_varlen_states
        import ssmkit.ops as ops
        assert mamba_ssm is sys.modules["ssmkit.compat.mamba_ssm"]
        assert sys.modules["mamba_ssm.ops.triton"] is sys.modules["ssmkit.compat.mamba_ssm.ops.triton"]
        assert mamba_chunk_scan_combined is ops.mamba_chunk_scan_combined and causal_conv1d_fn is ops.causal_conv1d_fn
        from packaging.version import Version
        assert Version(mamba_ssm.__version__) >= Version("2.0.4") and Version(causal_conv1d.__version__).local
        try:
            import mamba_ssm.modules.mamba2
        except ModuleNotFoundError as err:
            assert "provides its ops but not mamba_ssm.modules" in str(err), err
        else:
            raise AssertionError("mamba_ssm.modules imported")
        try:
            from mamba_ssm import Mamba2
        except ImportError:
            pass
        else:
            raise AssertionError("mamba_ssm.Mamba2 exists")
        ssmkit.compat.uninstall()
        assert not ssmkit.compat.is_installed() and "mamba_ssm" not in sys.modules
        try:
            import mamba_ssm
        except ModuleNotFoundError:
            print("ok")
    """)
    assert out.strip() == "ok"


def test_install_refuses_when_the_real_package_is_imported_and_warns_when_it_is_shadowed(tmp_path):
    (tmp_path / "causal_conv1d").mkdir()
    (tmp_path / "causal_conv1d" / "__init__.py").write_text("REAL = True\n")
    out = _run(f"""
        import sys, warnings
        sys.path.insert(0, {str(tmp_path)!r})
        import ssmkit.compat
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ssmkit.compat.install(transformers=False)
        assert any("causal_conv1d" in str(w.message) and "shadowed" in str(w.message) for w in caught), caught
        import causal_conv1d
        assert not hasattr(causal_conv1d, "REAL")
        ssmkit.compat.uninstall()
        import causal_conv1d
        assert causal_conv1d.REAL
        try:
            ssmkit.compat.install(transformers=False)
        except RuntimeError as err:
            assert "already imported" in str(err)
            print("ok")
    """)
    assert out.strip() == "ok"


@pytest.mark.parametrize("name", ["causal_conv1d_fn", "causal_conv1d_update"])
def test_compat_signatures_take_causal_conv1d_positional_order(name):
    import inspect

    import ssmkit.compat.causal_conv1d as compat

    params = list(inspect.signature(getattr(compat, name)).parameters)
    expected = {
        "causal_conv1d_fn": ["x", "weight", "bias", "seq_idx", "initial_states", "return_final_states",
                             "final_states_out", "activation"],
        "causal_conv1d_update": ["x", "conv_state", "weight", "bias", "activation", "cache_seqlens",
                                 "conv_state_indices"],
    }[name]
    assert params[: len(expected)] == expected


def test_install_names_transformers_models_imported_before_it():
    pytest.importorskip("transformers")
    out = _run("""
        import warnings
        import transformers.integrations.hub_kernels as hub
        if not hasattr(hub, "use_kernel_func_from_hub_with_fallback"):
            print("ok")  # transformers < 5.25: nothing to route on CPU
            raise SystemExit
        import transformers.models.mamba.modeling_mamba
        import ssmkit.compat
        before = dict(hub._PACKAGE_SUPPORTED_DEVICES)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ssmkit.compat.install()
        messages = [str(w.message) for w in caught]
        assert any("transformers.models.mamba.modeling_mamba" in m for m in messages), messages
        assert "mamba_ssm" not in hub._PACKAGE_SUPPORTED_DEVICES
        ssmkit.compat.uninstall()
        assert hub._PACKAGE_SUPPORTED_DEVICES == before
        print("ok")
    """)
    assert out.strip() == "ok"
