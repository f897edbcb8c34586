"""Mamba-1's selective scan on CPU without gradients, through the native kernel (:mod:`ssmkit.ops.native`,
``scan.c``): prefill and evaluation.

The chunked form (:mod:`ssmkit.ops.selective_scan.chunked`) walks time with one small torch update per step,
about half of mamba-130m's whole forward at L 2048 on a CPU; the kernel keeps 16 channels' states in vector
registers and walks time once. Same recurrence, float32 arithmetic; it agrees with the chunked form to float32
rounding (exp to about 1 ulp).

Dimensions: ``b`` batch, ``d`` channels, ``l`` length, ``n`` state, ``g`` groups of B and C.
"""

from __future__ import annotations

import torch

from ssmkit.ops import native
from ssmkit.ops.selective_scan.inputs import ScanInputs
from ssmkit.ops.ssd.reference import doc_starts


def applies(inputs: ScanInputs) -> bool:
    """Whether :func:`selective_scan_native` takes these inputs: CPU tensors, none float64 or needing a gradient
    (the kernel has no backward), and a native library built with AVX-512 (elsewhere torch's form is faster than
    scalar loops)."""
    tensors = [t for t in inputs.unpack() if isinstance(t, torch.Tensor)]
    if any(t.device.type != "cpu" or t.dtype == torch.float64 for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    lib = native.library()
    return lib is not None and bool(lib.ssmkit_selective_scan_vectorized())


def selective_scan_native(inputs: ScanInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (b, d, l) in u's dtype, last_state (b, d, n) float32)``, as the chunked backend returns them (out
    time-major when u is, else contiguous). Call only where :func:`applies`."""
    u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, seq_idx = inputs.unpack()
    b, d, l = u.shape
    g, n = B.shape[1], B.shape[2]

    def time_major(t: torch.Tensor) -> torch.Tensor:
        """(b, l, d) float32 with strides (l·d, d, 1): a Mamba layer's u is that already (no copy)."""
        t = t.transpose(1, 2).float()
        return t if t.stride() == (l * d, d, 1) else t.contiguous()

    u_t, delta_t = time_major(u), time_major(delta)
    z_t = None if z is None else time_major(z)
    out = torch.empty(b, l, d, dtype=torch.float32)
    state = torch.zeros(b, d, n) if initial_state is None else initial_state.float().contiguous().clone()
    A_t = A.float().t().contiguous()
    B_t, C_t = (v.float().transpose(2, 3).contiguous() for v in (B, C))  # (b, g, l, n)
    D_f = None if D is None else D.float().contiguous()
    bias = None if delta_bias is None else delta_bias.float().contiguous()
    starts = None if seq_idx is None else doc_starts(seq_idx).to(torch.uint8).contiguous()

    def ptr(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    done = native.library().ssmkit_selective_scan(
        ptr(u_t), ptr(delta_t), ptr(z_t), ptr(out), l * d, d, ptr(A_t), ptr(B_t), ptr(C_t),
        ptr(D_f), ptr(bias), ptr(starts), ptr(state), b, l, d, n, g, int(softplus), torch.get_num_threads(),
    )
    if not done:
        raise RuntimeError("the native selective scan was called where it does not apply")
    out = out.transpose(1, 2).to(u.dtype)
    # The chunked backend's layout: time-major for a time-major u, else contiguous.
    return (out if u.stride(1) == 1 else out.contiguous()), state
