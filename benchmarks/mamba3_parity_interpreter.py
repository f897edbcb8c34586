"""Mamba-3 parity on CPU: ssmkit's layer against mamba_ssm's SISO Triton kernels run by Triton's interpreter.

On an H200, ``benchmarks/gpu_mamba3.py`` measured ssmkit vs mamba_ssm's Mamba-3 at a relative error of
~3.6e-3 in float32 as in bfloat16. This script finds out where that comes from, with exact arithmetic:
under ``TRITON_INTERPRET=1`` every ``tl.dot`` is a numpy matmul in its operands' dtype (no TF32), so
mamba_ssm's kernels compute what their source says. Each configuration builds one mamba_ssm ``Mamba3``
(float32), copies its weights into ssmkit's ``Mamba3``, and compares, for the output and the input
gradient of ``sum(y**2)``, the relative error ``||a - b|| / ||b||`` of

* ``ssmkit``:         ssmkit's float32 layer (chunked backend);
* ``mamba_ssm``:      mamba_ssm's layer as shipped. Its ``mamba3_siso_combined`` casts Q, K, V, Z, Trap
  and Angles to bfloat16 whatever the input dtype (the output is then bfloat16 too, and the backward
  keeps its per-chunk states in bfloat16);
* ``mamba_ssm nocast``: the same layer with those casts removed (``_Mamba3Function`` called on the float32
  tensors, chunk states kept in the input dtype): mamba_ssm's math in float32;
* ``mamba_ssm nocast64``: the same in float64, forward only (their backward asserts equal dtypes in a
  tl.dot of a float32 buffer with float64). Their scratch buffers (QK, scale, gamma, decay cumsums), the
  angle cumsum and the B/C norms stay float32, so this agrees to ~1e-7, not 1e-15;

against ssmkit's float64 sequential reference (``backend="reference"``, same weights), and against
each other. The biases, norm weights and D are perturbed away from their init values first. Exits 1
when ssmkit and ``mamba_ssm nocast`` differ by more than 1e-5 (different math), and when ``.ext/``
has no mamba_ssm source.

What is patched, in this process only (the unpacked source under ``.ext/`` is copied to a temporary
directory; nothing under ``.ext/`` changes):

* PTX ``cos/sin/tanh.approx`` (inline assembly, which the interpreter cannot run) -> exact tl.cos,
  tl.sin and tanh via sigmoid; on the GPU these approximations cost ~1e-6 absolute;
* the interpreter's bfloat16 arithmetic: it stores bfloat16 as uint16 and runs numpy on the bit patterns
  (``tl.dot``, ``*``, ``+``, comparisons), and truncates float32 -> bfloat16 casts. bfloat16 operands
  are widened to float32, computed, and rounded to nearest even, as one GPU instruction does;
* two ``assert tensor.is_cuda`` in mamba_ssm's backward wrappers are deleted, ``torch.cuda.device`` and
  ``get_device_properties`` are stubbed for CPU tensors, and each autotuner keeps its first config;
* for ``nocast`` only: ``mamba3_siso_combined`` is replaced by a direct ``_Mamba3Function.apply`` and the
  backward's chunk states (``SSM_States``) are allocated in V's dtype rather than bfloat16 (a no-op for
  the shipped path, whose V is always bfloat16).

``--upstream main`` compares with mamba_ssm's main branch instead of the release: the release's module with
main's heavy-tail decay activation (state-spaces/mamba #962) patched in (``mamba_ssm_source.patch_mamba3_source``;
the kernels are the release's, which main did not change), and ssmkit's layers with
``decay_activation="heavy_tail"`` (``"softplus"`` for the release).

MIMO (TileLang) cannot run here: SISO only.

    python benchmarks/mamba3_parity_interpreter.py [--upstream release|main]   # about 1 min on one CPU core
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, by anything

import argparse
import contextlib
import dataclasses
import functools
import shutil
import sys
import tempfile
import types
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import numpy as np
import torch
import triton
import triton.language as tl
from mamba_ssm_source import DECAY_ACTIVATION, UPSTREAMS, patch_mamba3_source

import ssmkit.layers.mamba3 as ssmkit_mamba3
from ssmkit.ops.mamba3 import mamba3_scan
from ssmkit.ops.mamba3.projected import mamba3_scan_from_projection

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / ".ext").glob("mamba_ssm-*/mamba_ssm"))

# (file under mamba_ssm/, text, replacement): each text must occur exactly once in that file.
TEXT_PATCHES = [
    ("ops/triton/mamba3/mamba3_siso_bwd.py",
     'assert z.is_cuda and o.is_cuda and do.is_cuda, "All tensors must be on CUDA"', "pass"),
    ("ops/triton/mamba3/mamba3_siso_bwd.py",
     ("assert q.is_cuda and k.is_cuda and v.is_cuda and da_cs.is_cuda and da_cs_sum.is_cuda and do.is_cuda, "
      '"All tensors must be on CUDA"'), "pass"),
    ("ops/triton/mamba3/mamba3_siso_fwd.py",
     "SSM_States = torch.zeros((batch, nheads, headdim_v, nchunks * headdim_qk), device=device, dtype=torch.bfloat16)",
     "SSM_States = torch.zeros((batch, nheads, headdim_v, nchunks * headdim_qk), device=device, dtype=V.dtype)"),
]


@dataclasses.dataclass(frozen=True)
class Config:
    """One layer configuration (both libraries' ``Mamba3`` arguments) and input shape."""

    name: str
    d_state: int = 16
    ngroups: int = 1
    rope_fraction: float = 0.5
    is_outproj_norm: bool = False
    chunk_size: int = 16
    A_floor: float = 1e-4
    batch: int = 2
    length: int = 40

    def layer_kwargs(self) -> dict:
        return {"d_model": 64, "headdim": 16, "expand": 2, "d_state": self.d_state, "ngroups": self.ngroups,
                "rope_fraction": self.rope_fraction, "is_outproj_norm": self.is_outproj_norm,
                "chunk_size": self.chunk_size, "A_floor": self.A_floor}


CONFIGS = [
    Config("base (N16, rope 0.5)"),
    Config("outproj_norm", is_outproj_norm=True),
    Config("rope 1.0", rope_fraction=1.0),
    Config("ngroups 2, N32", ngroups=2, d_state=32),
    Config("A_floor 0.5", A_floor=0.5),
    Config("chunk 64, L70, b1", chunk_size=64, length=70, batch=1, is_outproj_norm=True),
]


def load_mamba_ssm(upstream: str) -> types.ModuleType:
    """mamba_ssm's ``modules.mamba3`` (as ``upstream`` computes it) from a patched temporary copy of the source."""
    if not SOURCES:
        sys.exit(f"mamba_ssm's source is not under {ROOT / '.ext'}/ (pip download --no-deps --no-binary :all: "
                 "mamba-ssm, then unpack it there): nothing to compare with")
    copy = Path(tempfile.mkdtemp(prefix="mamba_ssm_interp_")) / "mamba_ssm"
    shutil.copytree(SOURCES[-1], copy)
    for rel, old, new in TEXT_PATCHES:
        path = copy / rel
        text = path.read_text()
        if text.count(old) != 1:
            sys.exit(f"{SOURCES[-1] / rel}: expected exactly one {old[:60]!r}...; is this mamba_ssm 2.3.x?")
        path.write_text(text.replace(old, new))
    module_file = copy / "modules" / "mamba3.py"
    module_file.write_text(patch_mamba3_source(module_file.read_text(), upstream))
    package = types.ModuleType("mamba_ssm")
    package.__path__ = [str(copy)]
    sys.modules["mamba_ssm"] = package
    _patch_interpreter_bf16()
    _patch_ptx_approximations()
    from mamba_ssm.modules import mamba3 as their_module

    _single_autotune_config()
    return their_module


@triton.jit
def _cos_exact(x):
    return tl.cos(x)


@triton.jit
def _sin_exact(x):
    return tl.sin(x)


@triton.jit
def _tanh_exact(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _sech2_exact(x):
    t = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    return 1.0 - t * t


def _patch_ptx_approximations() -> None:
    """Replace the inline-PTX cos/sin/tanh approximations before the kernel modules import them."""
    from mamba_ssm.ops.triton.mamba3 import utils

    utils.cos_approx, utils.sin_approx, utils.tanh_approx, utils.sech2_approx = (
        _cos_exact, _sin_exact, _tanh_exact, _sech2_exact)


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> the same values as float32 (bfloat16 is a float32's upper half)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded to nearest even as the GPU's conversion does."""
    rounded = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
    return rounded.view(torch.int16).numpy().view(np.uint16)


def _patch_interpreter_bf16() -> None:
    """Give the interpreter bfloat16 arithmetic.

    It stores bfloat16 as uint16 and runs numpy on the bit patterns: ``tl.dot``, ``+``, ``*``, comparisons
    and unary functions of two bfloat16 values are garbage, and float32 -> bfloat16 casts truncate. Here
    bfloat16 operands are widened to float32 (exact), computed, and rounded back to nearest even, which is
    what one bfloat16 instruction gives; ``tl.dot`` keeps its float32 result (bf16 x bf16 products are
    exact in float32, as in tensor cores).
    """
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original_dot, original_binary, original_unary, original_cast = (
        builder.create_dot, builder.binary_op, builder.unary_op, builder.cast_impl)

    def widen(t):
        if t.dtype.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_bf16_bits_to_f32(t.data), tl.float32)
        return t

    def narrow(t):
        if t.data.dtype == np.float32:
            return interpreter.TensorHandle(_f32_to_bf16_bits(t.data), tl.bfloat16)
        return t  # a comparison's booleans

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def binary_op(self, lhs, rhs, op):
        if tl.bfloat16 not in (lhs.dtype.scalar, rhs.dtype.scalar):
            return original_binary(self, lhs, rhs, op)
        return narrow(original_binary(self, widen(lhs), widen(rhs), op))

    def unary_op(self, arg, op):
        if arg.dtype.scalar != tl.bfloat16:
            return original_unary(self, arg, op)
        return narrow(original_unary(self, widen(arg), op))

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_f32_to_bf16_bits(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.create_dot, builder.binary_op, builder.unary_op, builder.cast_impl = (
        create_dot, binary_op, unary_op, cast_impl)


def _single_autotune_config() -> None:
    """Autotuning in the interpreter would run each kernel for every config: keep the first."""
    from triton.runtime.autotuner import Autotuner

    for name, module in list(sys.modules.items()):
        if name.startswith("mamba_ssm."):
            for value in vars(module).values():
                if isinstance(value, Autotuner):
                    value.configs = value.configs[:1]


@contextlib.contextmanager
def cpu_cuda_stubs():
    """``torch.cuda.device(None)`` and ``get_device_properties`` for mamba_ssm's norm on CPU tensors."""
    device_props = types.SimpleNamespace(multi_processor_count=4)
    with mock.patch.object(torch.cuda, "device", lambda index: contextlib.nullcontext()), \
            mock.patch.object(torch.cuda, "get_device_properties", lambda device: device_props):
        yield


def siso_without_casts(their_module: types.ModuleType):
    """``mamba3_siso_combined`` minus its bfloat16 casts (same kernels, same autograd function)."""
    from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import _Mamba3Function

    def combined(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None,
                 chunk_size=64, return_final_states=False, cu_seqlens=None):
        if Input_States is not None or return_final_states or cu_seqlens is not None:
            raise NotImplementedError("only the plain forward is compared here")
        return _Mamba3Function.apply(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z,
                                     None, None, None, None, None, chunk_size, False)

    return mock.patch.object(their_module, "mamba3_siso_combined", combined)


def output_and_grads(layer: torch.nn.Module, x: torch.Tensor, backward: bool = True) -> Run:
    """y, dL/dx and {parameter: dL/dparameter} for L = sum(y**2) (no gradients when not ``backward``)."""
    x = x.detach().clone().requires_grad_(backward)
    layer.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(backward):
        y = layer(x)
    if not backward:
        return Run(y, None, None)
    y.double().square().sum().backward()
    return Run(y.detach(), x.grad, {k: p.grad for k, p in layer.named_parameters()})


class Run(NamedTuple):
    y: torch.Tensor
    dx: torch.Tensor | None
    dparams: dict[str, torch.Tensor] | None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def compare(their_module: types.ModuleType, cfg: Config, activation: str) -> dict[str, Run]:
    """One run of each layer variant on the same weights and input."""
    torch.manual_seed(0)
    theirs = their_module.Mamba3(**cfg.layer_kwargs(), dtype=torch.float32)
    with torch.no_grad():
        # Random biases, norm weights and D (not their init values), so that a swapped or missing term shows.
        for name, param in theirs.named_parameters():
            if name in ("B_bias", "C_bias", "D") or name.endswith("norm.weight"):
                param.add_(0.3 * torch.randn_like(param))
    ours = ssmkit_mamba3.Mamba3(**cfg.layer_kwargs(), decay_activation=activation, dtype=torch.float32)
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"state dicts differ: missing {missing}, unexpected {unexpected}")
    reference = ssmkit_mamba3.Mamba3(**cfg.layer_kwargs(), decay_activation=activation, dtype=torch.float64)
    reference.load_state_dict(theirs.state_dict())
    theirs64 = their_module.Mamba3(**cfg.layer_kwargs(), dtype=torch.float64)
    theirs64.load_state_dict(theirs.state_dict())
    x = torch.randn(cfg.batch, cfg.length, 64)

    runs = {"ssmkit": output_and_grads(ours, x)}
    with mock.patch.object(ssmkit_mamba3, "mamba3_scan", functools.partial(mamba3_scan, backend="reference")), \
            mock.patch.object(ssmkit_mamba3, "mamba3_scan_from_projection",
                              functools.partial(mamba3_scan_from_projection, backend="reference")):
        runs["fp64 reference"] = output_and_grads(reference, x.double())
    with cpu_cuda_stubs():
        runs["mamba_ssm"] = output_and_grads(theirs, x)
        with siso_without_casts(their_module):
            runs["mamba_ssm nocast"] = output_and_grads(theirs, x)
            # Their backward asserts equal dtypes in a tl.dot of a float32 buffer with float64: forward only.
            runs["mamba_ssm nocast64"] = output_and_grads(theirs64, x.double(), backward=False)
    return runs


PAIRS = [("ssmkit", "fp64 reference"), ("mamba_ssm", "fp64 reference"), ("mamba_ssm nocast", "fp64 reference"),
         ("mamba_ssm nocast64", "fp64 reference"), ("ssmkit", "mamba_ssm"), ("ssmkit", "mamba_ssm nocast")]
SAME_MATH = 1e-5  # float32 rounding of two different summation orders stays far below this


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", choices=UPSTREAMS, default="release",
                        help="mamba_ssm's release (softplus decay) or main (heavy-tail decay, #962)")
    args = parser.parse_args()
    activation = DECAY_ACTIVATION[args.upstream]
    their_module = load_mamba_ssm(args.upstream)
    torch.set_num_threads(1)
    print(f"mamba_ssm {args.upstream}, ssmkit decay_activation={activation!r}")
    print("Mamba-3 SISO layer, d_model 64, 8 heads x 16, mamba_ssm under TRITON_INTERPRET=1. Relative error")
    print("||a-b||/||b|| of the output, of dL/dx and of the worst parameter gradient, L = sum(y**2).")
    print("Inputs float32 except the float64 reference and mamba_ssm nocast64 (forward only).\n")
    header = f"{'config':<22} {'a':<19} {'b':<17} {'out':>8} {'dx':>8} {'worst dparam':>23}"
    print(header)
    print("-" * len(header))
    worst = dict.fromkeys(PAIRS, 0.0)
    for cfg in CONFIGS:
        runs = compare(their_module, cfg, activation)
        for a, b in PAIRS:
            ra, rb = runs[a], runs[b]
            errors = [rel(ra.y, rb.y)]
            cells = f"{errors[0]:>8.1e}"
            if ra.dx is not None:
                err_p, name_p = max((rel(ra.dparams[k], rb.dparams[k]), k) for k in rb.dparams)
                errors += [rel(ra.dx, rb.dx), err_p]
                cells += f" {errors[1]:>8.1e} {err_p:>8.1e} {name_p:<14}"
            else:
                cells += f" {'-':>8} {'-':>8}"
            worst[(a, b)] = max(worst[(a, b)], *errors)
            print(f"{cfg.name:<22} {a:<19} {b:<17} {cells}", flush=True)
        print()
    print("worst of out, dx and the parameter gradients over the configs:")
    for (a, b), err in worst.items():
        print(f"  {a:<19} vs {b:<17} {err:.1e}")
    same = worst[("ssmkit", "mamba_ssm nocast")]
    if same > SAME_MATH:
        sys.exit(f"\nMISMATCH: ssmkit and mamba_ssm's kernels without their bfloat16 casts differ by {same:.1e} "
                 f"(> {SAME_MATH:.0e}): the math differs somewhere")
    print(f"\nSame math: ssmkit agrees with mamba_ssm's float32 kernel math to {same:.1e}. The shipped path's "
          f"{worst[('ssmkit', 'mamba_ssm')]:.1e} is its bfloat16 casts of Q, K, V, Z, Trap and Angles.")


if __name__ == "__main__":
    main()
