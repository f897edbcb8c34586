"""CPU kernels (``gemv.c``, ``steps.c``, ``mamba_step.c``, ``chunked.c``, ``scan.c``, ``common.h``), built with the
host's C compiler once per machine.

``gemv.c`` holds the GEMVs of :mod:`ssmkit.ops.gemv`; ``steps.c`` the Mamba-2 state step, the convolution's
update and the Mamba-2 steps of :mod:`ssmkit.ops.state_update.native` (with the convolution, or the whole
block with its norm and projections); ``mamba_step.c`` Mamba(-1)'s selective step and its whole block's step:
at batch 1 on a CPU a decode step is bound by the bytes it moves, and these stream weights and states in one
pass where torch's ops take several. ``chunked.c`` holds the SSD's
intra-chunk scores (:mod:`ssmkit.ops.ssd.native`), one pass where torch's elementwise ops take five;
``scan.c`` Mamba-1's selective scan over a sequence without gradients (:mod:`ssmkit.ops.selective_scan.native`).

Optional by design: a fresh ``pip install`` on a machine without a compiler (or with
``SSMKIT_NATIVE=0``) never builds anything, and :func:`library` returns None; the op then takes its
torch path. The library is compiled with ``-O3 -march=native`` (and OpenMP where the compiler has it)
into a per-user cache folder (``SSMKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/ssmkit`` or
``~/.cache/ssmkit``), named by a hash of the sources, the compiler, the flags and this CPU's model
and instruction-set flags, so that a cache shared between machines never loads a build for another
CPU. A cached file is loaded only when this user owns it and nobody else may write to it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("gemv.c", "steps.c", "mamba_step.c", "chunked.c", "scan.c"))
HEADER = Path(__file__).with_name("common.h")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c11")
COMPILE_TIMEOUT_S = 120


def enabled() -> bool:
    """False when the environment switches native code off (``SSMKIT_NATIVE=0``)."""
    return os.environ.get("SSMKIT_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on the first call; None where it cannot be (no compiler, not
    enabled, a failed build: a warning says why, once)."""
    if not enabled():
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None
    try:
        path = _build(compiler)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        warnings.warn(f"ssmkit: the native CPU kernels could not be built ({e}); decode takes torch's ops "
                      "(set SSMKIT_NATIVE=0 to skip the attempt)", RuntimeWarning, stacklevel=3)
        return None
    for fn in (lib.ssmkit_int8_gemv, lib.ssmkit_bf16_gemv):
        fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 3 + [ctypes.c_int]
        fn.restype = None
    lib.ssmkit_gemv_any.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_long] * 3 + [ctypes.c_int]
    lib.ssmkit_gemv_any.restype = None
    lib.ssmkit_ssd_step.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_long] * 5 + [ctypes.c_int]
    lib.ssmkit_ssd_step.restype = None
    P, L = ctypes.c_void_p, ctypes.c_long
    lib.ssmkit_selective_step.argtypes = [P, P, L, P, L, P, L, P, P, P, P, L, P, P, L, P, L, L, L, ctypes.c_int]
    lib.ssmkit_selective_step.restype = None
    lib.ssmkit_conv_step.argtypes = [P, ctypes.c_int, P, L, P, P, P, L, L, L]
    lib.ssmkit_conv_step.restype = None
    F, I = ctypes.c_float, ctypes.c_int
    lib.ssmkit_mamba2_step.argtypes = [P, P, L, P, L, P, P, F, F, P, I, P, L, P, L, F, I, P, L, L, L, L, L, I]
    lib.ssmkit_mamba2_step.restype = None
    lib.ssmkit_mamba2_conv_step.argtypes = [P, P, P, L, P, P, L, P, P, F, F, P, I, P, L, F, I, P, P, L, L, L, L, L, I]
    lib.ssmkit_mamba2_conv_step.restype = None
    lib.ssmkit_mamba2_layer_step.argtypes = [P, P, L, P, F, I, P, P, P, L, I, P, P, P, P, P, P, P, L, P, P, F, F, P, I,
                                             P, L, F, I, P, L, L, L, L, L, I]
    lib.ssmkit_mamba2_layer_step.restype = None
    lib.ssmkit_mamba_layer_step.argtypes = [P, P, P, P, P, P, L, I]
    lib.ssmkit_mamba_layer_step.restype = None
    lib.ssmkit_mamba_layer_size.argtypes = []
    lib.ssmkit_mamba_layer_size.restype = L
    lib.ssmkit_ssd_scores.argtypes = [P, P, P, L, L, L, L, F, I]
    lib.ssmkit_ssd_scores.restype = None
    lib.ssmkit_selective_scan.argtypes = [P, P, P, P, L, L, P, P, P, P, P, P, P, L, L, L, L, L, I, I]
    lib.ssmkit_selective_scan.restype = I
    lib.ssmkit_selective_scan_vectorized.argtypes = []
    lib.ssmkit_selective_scan_vectorized.restype = I
    return lib


def _cache_dir() -> Path:
    root = os.environ.get("SSMKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ssmkit")
    folder = Path(root) / "native"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def _cpu_id() -> str:
    """This CPU's model and instruction-set flags (what ``-march=native`` compiles for)."""
    ident = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features", "CPU part")):
                ident += "\n" + line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        ident += platform.processor()
    return ident


def _trusted(path: Path) -> bool:
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _build(compiler: str) -> Path:
    source = b"\0".join(path.read_bytes() for path in (*SOURCES, HEADER))
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False,
                             timeout=COMPILE_TIMEOUT_S).stdout
    tag = hashlib.sha256(b"\0".join([source, compiler.encode(), version.encode(), " ".join(FLAGS).encode(),
                                     _cpu_id().encode()])).hexdigest()[:20]
    folder = _cache_dir()
    target = folder / f"kernels-{tag}.so"
    if target.exists():
        if _trusted(target):
            return target
        raise RuntimeError(f"{target} is not owned by this user or is writable by others; not loading it")
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        errors = ""
        for extra in (("-fopenmp",), ()):  # OpenMP where the compiler has it, else one thread
            done = subprocess.run([compiler, *FLAGS, *extra, *(str(path) for path in SOURCES), "-o", tmp, "-lm"], capture_output=True,
                                  check=False, text=True, timeout=COMPILE_TIMEOUT_S)
            if done.returncode == 0:
                os.chmod(tmp, 0o755)
                os.replace(tmp, target)  # atomic: a concurrent build writes the same bytes
                return target
            errors = done.stderr.strip()[-300:]
        raise RuntimeError(f"{compiler} failed: {errors}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
