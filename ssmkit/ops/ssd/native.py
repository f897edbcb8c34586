"""The SSD's intra-chunk scores on CPU in one pass, through the native kernel (:mod:`ssmkit.ops.native`).

The chunked forward (:mod:`ssmkit.ops.ssd.chunked`) builds, per chunk and head, the (T, T) matrix
``L ⊙ (C Bᵀ)`` of decay factors times scores: with torch's ops that is a difference, a clamp, an exp, a
threshold and a product, five passes over a (heads, T, T) block that outgrows the caches at T = 256 (a
quarter of the chunked SSD's time at mamba2-130m's shapes on one thread). The kernel computes the same
entries in one pass and only the lower triangle's exps.

Dimensions: ``k`` batch × chunks, ``h`` heads, ``g`` groups, ``T`` chunk length.
"""

from __future__ import annotations

import torch

from ssmkit.ops import native


def native_scores(cum: torch.Tensor, cb: torch.Tensor, log_floor: float) -> torch.Tensor | None:
    """``exp(cum_t - cum_s) · cb[t, s]`` for s <= t (0 above the diagonal), the decay factor 0 at or below
    ``2 · exp(log_floor)`` (after clamping its argument at ``log_floor``): (k, h, T, T) float32, or None where
    the native kernels are not built or the inputs are not float32 CPU tensors.

    cum: (k, h, T) the cumulative Δ·A inside each chunk; cb: (k, g, T, T) C Bᵀ per group, g dividing h.
    The entries equal :func:`ssmkit.ops.ssd.chunked._decay` times ``cb`` up to exp's rounding (about 1 ulp);
    a NaN difference stays NaN (entries above the diagonal are 0 whatever the inputs).
    """
    if cum.dtype != torch.float32 or cb.dtype != torch.float32 or cum.device.type != "cpu" or cb.device.type != "cpu":
        return None
    lib = native.library()
    if lib is None:
        return None
    k, h, T = cum.shape
    cum, cb = cum.contiguous(), cb.contiguous()
    scores = torch.empty(k, h, T, T, dtype=torch.float32)
    lib.ssmkit_ssd_scores(cum.data_ptr(), cb.data_ptr(), scores.data_ptr(), k, h, cb.shape[1], T, log_floor,
                          torch.get_num_threads())
    return scores
