"""Mamba-3 in a chunked matrix form: the trapezoidal rule as an SSD scan with a modified input.

Derivation (per head; notation of ``reference.py``, δ_t = (1 - λ_t) Δ_t so that β_t = α_t δ_t)::

    H_t = α_t H_{t-1} + α_t δ_t u_{t-1} + γ_t u_t

Define G_t = H_t + δ_{t+1} u_t (δ_{t+1} = 0 after the last position and where the next position starts
a new document). Substituting H_{t-1} = G_{t-1} - δ_t u_{t-1}, the two u_{t-1} terms cancel::

    G_t = α_t G_{t-1} + w_t u_t,       w_t = γ_t + δ_{t+1},      G_{-1} = H_{-1} + δ_0 u_{-1}

an SSD recurrence (one scalar decay per head and step) whose input weight is w instead of Δ; the
shifted term δ_{t+1} is what the trapezoid lends to the next step. Unrolling, with S_t = Σ_{k≤t} Δ_k A_k::

    H_t = Σ_{s<t} e^{S_t - S_s} w_s u_s + γ_t u_t + e^{S_t - S_{-1}} G_{-1}

so inside a chunk y_t = Σ_{s<t} L_ts w_s (C̃_t·B̃_s) x̃_s + γ_t (C̃_t·B̃_t) x̃_t (a strictly causal masked
attention plus a diagonal that uses γ, not w), and chunks pass G at their ends (at the sequence end
G = H, the final state). MIMO replaces (C̃_t·B̃_s) x̃_s by Σ_{r'} (C̃_{t,r}·B̃_{s,r'}) x̃_{s,r'}: the
chunk's positions and ranks are flattened into T·r rows of one matmul, as mamba_ssm's MIMO kernel does.

The rotations are data-dependent but absolute: B̃_s and C̃_t carry e^{iθ_s}, e^{iθ_t}, so C̃_t·B̃_s
holds the relative rotation θ_t - θ_s and no per-pair decay is needed. θ is a cumulative sum inside each
document, taken per chunk and carried between chunks modulo 2π (float32 keeps its precision however long
the sequence). Everything runs in float32 (float64 for float64 inputs); autograd differentiates it.

Long sequences run in blocks of chunks: each block is the computation above with the previous block's
final state as its initial state (exact: that state is the whole recurrence state, and G_{-1} rebuilds
the trapezoid share the block boundary owes), reset to zero where a document starts at the block's first
position. The per-chunk temporaries (rotated B and C, the (T·r)² intra-chunk scores) are then bounded by
the block, not by the length: whole-sequence temporaries pass glibc's 32 MB mmap threshold, and every
allocation above it is freshly mapped and faulted in page by page (Mamba-3 was 6.4× slower for 4× the
length past 32K tokens on a CPU). Autograd runs through the blocks as through the chunks.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ssmkit.ops.chunking import chunk_length
from ssmkit.ops.mamba3.inputs import Mamba3Inputs
from ssmkit.ops.mamba3.reference import (
    TWO_PI,
    Mamba3ScanState,
    Prepared,
    finish,
    mix_input,
    prepare,
    rotate,
)
from ssmkit.ops.ssd.reference import doc_starts

# Elements of the largest per-block temporary (b h T r max(T r, n, p), the intra-chunk scores or the
# rotated B, C): 4 MB in float32, far below glibc's 32 MB mmap threshold, so blocks reuse heap memory.
# 2^19 to 2^21 measured within 10% of each other on a CPU (benchmarks/cpu_mamba3_long.py), 2^23 slower.
_BLOCK_ELEMENTS = 1 << 20
# On a GPU every block costs ~150 kernel launches and there is no mmap threshold: blocks there only
# bound memory (1 GiB per float32 temporary), so training lengths stay one block.
_BLOCK_ELEMENTS_GPU = 1 << 28


def _pad(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad dim 1 (the length) at the end."""
    return t if pad == 0 else F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))


def mamba3_chunked(
    inputs: Mamba3Inputs, block_chunks: int | None = None
) -> tuple[torch.Tensor, Mamba3ScanState]:
    """Chunked Mamba-3; same arguments and results as ``mamba3_reference`` (validated by the caller).

    ``block_chunks``: chunks per block (None: :func:`default_block_chunks`). A sequence of at most one
    block is computed in one piece.
    """
    x, B, chunk_size, seq_idx = inputs.x, inputs.B, inputs.chunk_size, inputs.seq_idx
    initial_state = inputs.initial_state
    b, l, h, p = x.shape
    r, n = B.shape[2], B.shape[4]
    dtype = inputs.compute_dtype()
    chunk_size = chunk_length(chunk_size, l)
    block = (block_chunks or default_block_chunks(b, h, p, r, n, chunk_size, x.device)) * chunk_size
    state = None if initial_state is None else Mamba3ScanState(*(t.to(dtype) for t in initial_state))
    inputs = dataclasses.replace(inputs, chunk_size=chunk_size)
    if l <= block:
        return _block(inputs, state, dtype)

    # split, not slicing in the loop: its backward concatenates the blocks' gradients once.
    along_l = ("x", "dt", "A", "B", "C", "trap", "angles", "z", "seq_idx")
    pieces = [getattr(inputs, k).split(block, dim=1) if getattr(inputs, k) is not None else [None] * -(-l // block)
              for k in along_l]
    starts = doc_starts(seq_idx) if seq_idx is not None else None
    outs = []
    for i, args in enumerate(zip(*pieces)):
        if i > 0 and starts is not None:
            # A document that starts at the block's first position starts from zero, as in the
            # recurrence; where, not a product with 0, so that NaN of the finished one stays there.
            new = starts[:, i * block]
            state = Mamba3ScanState(*(torch.where(new.view(b, *[1] * (t.dim() - 1)), 0.0, t) for t in state))
        out, state = _block(dataclasses.replace(inputs, **dict(zip(along_l, args))), state, dtype)
        outs.append(out)
    return torch.cat(outs, dim=1), state


def default_block_chunks(b: int, h: int, p: int, r: int, n: int, chunk_size: int, device: torch.device) -> int:
    """Chunks per block whose largest temporary, b h T r max(T r, n, p) elements, is at most
    ``_BLOCK_ELEMENTS`` on a CPU (``_BLOCK_ELEMENTS_GPU`` elsewhere); at least one."""
    T = chunk_size
    budget = _BLOCK_ELEMENTS if device.type == "cpu" else _BLOCK_ELEMENTS_GPU
    return max(1, budget // (b * h * T * r * max(T * r, n, p)))


def _block(
    inputs: Mamba3Inputs, init: Mamba3ScanState | None, dtype: torch.dtype
) -> tuple[torch.Tensor, Mamba3ScanState]:
    """One block of positions (``inputs`` sliced to it, ``chunk_size`` the chunk length) from state ``init``
    (in ``dtype``, or None: zero); shapes as the reference's."""
    x, B, chunk_size, D, z, seq_idx = inputs.x, inputs.B, inputs.chunk_size, inputs.D, inputs.z, inputs.seq_idx
    mimo_x, mimo_z, mimo_o, rotary_interleaved = inputs.mimo_x, inputs.mimo_z, inputs.mimo_o, inputs.rotary_interleaved
    b, l, h, p = x.shape
    r, n = B.shape[2], B.shape[4]
    T = chunk_size
    nc = -(-l // T)
    pad = nc * T - l
    prep = prepare(inputs, dtype)

    doc, doc_end, doc_before = _doc_layout(seq_idx, b, l, T, x.device)
    theta, Bt, Ct = rotated_BC(prep, seq_idx, init, rotary_interleaved)
    w = prep.gamma + next_share(prep.delta, seq_idx)  # (b, l, h)

    # Padded steps: no decay (log_a = 0) and no input (w = γ = 0, B̃ = 0), so G passes unchanged.
    cum = torch.cumsum(_pad(prep.log_a, pad).view(b, nc, T, h), dim=2).transpose(2, 3)  # (b, c, h, T)
    wc = _pad(w, pad).view(b, nc, T, h).transpose(2, 3)  # (b, c, h, T)
    gc = _pad(prep.gamma, pad).view(b, nc, T, h).transpose(2, 3)
    # (b, c, h, T·r, ·): the chunk's positions and ranks as the rows of one matmul.
    rows_B = _pad(Bt, pad).view(b, nc, T, r, h, n).permute(0, 1, 4, 2, 3, 5).reshape(b, nc, h, T * r, n)
    rows_C = _pad(Ct, pad).view(b, nc, T, r, h, n).permute(0, 1, 4, 2, 3, 5).reshape(b, nc, h, T * r, n)
    rows_x = _pad(prep.xr, pad).view(b, nc, T, r, h, p).permute(0, 1, 4, 2, 3, 5).reshape(b, nc, h, T * r, p)

    # Intra-chunk weights M[t, s] = e^{S_t - S_s} w_s (s < t, same document), γ_t on the diagonal.
    keep = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    if seq_idx is not None:
        keep = keep & (doc[:, :, None, :, None] == doc[:, :, None, None, :])  # (b, c, 1, T, T)
    seg = (cum[..., :, None] - cum[..., None, :]).masked_fill(~keep, float("-inf"))
    M = torch.exp(seg) * wc[..., None, :]  # (b, c, h, T, T), 0 on the diagonal
    M.diagonal(dim1=-2, dim2=-1).copy_(gc)
    scores = (rows_C @ rows_B.transpose(-1, -2)).view(b, nc, h, T, r, T, r) * M[:, :, :, :, None, :, None]
    y_diag = scores.view(b, nc, h, T * r, T * r) @ rows_x  # (b, c, h, T r, p)

    # What each chunk adds to G at its end: Σ_s e^{S_end - S_s} w_s u_s over the end's document.
    to_end = torch.exp(cum[..., -1:] - cum) * wc
    to_end = torch.where((doc == doc_end[..., None])[:, :, None], to_end, 0.0)  # (b, c, h, T)
    weighted_x = rows_x * to_end.repeat_interleave(r, dim=-1)[..., None]
    chunk_states = weighted_x.transpose(-1, -2) @ rows_B  # (b, c, h, p, n)

    G = x.new_zeros(b, h, p, n, dtype=dtype) if init is None else initial_G(init, prep.xr, prep.delta[:, 0], mimo_x)
    # Inter-chunk recurrence on (b, h, p, n) states; unbind so that backward stacks the gradients.
    chunk_decay = torch.exp(cum[..., -1])[..., None, None].unbind(1)
    continues = (doc_end == doc_before).view(b, nc, 1, 1, 1).unbind(1)
    entering = []
    for k, added in enumerate(chunk_states.unbind(1)):
        entering.append(G)
        # where, not a product with 0: NaN of a finished document must not leak into the next.
        G = torch.where(continues[k], chunk_decay[k] * G, 0.0) + added
    prev = torch.stack(entering, dim=1)  # (b, c, h, p, n)

    y_off = (rows_C @ prev.transpose(-1, -2)) * torch.exp(cum).repeat_interleave(r, dim=-1)[..., None]
    y_off = torch.where((doc == doc_before[..., None]).repeat_interleave(r, dim=-1)[:, :, None, :, None], y_off, 0.0)
    y = (y_diag + y_off).view(b, nc, h, T, r, p).permute(0, 1, 3, 4, 2, 5).reshape(b, nc * T, r, h, p)[:, :l]
    out = finish(y, prep.xr, D, z, mimo_z, mimo_o).to(x.dtype)
    return out, Mamba3ScanState(theta[:, -1], G, Bt[:, -1], x[:, -1].to(dtype))


def next_share(delta: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """δ_{s+1} per position (b, l, h) from δ (b, l, h): the next position's trapezoid share, 0 where the next
    position starts a document or does not exist (w_s = γ_s + δ_{s+1})."""
    nxt = F.pad(delta[:, 1:], (0, 0, 0, 1))
    if seq_idx is not None:
        nxt = torch.where(F.pad(doc_starts(seq_idx)[:, 1:], (0, 1))[..., None], 0.0, nxt)
    return nxt


def initial_G(init: Mamba3ScanState, xr: torch.Tensor, delta0: torch.Tensor, mimo_x: torch.Tensor | None
              ) -> torch.Tensor:
    """G_{-1} = H_{-1} + δ_0 u_{-1} (b, h, p, n): the carried state plus the first step's trapezoid share of
    the carried (B̃, x); xr (b, l, r, h, p) is :class:`Prepared`'s x̃ (for its rank), delta0 (b, h) is δ_0."""
    r = xr.shape[2]
    mx = None if mimo_x is None else mimo_x.to(xr.dtype).transpose(0, 1)
    x_prev = init.last_x[:, None] * mx if mx is not None else init.last_x[:, None].expand(-1, r, -1, -1)
    return init.ssm + delta0[:, :, None, None].to(init.ssm.dtype) * mix_input(x_prev.to(init.ssm.dtype), init.last_B)


def rotated_BC(prep: Prepared, seq_idx: torch.Tensor | None, init: Mamba3ScanState | None,
               interleaved: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """θ (b, l, h, a) and B̃, C̃ (b, l, r, h, n): B and C rotated by the absolute angle of their position."""
    theta = rotary_angles(prep.dtheta, seq_idx, None if init is None else init.angle)
    return theta, rotate(prep.Bh, theta[:, :, None], interleaved), rotate(prep.Ch, theta[:, :, None], interleaved)


def rotary_angles(dtheta: torch.Tensor, seq_idx: torch.Tensor | None, initial: torch.Tensor | None) -> torch.Tensor:
    """θ (b, l, h, a) from dtheta (b, l, h, a): summed within each document (from ``initial`` (b, h, a) in
    the first), modulo 2π, in dtheta's dtype.

    One cumulative sum in float64 (its rounding, ~1e-16 of the sum, stays far below float32's resolution
    of an angle after millions of steps) with each document's start subtracted: no loop over chunks. A
    non-finite step is left out of the sum and counted instead, so that it makes θ NaN from its position
    to the end of its document, as in the recurrence, and not in the documents after it.
    """
    l = dtheta.shape[1]
    d = dtheta.double()
    bad = ~torch.isfinite(d)
    d = torch.where(bad, 0.0, d)
    total, n_bad = torch.cumsum(d, dim=1), torch.cumsum(bad, dim=1)
    first_doc = None
    if seq_idx is not None:
        pos = torch.arange(l, device=dtheta.device)
        start_at = torch.cummax(torch.where(doc_starts(seq_idx), pos, 0), dim=1).values  # (b, l)
        at = start_at[..., None, None].expand_as(total)
        total = total - (total - d).gather(1, at)
        n_bad = n_bad - (n_bad - bad.long()).gather(1, at)
        first_doc = (start_at == 0)[..., None, None]
    if initial is not None:
        with_initial = total + initial.double()[:, None]
        total = with_initial if first_doc is None else torch.where(first_doc, with_initial, total)
    total = torch.where(n_bad > 0, float("nan"), total)
    return torch.remainder(total, TWO_PI).to(dtheta.dtype)


def _doc_layout(seq_idx: torch.Tensor | None, b: int, l: int, T: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per chunk of T: the document number (b, c, T) of each position (0, 1, ...; padding joins the last
    document), and the document at each chunk's end and before it (b, c)."""
    nc = -(-l // T)
    pad = nc * T - l
    starts = doc_starts(seq_idx) if seq_idx is not None else torch.zeros(b, l, dtype=torch.bool, device=device)
    doc = torch.cumsum(starts, dim=1)
    doc = torch.cat([doc, doc[:, -1:].expand(b, pad)], dim=1).view(b, nc, T)
    doc_end = doc[:, :, -1]
    doc_before = torch.cat([torch.zeros_like(doc_end[:, :1]), doc_end[:, :-1]], dim=1)
    return doc, doc_end, doc_before
