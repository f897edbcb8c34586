"""mamba_ssm's pure-Triton code from its source distribution, for side-by-side benchmarks.

The source (``pip download --no-deps --no-binary :all: mamba-ssm``, unpacked under ``.ext/``; git-ignored,
nothing of it committed) is imported as a bare package: mamba_ssm's own ``__init__`` would load its
compiled CUDA extension, which is not built here.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / ".ext").glob("mamba_ssm-*/mamba_ssm"))


def _hub_mixin_or_stand_in() -> None:
    """mamba_ssm's Mamba2 module subclasses huggingface_hub's PyTorchModelHubMixin (saving to the Hub, which no
    benchmark does). Where that import fails (a device machine's huggingface_hub wanting a missing ``httpx2``),
    a plain class stands in for the mixin, so the module's layers and kernels load unchanged."""
    try:
        from huggingface_hub import PyTorchModelHubMixin  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure: the mixin is not usable here
        print(f"huggingface_hub's PyTorchModelHubMixin unavailable ({type(e).__name__}: {e}); a plain class stands in")
        stand_in = types.ModuleType("huggingface_hub")
        stand_in.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = stand_in


def import_from_source(module: str, name: str) -> Any | None:
    """``name`` from mamba_ssm's ``module`` (e.g. ``"mamba_ssm.modules.mamba3"``), or None (reason printed)."""
    if not SOURCES:
        print(f"mamba_ssm {name}: n/a (no source under .ext/)")
        return None
    if "mamba_ssm" not in sys.modules:
        package = types.ModuleType("mamba_ssm")
        package.__path__ = [str(SOURCES[-1])]
        sys.modules["mamba_ssm"] = package
        _hub_mixin_or_stand_in()
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        print(f"mamba_ssm {name}: n/a ({type(e).__name__}: {e})")
        return None


# Which Mamba-3 the parity benchmarks compare with: the release unpacked under .ext/ (2.3.2.post1), or its
# main branch after state-spaces/mamba #962 ("Stabilize data-dependent A with heavy-tail activation"), which
# changed one thing of the module: A = -heavy_tail_activation(dd_A) instead of -softplus(dd_A), in the forward
# and in the decode step's _preprocess (then the same clamp at -A_floor; Δ, the kernels' inputs and the kernels
# are unchanged). "main" is that change applied to the release's module source, text for text, so that the
# release's kernels get main's inputs; main's own source is not under .ext/.
UPSTREAMS = ("release", "main")
MAIN_DECAY_PATCHES = (
    ("_A = -F.softplus(dd_A.to(torch.float32))", "_A = -_heavy_tail_activation(dd_A.to(torch.float32))"),
    ("_A = -F.softplus(A_proj.to(torch.float32))", "_A = -_heavy_tail_activation(A_proj.to(torch.float32))"),
)
HEAVY_TAIL_SOURCE = '''

def _heavy_tail_activation(x):
    """mamba_ssm main (#962): 1 + x for x >= 0, 1 / (1 - x) for x < 0, written as there."""
    neg = x.clamp_max(0)
    pos = x.clamp_min(0)
    return pos + torch.reciprocal(1 - neg)
'''


def patch_mamba3_source(text: str, upstream: str) -> str:
    """The text of mamba_ssm's ``modules/mamba3.py`` (release) as ``upstream`` computes it."""
    if upstream not in UPSTREAMS:
        raise ValueError(f"upstream must be one of {UPSTREAMS}, got {upstream!r}")
    if upstream == "release":
        return text
    for old, new in MAIN_DECAY_PATCHES:
        if text.count(old) != 1:
            raise RuntimeError(f"mamba_ssm's modules/mamba3.py: expected exactly one {old!r}; is it release 2.3.2?")
        text = text.replace(old, new)
    return text + HEAVY_TAIL_SOURCE


def import_mamba3(upstream: str) -> Any | None:
    """mamba_ssm's ``Mamba3`` class as ``upstream`` ("release" or "main") computes it, or None (reason printed).

    The ssmkit layer to compare it with takes ``decay_activation=DECAY_ACTIVATION[upstream]``.
    """
    cls = import_from_source("mamba_ssm.modules.mamba3", "Mamba3")
    if cls is None or upstream == "release":
        return cls
    path = Path(sys.modules[cls.__module__].__file__)
    module = types.ModuleType("mamba_ssm.modules.mamba3_main")
    module.__file__, module.__package__ = str(path), "mamba_ssm.modules"
    sys.modules[module.__name__] = module
    exec(compile(patch_mamba3_source(path.read_text(), upstream), str(path), "exec"), module.__dict__)  # noqa: S102
    return module.Mamba3


DECAY_ACTIVATION = {"release": "softplus", "main": "heavy_tail"}
