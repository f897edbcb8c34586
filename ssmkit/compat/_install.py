"""``install()``: make ``import mamba_ssm`` / ``import causal_conv1d`` resolve to ``ssmkit.compat``.

A meta-path finder placed first on ``sys.meta_path`` answers for those two names and every module
below them with the already-imported ``ssmkit.compat`` module of the same path (an alias: one module
object under both names, so ``mamba_ssm.ops is ssmkit.compat.mamba_ssm.ops``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

from ssmkit.compat import _transformers

PACKAGES = ("mamba_ssm", "causal_conv1d")
_PREFIX = "ssmkit.compat."


class _AliasLoader(importlib.abc.Loader):
    """Loads ``name`` as the module ``target`` (imported on demand), without executing anything twice."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: types.ModuleType) -> None:
        """The target module ran when it was imported: nothing to do."""


class _CompatFinder(importlib.abc.MetaPathFinder):
    """Finds ``mamba_ssm[.x]`` and ``causal_conv1d[.x]`` as ``ssmkit.compat.<same path>``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".", 1)[0] not in PACKAGES:
            return None
        real = _PREFIX + fullname
        found = importlib.util.find_spec(real)
        if found is None:
            # A path that the real package has and ssmkit.compat does not: say so, don't fall through to it.
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: ssmkit.compat.install() routes {fullname.split('.')[0]} to "
                f"ssmkit.compat, which provides its ops but not {fullname}", name=fullname)
        return importlib.machinery.ModuleSpec(
            fullname, _AliasLoader(real), is_package=found.submodule_search_locations is not None
        )


_FINDER = _CompatFinder()


def is_installed() -> bool:
    """True between :func:`install` and :func:`uninstall`."""
    return _FINDER in sys.meta_path


def install(*, transformers: bool = True) -> None:
    """Make ``import mamba_ssm`` and ``import causal_conv1d`` give ssmkit's drop-ins (opt-in; idempotent).

    Args:
        transformers: also route transformers' SSM models (mamba, mamba2, falcon_mamba, jamba, bamba,
            falcon_h1, nemotron_h, granitemoehybrid, zamba2 and the hybrids sharing their convolution) to
            these ops on every device, CPU included (transformers >= 5.25; see
            :mod:`ssmkit.compat._transformers`). Their modeling modules must be imported after this call:
            those imported before keep their fallbacks, and a warning names them.

    Raises:
        RuntimeError: the real ``mamba_ssm`` or ``causal_conv1d`` is already imported (its functions are
            in use; aliasing the name now would mix two implementations). Install first, or not at all.

    A real package installed but not yet imported is shadowed, with a warning naming it.
    """
    for name in PACKAGES:
        module = sys.modules.get(name)
        if module is not None and not module.__name__.startswith(_PREFIX):
            raise RuntimeError(
                f"{name} is already imported (from {getattr(module, '__file__', '?')}): "
                "ssmkit.compat.install() must run before anything imports it"
            )
    if not is_installed():
        for name in PACKAGES:
            real = importlib.util.find_spec(name)
            if real is not None:
                warnings.warn(f"ssmkit.compat.install(): the installed {name} ({real.origin}) is shadowed by "
                              f"ssmkit.compat.{name}; uninstall() restores it", stacklevel=2)
        sys.meta_path.insert(0, _FINDER)
    if transformers:
        _transformers.route()


def uninstall() -> None:
    """Undo :func:`install`: the names resolve to the real packages (if any) again."""
    while _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    for name in list(sys.modules):
        if name.split(".", 1)[0] in PACKAGES and sys.modules[name].__name__.startswith(_PREFIX):
            del sys.modules[name]
    _transformers.unroute()
