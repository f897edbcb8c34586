"""Lean one-token decode steps of Mamba and Mamba-2 blocks: about twenty torch calls per block, no checks.

A block's own decode path (``Block.forward`` with a cache, then the mixer's ``step_from_residual`` and
the ops ``causal_conv1d_update`` / ``selective_state_update``) validates every argument, picks a backend
and recomputes parameter casts on every call: on CPU at batch 1 that costs about as much as a small
matmul per op. Here a block is read once into a :class:`MambaStep` / :class:`Mamba2Step`: parameters
cast to the compute dtype, ``A = -exp(A_log)`` computed, a matmul chosen per weight
(:func:`linear_fn`), and for Mamba-2 the state update in one pass where the native kernels are built
(:mod:`ssmkit.ops.state_update.native`); a step then is a fixed sequence of torch calls on the cache's
tensors, in place.
Whoever builds a step checks, once, that the block is supported (:func:`lean_block_step`) and that the
states it will be given have the right kind and shapes.

Numerics: the layers' formulas, at the same rounding points (activations rounded to the weights' dtype
where the layers round them, the scan in float32): equal to the layers' step up to float rounding
(tests/layers/test_lean_step.py). Parameters are copied when built: a step built before a weight
changes keeps the old weight (the caller rebuilds; :func:`ssmkit.generation.decode.lean_decoder` keys
its cache on the parameters' versions).

Dimensions: ``b`` batch, ``H`` d_model, ``I`` d_inner, ``N`` d_state, ``R`` dt_rank, ``w`` d_conv,
``h`` heads, ``p`` head dim, ``g`` groups of B/C, ``c`` conv channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit.layers.mamba import Mamba, MambaState
from ssmkit.layers.mamba2 import Mamba2, Mamba2State
from ssmkit.layers.quantized import MAX_KERNEL_ROWS, Int8Linear, _has_int8_kernel
from ssmkit.ops._step_sizes import NO_LIMIT
from ssmkit.ops.causal_conv1d.native import native_conv_step
from ssmkit.ops.gemv import MAX_ROWS, native_available, native_linear
from ssmkit.ops.state_update.native import (
    native_mamba2_conv_step,
    native_mamba2_layer_step,
    native_mamba2_step,
    native_mamba_layer_step,
    native_selective_step,
    native_ssd_step,
)

Linear = Callable[[torch.Tensor], torch.Tensor]
LEAN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def linear_fn(module: nn.Module) -> Linear:
    """``x (b, k) -> (b, n)`` computing ``module(x)`` (an ``nn.Linear`` or :class:`Int8Linear`) by the
    fastest batch-1 path this CPU offers, in the module's dtype.

    float32 at up to 8 rows: ssmkit's native kernel (:mod:`ssmkit.ops.gemv`) where it is built (it streams the
    weight ~15% faster than MKL's GEMV at batch 1), else ``F.linear``. bfloat16 at up to 8 rows: the native
    kernel, float32 accumulation as torch's; else (and float16) ``torch.mv`` at one row, whose
    reduced-precision GEMV reads the weight about 1.3-2x faster than ``F.linear``'s at batch 1 on AVX-512
    CPUs. int8 at up to 8 rows: the native kernel, else ``aten._weight_int8pack_mm`` with bfloat16
    activations, as :class:`Int8Linear`. More rows: the module's own matmul.
    """
    if isinstance(module, Int8Linear):
        return _int8_fn(module)
    weight = module.weight.detach()
    bias = None if module.bias is None else module.bias.detach()
    if weight.device.type != "cpu":
        return lambda x: F.linear(x, weight, bias)
    if weight.dtype == torch.float32:
        if not native_available():
            return lambda x: F.linear(x, weight, bias)
        native32 = native_linear(weight, None, bias)
        return lambda x: native32(x) if x.shape[0] <= MAX_ROWS and x.dtype == torch.float32 else F.linear(
            x, weight, bias)
    if weight.dtype == torch.bfloat16 and native_available():
        native = native_linear(weight, None, bias)

        def bf16_native(x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > MAX_ROWS:
                return F.linear(x, weight, bias)
            return native(x.to(torch.float32)).to(x.dtype)
        return bf16_native

    def reduced(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            return F.linear(x, weight, bias)
        y = torch.mv(weight, x[0]).unsqueeze(0)
        return y if bias is None else y + bias
    return reduced


def _int8_fn(module: Int8Linear) -> Linear:
    bias = None if module.bias is None else module.bias.detach()
    if native_available():
        native = native_linear(module.qweight, module.scales, bias)

        def int8_native(x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > MAX_ROWS:
                return module(x)
            return native(x.to(torch.float32)).to(x.dtype)
        return int8_native
    if not _has_int8_kernel(module.qweight.device):
        return module
    qweight, scales = module.qweight, module.scales.to(torch.bfloat16)

    def int8(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > MAX_KERNEL_ROWS:
            return module(x)
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), qweight, scales).to(x.dtype)
        return y if bias is None else y + bias
    return int8


def _linear_from_f32(module: nn.Module, out_dtype: torch.dtype) -> Linear:
    """``x (b, k) float32 holding values of the module's dtype -> module(x) (b, n) in out_dtype``, the
    module's own rounding kept: float32 output for ``in_proj`` (what :func:`native_mamba2_conv_step` reads),
    the module's dtype for ``out_proj``. The native bfloat16 GEMV takes float32 inputs and gives float32
    outputs, so no round trip through bfloat16 is made around it."""
    dtype = _weight_dtype(module)
    if dtype == torch.bfloat16 and not isinstance(module, Int8Linear) and native_available():
        weight = module.weight.detach()
        bias = None if module.bias is None else module.bias.detach()
        native = native_linear(weight, None, bias)

        def bf16_native(x: torch.Tensor) -> torch.Tensor:
            y = native(x) if x.shape[0] <= MAX_ROWS else F.linear(x.to(dtype), weight, bias)
            return y.to(out_dtype)
        return bf16_native
    linear = linear_fn(module)
    return lambda x: linear(x.to(dtype)).to(out_dtype)


def _native_matrix(module: nn.Module, dtype: torch.dtype) -> tuple | None:
    """``(weight, scales, bias)`` of a projection the native layer step reads, in a layer of ``dtype``:
    an ``nn.Linear`` of that dtype or an :class:`Int8Linear` computing in it; None for anything else."""
    if isinstance(module, Int8Linear):
        ok = module.compute_dtype == dtype and module.qweight.dtype == torch.int8
        return (module.qweight, module.scales, module.bias) if ok else None
    if isinstance(module, nn.Linear) and module.weight.dtype == dtype:
        return module.weight, None, module.bias
    return None


def _weight_dtype(module: nn.Module) -> torch.dtype:
    return module.compute_dtype if isinstance(module, Int8Linear) else module.weight.dtype


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


class _ConvStep:
    """The depthwise causal convolution of one token over the state window, SiLU, in float32: the native
    kernel (:mod:`ssmkit.ops.causal_conv1d.native`) for float32 windows and bfloat16 windows of bfloat16
    inputs, torch's ops otherwise (no compiler, other dtypes)."""

    def __init__(self, conv1d: nn.Conv1d) -> None:
        self.weight = _f32(conv1d.weight.squeeze(1))  # (c, w)
        self.bias = _f32(conv1d.bias)
        self.native = native_conv_step(self.weight, self.bias)

    def __call__(self, x: torch.Tensor, conv: torch.Tensor) -> torch.Tensor:
        """x (b, c) this token's inputs; conv (b, c, w) the window, shifted in place. -> (b, c) in x's dtype."""
        if self.native is not None and conv.is_contiguous() and (
                conv.dtype == torch.float32 or conv.dtype == x.dtype == torch.bfloat16):
            return self.native(x.to(torch.float32), conv).to(x.dtype)
        window = torch.cat([conv[..., 1:], x.to(conv.dtype).unsqueeze(-1)], dim=-1)
        conv.copy_(window)
        out = (window.to(torch.float32) * self.weight).sum(-1)
        if self.bias is not None:
            out += self.bias
        return F.silu(out, inplace=True).to(x.dtype)


class MambaStep:
    """One token of a pre-norm :class:`~ssmkit.layers.Block` around a :class:`Mamba` mixer (no
    feed-forward): ``r -> r + mixer(norm(r))``, updating a :class:`MambaState` in place."""

    def __init__(self, norm: nn.Module, mixer: Mamba) -> None:
        self.norm_weight, self.eps = _f32(norm.weight), norm.eps
        self.dtype = _weight_dtype(mixer.in_proj)
        self.in_proj, self.x_proj, self.out_proj = (linear_fn(m) for m in (mixer.in_proj, mixer.x_proj,
                                                                           mixer.out_proj))
        self.dt_weight = mixer.dt_proj.weight.detach()
        self.dt_bias = _f32(mixer.dt_proj.bias)
        self.conv = _ConvStep(mixer.conv1d)
        self.A = -torch.exp(_f32(mixer.A_log))  # (I, N)
        self.D = _f32(mixer.D)
        self.split = (mixer.dt_rank, mixer.d_state, mixer.d_state)
        self.d_inner = mixer.d_inner
        # dt_proj, the state update, D and the gate in one pass where the native kernels are built; a float32
        # dt_proj inside it, a reduced-precision one (its output rounded, as the layer's) before it.
        bind = native_selective_step()
        self.selective_step, self.dt_inside = None, self.dt_weight.dtype == torch.float32
        if bind is not None:
            self.selective_step = bind(self.A, self.dt_bias, self.D, self.dt_weight if self.dt_inside else None)
        # The whole block in one call (norm, the four projections, convolution, state step, residual add) for a
        # float32 residual stream at up to MAX_ROWS rows, float32 and bfloat16 layers (int8 projections too):
        # at batch 1 the ~20 torch calls and casts it replaces cost 2-5 ms of a 130M model's token.
        bind = native_mamba_layer_step() if self.dtype in (torch.float32, torch.bfloat16) else None
        matrices = [_native_matrix(m, self.dtype) for m in (mixer.in_proj, mixer.x_proj, mixer.out_proj)]
        self.layer_step = None
        if bind is not None and None not in matrices and self.dt_weight.dtype == self.dtype:
            in_m, x_m, out_m = matrices
            self.layer_step = bind(self.norm_weight, self.eps, in_m, x_m, self.dt_weight, self.dt_bias, out_m,
                                   self.conv.weight, self.conv.bias, self.A, self.D, self.dtype == torch.bfloat16)

    def __call__(self, r: torch.Tensor, state: MambaState) -> torch.Tensor:
        """r (b, H) residual stream -> (b, H) (dtype: promote(r, the mixer's output))."""
        conv = state.conv
        if (self.layer_step is not None and r.dtype == torch.float32 and r.shape[0] <= MAX_ROWS
                and r.is_contiguous() and conv.dtype == self.dtype and conv.is_contiguous()):
            return self.layer_step(r, state.ssm, conv)
        h = F.rms_norm(r.to(torch.float32), self.norm_weight.shape, self.norm_weight, self.eps)
        x, z = self.in_proj(h.to(self.dtype)).split(self.d_inner, dim=-1)  # (b, I) each
        x = self.conv(x, state.conv)
        dt, B, C = self.x_proj(x).split(self.split, dim=-1)
        if self.selective_step is not None:
            if not self.dt_inside:
                dt = F.linear(dt, self.dt_weight)  # (b, I) before the bias
            y = self.selective_step(state.ssm, *(t.to(torch.float32) for t in (x, dt, B, C, z)))
            return r + self.out_proj(y.to(self.dtype))
        delta = F.softplus(F.linear(dt, self.dt_weight) + self.dt_bias)  # (b, I) float32
        xf = x.to(torch.float32)
        ssm = state.ssm  # (b, I, N) float32
        ssm.mul_(torch.exp(delta.unsqueeze(-1) * self.A))
        ssm.addcmul_((delta * xf).unsqueeze(-1), B.to(torch.float32).unsqueeze(1))
        y = torch.bmm(ssm, C.to(torch.float32).unsqueeze(-1)).squeeze(-1)  # (b, I)
        y = torch.addcmul(y, self.D, xf).mul_(F.silu(z.to(torch.float32)))
        return r + self.out_proj(y.to(self.dtype))


class Mamba2Step:
    """One token of a pre-norm :class:`~ssmkit.layers.Block` around a :class:`Mamba2` mixer (no
    feed-forward): ``r -> r + mixer(norm(r))``, updating a :class:`Mamba2State` in place."""

    def __init__(self, norm: nn.Module, mixer: Mamba2) -> None:
        self.norm_weight, self.eps = _f32(norm.weight), norm.eps
        self.dtype = _weight_dtype(mixer.in_proj)
        self.in_proj, self.out_proj = linear_fn(mixer.in_proj), linear_fn(mixer.out_proj)
        self.conv = _ConvStep(mixer.conv1d)
        h, p, g, n = mixer.nheads, mixer.headdim, mixer.ngroups, mixer.d_state
        self.shape = (h, p, g, n)
        self.split = (mixer.d_inner, mixer.conv_dim, h)
        self.xbc_split = (mixer.d_inner, g * n, g * n)
        self.A = -torch.exp(_f32(mixer.A_log))  # (h,)
        self.dt_bias = _f32(mixer.dt_bias)
        self.dt_limit = None if tuple(mixer.dt_limit) == NO_LIMIT else mixer.dt_limit
        self.D = _f32(mixer.D).view(h, p) if mixer.D_has_hdim else _f32(mixer.D).view(h, 1)
        # Falcon-H1's in_proj multipliers, one per output channel, in the layer's dtype as the layer applies them.
        scale = mixer.in_proj_scale
        self.in_scale = None if scale is None else scale.detach().to(self.dtype)
        self.fused_step = native_ssd_step()
        self.gated_norm = None
        if mixer.rmsnorm:
            norm_g = mixer.norm
            if norm_g.norm_before_gate:
                raise ValueError("Mamba2Step: norm_before_gate=True is not supported (take the layer's step)")
            self.gated_norm = (_f32(norm_g.weight), norm_g.eps, norm_g.group_size)
        # Everything between the convolution and out_proj in one call where the native kernels are built (float32
        # and bfloat16 layers: the kernel rounds the scan's output to bfloat16 before the gated norm as they do).
        native_dtype = self.dtype in (torch.float32, torch.bfloat16)
        bind = native_mamba2_step() if native_dtype else None
        self.mamba2_step = None
        norm_w, eps, group = self.gated_norm if self.gated_norm is not None else (None, 0.0, 1)
        limit = self.dt_limit or (0.0, math.inf)
        if bind is not None:
            self.mamba2_step = bind(self.A, self.dt_bias, self.D, limit, norm_w, group, eps,
                                    norm_w is not None and self.dtype == torch.bfloat16, (h, p, n, g))
        # From in_proj's output to out_proj's input in one call (the convolution too, and no casts between
        # them), where the native kernels are built and no in_proj multipliers apply: at batch 1 the ten-odd
        # torch calls it replaces cost about 1 ms of a 130M model's token in bfloat16.
        bind = native_mamba2_conv_step() if native_dtype and self.in_scale is None else None
        self.mamba2_conv_step = None
        if bind is not None:
            self.mamba2_conv_step = bind(self.conv.weight, self.conv.bias, self.A, self.dt_bias, self.D, limit, norm_w,
                                         group, eps, self.dtype == torch.bfloat16, (h, p, n, g))
            self.in_f32 = _linear_from_f32(mixer.in_proj, torch.float32)
            self.out_f32 = _linear_from_f32(mixer.out_proj, self.dtype)
        # The whole block in one call (the norm, both matmuls and the residual add too) for a float32 residual
        # stream at up to MAX_ROWS rows: at batch 1 no per-op overhead is left beside the weights' and the
        # state's bytes. A bfloat16 residual (residual_in_fp32=False) takes the call above.
        bind = native_mamba2_layer_step() if self.mamba2_conv_step is not None else None
        matrices = [_native_matrix(m, self.dtype) for m in (mixer.in_proj, mixer.out_proj)]
        self.layer_step = None
        if bind is not None and None not in matrices:
            self.layer_step = bind(self.norm_weight, self.eps, *matrices, self.conv.weight, self.conv.bias, self.A,
                                   self.dt_bias, self.D, limit, norm_w, group, eps, self.dtype == torch.bfloat16,
                                   (h, p, n, g))

    def __call__(self, r: torch.Tensor, state: Mamba2State) -> torch.Tensor:
        """r (b, H) residual stream -> (b, H) (dtype: promote(r, the mixer's output))."""
        h_, p, g, n = self.shape
        b = r.shape[0]
        conv = state.conv
        if (self.layer_step is not None and r.dtype == torch.float32 and b <= MAX_ROWS and r.is_contiguous()
                and conv.dtype == self.dtype and conv.is_contiguous()):
            return self.layer_step(r, state.ssm, conv)
        hn = F.rms_norm(r.to(torch.float32), self.norm_weight.shape, self.norm_weight, self.eps)
        if self.mamba2_conv_step is not None and conv.dtype == self.dtype and conv.is_contiguous():
            # hn rounded to the weights' dtype, as the layer's in_proj reads it.
            out = self.mamba2_conv_step(state.ssm, conv, self.in_f32(hn.to(self.dtype).to(torch.float32)))
            return r + self.out_f32(out)
        zxbcdt = self.in_proj(hn.to(self.dtype))
        if self.in_scale is not None:
            zxbcdt = zxbcdt * self.in_scale
        z, xBC, dt = zxbcdt.split(self.split, dim=-1)
        xBC = self.conv(xBC, state.conv)
        if self.mamba2_step is not None:
            out = self.mamba2_step(state.ssm, *(t.to(torch.float32) for t in (xBC, dt, z)))
            return r + self.out_proj(out.to(self.dtype))
        x, B, C = xBC.split(self.xbc_split, dim=-1)
        delta = F.softplus(dt.to(torch.float32) + self.dt_bias)  # (b, h)
        if self.dt_limit is not None:
            delta = delta.clamp(*self.dt_limit)
        xf = x.to(torch.float32).reshape(b, h_, p)
        decay = torch.exp(delta * self.A)  # (b, h)
        Bf, Cf = B.to(torch.float32).reshape(b, g, n), C.to(torch.float32).reshape(b, g, n)
        if self.fused_step is not None:  # one pass over the state
            y = self.fused_step(state.ssm, xf, delta, decay, Bf, Cf)
        else:
            s = state.ssm.mul_(decay.view(b, h_, 1, 1)).view(b, g, h_ // g, p, n)  # (b, h, p, N) float32
            s.addcmul_((delta.unsqueeze(-1) * xf).reshape(b, g, h_ // g, p, 1), Bf.reshape(b, g, 1, 1, n))
            y = torch.matmul(s.view(b * g, -1, n), Cf.reshape(b * g, n, 1)).view(b, h_, p)
        y = torch.addcmul(y, self.D, xf).reshape(b, -1)  # (b, I) float32
        gate = F.silu(z.to(torch.float32))
        if self.gated_norm is None:
            return r + self.out_proj((y * gate).to(self.dtype))
        weight, eps, group = self.gated_norm
        # The scan's output rounded to the weights' dtype, as the layer's, before the gated norm.
        hg = (y.to(self.dtype).to(torch.float32) * gate).reshape(b, -1, group)
        hg = F.rms_norm(hg, (group,), None, eps).view(b, -1) * weight
        return r + self.out_proj(hg.to(self.dtype))


def lean_block_step(block: nn.Module) -> MambaStep | Mamba2Step | None:
    """The lean step of ``block`` (a :class:`~ssmkit.layers.Block`), or None when it has none: a
    feed-forward, another mixer, Mamba's inner norms (Falcon-Mamba, Jamba), a context-parallel Mamba-2,
    norm-before-gate, float64, or parameters off the CPU."""
    mixer = getattr(block, "mixer", None)
    if getattr(block, "ff", None) is not None or not hasattr(block, "norm"):
        return None
    if not isinstance(mixer, (Mamba, Mamba2)) or mixer.A_log.device.type != "cpu":
        return None
    if _weight_dtype(mixer.in_proj) not in LEAN_DTYPES or block.norm.weight.dtype not in LEAN_DTYPES:
        return None
    if isinstance(mixer, Mamba):
        if mixer.inner_layernorms or mixer.mixer_rms_eps is not None:
            return None
        return MambaStep(block.norm, mixer)
    if mixer.context_parallel is not None or (mixer.rmsnorm and mixer.norm.norm_before_gate):
        return None
    return Mamba2Step(block.norm, mixer)


def state_fits(step: MambaStep | Mamba2Step, state: object, batch: int) -> bool:
    """Whether ``state`` is the kind and shape of state ``step`` updates, for ``batch`` rows."""
    if isinstance(step, MambaStep):
        return isinstance(state, MambaState) and state.ssm.shape == (batch, step.d_inner, step.A.shape[1]) \
            and state.ssm.dtype == torch.float32 and state.ssm.is_contiguous() \
            and state.conv.shape[:2] == (batch, step.d_inner) \
            and state.conv.shape[2] == step.conv.weight.shape[1]
    h, p, _, n = step.shape
    return isinstance(state, Mamba2State) and state.ssm.shape == (batch, h, p, n) \
        and state.ssm.dtype == torch.float32 and state.ssm.is_contiguous() \
        and tuple(state.conv.shape) == (batch, *step.conv.weight.shape)
