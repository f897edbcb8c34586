"""Activation recomputation shared by the fused layer functions: keep what is expensive, drop what is cheap.

A fused function is split into stages ``tail(prep(inputs), inputs)``. ``prep`` is cheap and elementwise-ish
(the short convolution, the small projections to Δ, B, C, a split into contiguous pieces, a norm); ``tail``
is the expensive part (the scan, an output projection). Everything the tail saves for its backward is kept
(the scan's own chunk checkpoints: recomputing them would mean running the scan twice) *except* the
storage of the prep outputs, which is released after the forward and refilled in the backward by running
``prep`` again. That is mamba_ssm's ``mamba_inner_fn`` / ``mamba_split_conv1d_scan_combined`` scheme
(its backward recomputes the convolution output and Δ, never the scan's states), written once for every
backend: the tail's ops keep their own backward (Triton's hand-written kernels, the chunked backends'
autograd), so the fused functions are exact compositions of the tested ops.

How the storage is released: the tail reads detached copies of the prep outputs that share their memory;
after the forward that memory is resized to zero (the ops' saved tensors still point at it), and before
the backward it is resized back and filled from the recomputed prep outputs (same ops, same shapes, hence
the same layout). Storage shared with an input (a prep output that is a view of an input) is never
released. Under saved-tensors hooks other than a plain counting one (activation checkpointing, offloading)
the plain composition runs instead: every intermediate then goes through the hooks (the context of a
recomputing function would keep the prep outputs and the inputs alive beside them, so checkpointing or
offloading would save nothing on these layers). Under torch.compile the recomputing function runs as one
graph break (:func:`_releasing`). The function is first-order only (like the Triton
backends' backward); a second backward through a retained graph recomputes both stages.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence

import torch

Tensors = tuple[torch.Tensor, ...]


def _as_tuple(value: torch.Tensor | Sequence[torch.Tensor]) -> Tensors:
    return (value,) if isinstance(value, torch.Tensor) else tuple(value)


def _leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    """A graph-free alias of an input, with its requires_grad (detach shares memory and version counter)."""
    if t is None or not t.is_floating_point():
        return t
    return t.detach().requires_grad_(t.requires_grad)


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


_AUTOCAST_DEVICES = ("cuda", "cpu")
KEEPS_SAVED_TENSORS = "_ssmkit_keeps_saved_tensors"
"""Attribute of a saved-tensors pack hook that stores the very tensor it is given (so a storage released after
the forward is seen released): under such hooks, or none, the fused functions release their intermediates."""


def _may_release() -> bool:
    """Whether the tail's saved intermediates may be released now. Not under other saved-tensors hooks: they
    may keep a placeholder that is filled later by a recomputation of this forward (activation checkpointing
    does), and that recomputation would release its own copies before the backward reads them; or they move
    what they are given elsewhere (offloading), which the recomputing function's context would defeat. The
    plain composition runs then."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return top is None or getattr(top[0], KEEPS_SAVED_TENSORS, False)


def _autocast_state() -> tuple[tuple[str, bool, torch.dtype], ...]:
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES)


def _autocast(state: tuple[tuple[str, bool, torch.dtype], ...]) -> contextlib.ExitStack:
    """The forward's autocast settings again: the backward runs without them, and the recomputation must
    give the forward's dtypes (as torch.utils.checkpoint restores them)."""
    stack = contextlib.ExitStack()
    for device, enabled, dtype in state:
        stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
    return stack


class _Recomputed(torch.autograd.Function):
    """``tail(prep(*tensors), *tensors)`` with prep's outputs released after the forward, recomputed in the
    backward."""

    @staticmethod
    def forward(ctx, prep: Callable[..., object], tail: Callable[..., object], *tensors: torch.Tensor | None):
        leaves = tuple(_leaf(t) for t in tensors)
        with torch.enable_grad():
            kept = _as_tuple(prep(*leaves))
            kept_leaves = tuple(k.detach().requires_grad_(k.requires_grad) for k in kept)
            outs = _as_tuple(tail(kept_leaves, *leaves))
        del kept  # prep's graph goes; its outputs' memory lives on in kept_leaves until released below
        inputs = {_storage_key(t) for t in tensors if isinstance(t, torch.Tensor)}
        released: dict[tuple[str, int], tuple[int, torch.UntypedStorage, int]] = {}
        for i, k in enumerate(kept_leaves):
            key = _storage_key(k)
            if key not in inputs and key not in released:
                released[key] = (i, k.untyped_storage(), k.untyped_storage().nbytes())
        if any(_storage_key(o) in released for o in outs):
            raise RuntimeError("fused function: an output of the tail stage aliases a recomputed intermediate")
        ctx.save_for_backward(*tensors)
        ctx.autocast = _autocast_state()
        ctx.prep, ctx.tail, ctx.leaves, ctx.kept_leaves, ctx.outs = prep, tail, leaves, kept_leaves, outs
        ctx.released = list(released.values())
        for _, storage, _ in ctx.released:
            storage.resize_(0)
        result = tuple(o.detach() for o in outs)
        return result[0] if len(result) == 1 else result

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor | None):
        tensors = ctx.saved_tensors  # raises if an input was modified in place, or freed by an earlier backward
        if ctx.outs is None:
            return (None, None, *_backward_again(ctx, tensors, grads))
        with torch.enable_grad(), _autocast(ctx.autocast):
            kept = _as_tuple(ctx.prep(*ctx.leaves))
        for i, storage, nbytes in ctx.released:
            fresh = kept[i].untyped_storage()
            if fresh.nbytes() != nbytes:
                raise RuntimeError("fused function: the recomputed intermediates differ in size from the forward's")
            storage.resize_(nbytes)
            storage.copy_(fresh)
        pairs = [(o, g) for o, g in zip(ctx.outs, grads) if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        pairs = [(k, kl.grad) for k, kl in zip(kept, ctx.kept_leaves) if kl.grad is not None and k.requires_grad]
        if pairs:
            torch.autograd.backward([k for k, _ in pairs], [g for _, g in pairs])
        result = tuple(None if t is None or not t.requires_grad else t.grad for t in ctx.leaves)
        # The forward's inner graph is spent (its buffers freed): a caller holding the loss keeps nothing of
        # it alive. A second backward (retain_graph=True) recomputes both stages from the saved inputs.
        ctx.leaves = ctx.kept_leaves = ctx.outs = ctx.released = None
        return (None, None, *result)


def _backward_again(ctx, tensors: Sequence[torch.Tensor | None],
                    grads: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor | None, ...]:
    """A later backward through a retained graph: ``tail(prep(inputs), inputs)`` run again in full (as
    reentrant activation checkpointing does), then differentiated."""
    leaves = tuple(_leaf(t) for t in tensors)
    with torch.enable_grad(), _autocast(ctx.autocast):
        outs = _as_tuple(ctx.tail(_as_tuple(ctx.prep(*leaves)), *leaves))
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return tuple(None if t is None or not t.requires_grad else t.grad for t in leaves)


def recomputed(prep: Callable[..., object], tail: Callable[..., object],
               tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | Tensors:
    """``tail(prep(*tensors), *tensors)``; when a gradient is needed, prep's outputs are not kept for the
    backward but recomputed there (see the module docstring).

    prep: ``(*tensors) -> tensor or tuple`` (the cheap stage); tail: ``(prep_outputs_tuple, *tensors) ->
    tensor or tuple``. Both must be deterministic functions of their arguments (no state read from
    elsewhere: parameters come in ``tensors``, so that their gradients flow through this function).
    Returns the tail's output(s), differentiable in every floating tensor of ``tensors``.
    """
    tensors = tuple(tensors)
    needs_grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
    if not needs_grad:
        return _composed(prep, tail, tensors)
    return _releasing(prep, tail, tensors)


def _composed(prep: Callable[..., object], tail: Callable[..., object],
              tensors: tuple[torch.Tensor | None, ...]) -> torch.Tensor | Tensors:
    outs = _as_tuple(tail(_as_tuple(prep(*tensors)), *tensors))
    return outs[0] if len(outs) == 1 else outs


def _releasing(prep: Callable[..., object], tail: Callable[..., object],
               tensors: tuple[torch.Tensor | None, ...]) -> torch.Tensor | Tensors:
    """The recomputing function; under torch.compile it runs as is, one graph break per call: Dynamo cannot
    trace the storage release and the saved-tensors-hook query, and tracing the stages' frames one by one
    recompiled them per call site (dozens of graphs and the recompile limit for a few layers)."""
    if torch.compiler.is_compiling():
        return _uncompiled()(prep, tail, tensors)
    return _releasing_eagerly(prep, tail, tensors)


def _releasing_eagerly(prep: Callable[..., object], tail: Callable[..., object],
                       tensors: tuple[torch.Tensor | None, ...]) -> torch.Tensor | Tensors:
    if not _may_release():
        return _composed(prep, tail, tensors)
    return _Recomputed.apply(prep, tail, *tensors)


@functools.cache
def _uncompiled() -> Callable[..., torch.Tensor | Tensors]:
    """``_releasing_eagerly`` hidden from Dynamo. Made on first use under torch.compile, not at import:
    ``torch.compiler.disable`` imports Dynamo, which imports triton, and importing ssmkit must import neither
    (Triton's interpreter must be chosen before triton is imported)."""
    return torch.compiler.disable(_releasing_eagerly)
