"""The Mamba-2 decode step in one pass over the state, through the native kernel (:mod:`ssmkit.ops.native`).

The vectorised torch step (``reference.py``) decays the state, adds the input and reads it out in three
passes; at batch 1 on a CPU, with a 130M model's states (~19 MB) beyond the caches, those passes cost
as much as a third of the int8 weights' traffic. This is the same step for the Mamba-2 form with a
scalar decay per head, float32 state, no z (the layer applies D and the gate), one pass.

Dimensions: ``b`` batch, ``h`` heads, ``p`` head dim, ``n`` state size, ``g`` groups of B/C.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ssmkit.ops import native

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def native_ssd_step() -> Step | None:
    """``(state, x, delta, decay, B, C) -> y``, or None where the native kernels are not built.

    ``state ← state · decay[..., None, None] + (delta · x)[..., None] ⊗ B[group]``, in place, and
    ``y = state · C[group]``. state: (b, h, p, n) float32, contiguous (a layer's cache); x: (b, h, p);
    delta, decay: (b, h) (Δ after bias, softplus and limits; exp(Δ A)); B, C: (b, g, n), g dividing h;
    all float32 on the CPU. Returns y (b, h, p) float32. Nothing is checked per call: for a decode
    loop whose caller checked the shapes once (the lean step, :mod:`ssmkit.layers.lean_step`).
    """
    lib = native.library()
    if lib is None:
        return None
    fn = lib.ssmkit_ssd_step

    def step(state: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, decay: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor) -> torch.Tensor:
        b, h, p, n = state.shape
        x, delta, decay, B, C = (t.contiguous() for t in (x, delta, decay, B, C))
        y = torch.empty(b, h, p, dtype=torch.float32)
        fn(state.data_ptr(), x.data_ptr(), delta.data_ptr(), decay.data_ptr(), B.data_ptr(), C.data_ptr(),
           y.data_ptr(), b, h, p, n, B.shape[1], torch.get_num_threads())
        return y
    return step
