"""Triton forward kernels of the chunked SSD (Dao & Gu 2024, "Transformers are SSMs", section 6).

Four launches per call (three with CHAIN), each a stage of ``ssd/chunked.py``'s algorithm (read its
docstring first):
    _chunk_cb_fwd     per (chunk, group): the causal tiles of C Bᵀ, kept for the scan and the backward
    _chunk_state_fwd  per (chunk, head): Δ, cum = cumsum(Δ A) and S_c = Σ_s exp(cum_last - cum_s) Δ_s x_s ⊗ B_s
    _state_pass_fwd   per (head, block of the p·n state): S'_c = exp(cum_last) S'_{c-1} + S_c, sequential over
                      chunks in float32; the state entering each chunk is stored in ``prev`` (the
                      inputs' dtype for bf16/fp16, else float32). With CHAIN the chunk-state kernel does
                      this itself: having summed S_c it waits for chunk c - 1's S'_{c-1} (a flag per chunk,
                      float32 states in a ring of two per head, in L2), stores it as the state entering
                      chunk c, and passes S'_c on: no S_c round trip through memory, one launch less
    _chunk_scan_fwd   per (block of rows of a chunk, head): y = ((C Bᵀ) ⊙ L)(Δx) + exp(cum_t) C_t S'_{c-1},
                      then (y + D x) · silu(z)

Layouts (all contiguous; Lp = chunks · T, the length padded to whole chunks):
    x, z, out (b, l, h, p); dt (b, l, h); B, C (b, l, g, n); D (h, p) float32
    delta, cum (b, h, Lp) float32; doc (b, Lp) int32 (document number, padding joins the last one)
    ("delta" is x's weight in the update: Δ, or ``input_scale`` when given, SEP_SCALE; cum is always
    built from Δ)
    states (b, chunks, h, p, n) float32 (chunk sums S_c); prev (b, chunks, h, p, n) the states entering the
    chunks, float32 or the inputs' bf16/fp16; cb (b, chunks, g, T, T) float32
Padded positions have Δ = 0 and x = 0: they add nothing and do not decay the state.
Lengths and chunk counts are not specialized on (one compile serves every length). Matmul operands
are cast to ``DOT`` (the input dtype for bf16/fp16, float32 with IEEE precision
otherwise); every accumulation is float32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _step_size(v, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, lo, hi):
    """Δ from ``dt + dt_bias`` (float32): softplus with PyTorch's threshold of 20, then the clamp."""
    if SOFTPLUS:
        v = tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))))
    if HAS_LIMIT:
        v = tl.minimum(tl.maximum(v, lo), hi)
    return v


@triton.jit
def _doc_before(doc_ptr, b, c, T: tl.constexpr, Lp):
    """Document of the position before chunk c (0 for the first chunk: documents are numbered from 0)."""
    prev = tl.load(doc_ptr + b * Lp + tl.maximum(c * T - 1, 0))
    return tl.where(c == 0, 0, prev)


@triton.jit
def _wait_flag(flag_ptr):
    """Spin until another program raised the flag (acquire: its stores are visible after this)."""
    while tl.atomic_add(flag_ptr, 0, sem="acquire") == 0:
        pass


@triton.jit
def _raise_flag(flag_ptr, FENCE: tl.constexpr):
    """Publish every thread's stores, then raise the flag: each thread fences at GPU scope (FENCE: off in
    Triton's interpreter, which runs programs one after another), the barrier waits for all of them, and
    one release sets the flag."""
    one = 1
    if FENCE:
        one += tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                         is_pure=False, pack=1)
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr, one, sem="release")


@triton.jit
def _x_and_B(x_ptr, B_ptr, b, t, hh, gg, rp, rn, L, H, G, P: tl.constexpr, N: tl.constexpr):
    """x (BK, BP) in float32 and B (BK, BN) as stored, at positions t of head hh / group gg (0 past L)."""
    xs = tl.load(x_ptr + ((b * L + t[:, None]) * H + hh) * P + rp[None, :],
                 mask=(t[:, None] < L) & (rp[None, :] < P), other=0.0).to(tl.float32)
    Bs = tl.load(B_ptr + ((b * L + t[:, None]) * G + gg) * N + rn[None, :],
                 mask=(t[:, None] < L) & (rn[None, :] < N), other=0.0)
    return xs, Bs


@triton.jit(do_not_specialize=["L", "nc"])
def _chunk_state_fwd(
    x_ptr, dt_ptr, A_ptr, bias_ptr, B_ptr, doc_ptr, delta_ptr, cum_ptr, states_ptr, scale_ptr,
    sync_ptr, ring_ptr, init_ptr, final_ptr, prev_ptr,
    L, H, G, P: tl.constexpr, N: tl.constexpr, nc, lo, hi,
    T: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_DOC: tl.constexpr,
    SEP_SCALE: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, CHAIN: tl.constexpr, HAS_INIT: tl.constexpr,
    FENCE: tl.constexpr, ONLINE: tl.constexpr,
):
    if CHAIN:
        # Chunks in the order the programs started (a ticket, not the program id), heads fastest: the
        # program of chunk c - 1 of a head has started before this one, so waiting for it cannot deadlock.
        ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed").to(tl.int64)
        c = ticket // tl.num_programs(1)
        bh = ticket % tl.num_programs(1)
    else:
        c = tl.program_id(0).to(tl.int64)
        bh = tl.program_id(1).to(tl.int64)
    b, hh = bh // H, bh % H
    gg = hh // (H // G)
    Lp = nc * T
    A = tl.load(A_ptr + hh).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + hh).to(tl.float32)

    if HAS_DOC:
        doc_last = tl.load(doc_ptr + b * Lp + c * T + T - 1)
    rp = tl.arange(0, BP)
    rn = tl.arange(0, BN)
    acc = tl.zeros((BP, BN), dtype=tl.float32)
    if ONLINE:
        # One pass: Δ, cum and S together. S is kept relative to the running sum at the end of the blocks
        # read so far and rescaled by each new block's decay exp(run_new - run), so nothing is read back.
        run = 0.0
        is_last = tl.arange(0, BK) == BK - 1
        for k in range(0, T, BK):
            t = c * T + k + tl.arange(0, BK)
            v = tl.load(dt_ptr + (b * L + t) * H + hh, mask=t < L, other=0.0).to(tl.float32) + bias
            d = tl.where(t < L, _step_size(v, SOFTPLUS, HAS_LIMIT, lo, hi), 0.0)
            w_in = d
            if SEP_SCALE:
                w_in = tl.load(scale_ptr + (b * L + t) * H + hh, mask=t < L, other=0.0).to(tl.float32)
            tl.store(delta_ptr + bh * Lp + t, w_in)
            cum_s = tl.cumsum(d * A, 0) + run
            tl.store(cum_ptr + bh * Lp + t, cum_s)
            # The block's last cum as stored (not a separate sum): the chain and the backward read that one.
            run_new = tl.sum(tl.where(is_last, cum_s, 0.0), 0)
            w = tl.exp(run_new - cum_s) * w_in
            if HAS_DOC:
                w = tl.where(tl.load(doc_ptr + b * Lp + t) == doc_last, w, 0.0)
            xs, Bs = _x_and_B(x_ptr, B_ptr, b, t, hh, gg, rp, rn, L, H, G, P, N)
            xw = (xs * w[:, None]).to(DOT)
            acc = acc * tl.exp(run_new - run) + tl.dot(tl.trans(xw), Bs.to(DOT), input_precision=PREC)
            run = run_new
        cum_last = run
    else:
        # Pass 1: Δ and its running sum over the chunk, kept in global buffers for the later kernels.
        run = 0.0
        for k in tl.static_range(0, T, BK):
            t = c * T + k + tl.arange(0, BK)
            v = tl.load(dt_ptr + (b * L + t) * H + hh, mask=t < L, other=0.0).to(tl.float32) + bias
            d = tl.where(t < L, _step_size(v, SOFTPLUS, HAS_LIMIT, lo, hi), 0.0)
            if SEP_SCALE:
                # The buffer is x's weight in the update for every later kernel: input_scale, not Δ.
                w_in = tl.load(scale_ptr + (b * L + t) * H + hh, mask=t < L, other=0.0).to(tl.float32)
                tl.store(delta_ptr + bh * Lp + t, w_in)
            else:
                tl.store(delta_ptr + bh * Lp + t, d)
            tl.store(cum_ptr + bh * Lp + t, tl.cumsum(d * A, 0) + run)
            run += tl.sum(d * A, 0)
        # Make this program's stores visible to all its threads before they are read back.
        tl.debug_barrier()

        # Pass 2: S = Σ_s w_s (Δ_s x_s) ⊗ B_s with w_s = exp(cum_last - cum_s), 0 outside the last document.
        cum_last = tl.load(cum_ptr + bh * Lp + c * T + T - 1)
        for k in range(0, T, BK):
            t = c * T + k + tl.arange(0, BK)
            w = tl.exp(cum_last - tl.load(cum_ptr + bh * Lp + t)) * tl.load(delta_ptr + bh * Lp + t)
            if HAS_DOC:
                w = tl.where(tl.load(doc_ptr + b * Lp + t) == doc_last, w, 0.0)
            xs, Bs = _x_and_B(x_ptr, B_ptr, b, t, hh, gg, rp, rn, L, H, G, P, N)
            xw = (xs * w[:, None]).to(DOT)
            acc += tl.dot(tl.trans(xw), Bs.to(DOT), input_precision=PREC)
    pn = rp[:, None] * N + rn[None, :]
    pn_mask = (rp[:, None] < P) & (rn[None, :] < N)
    if CHAIN:
        # State passing, fused: wait for the state after chunk c - 1 (float32, in a ring of two slots per
        # head: chunk c + 1 overwrites slot c - 1 only after it has seen chunk c's flag, which chunk c
        # raises only after reading slot c - 1), store it as the state entering chunk c, pass on
        # S'_c = exp(cum_last) S'_{c-1} + S_c and raise this chunk's flag.
        flags = sync_ptr + 1 + bh * nc
        if c == 0:
            if HAS_INIT:
                state = tl.load(init_ptr + bh * P * N + pn, mask=pn_mask, other=0.0).to(tl.float32)
            else:
                state = tl.zeros((BP, BN), dtype=tl.float32)
        else:
            _wait_flag(flags + c - 1)
            state = tl.load(ring_ptr + (bh * 2 + (c - 1) % 2) * P * N + pn, mask=pn_mask, other=0.0,
                            cache_modifier=".cg")
        tl.store(prev_ptr + ((b * nc + c) * H + hh) * P * N + pn, state, mask=pn_mask)
        passed = tl.exp(cum_last) * state
        if HAS_DOC:
            # where, not a product with 0: NaN of a finished document must not leak into the next.
            passed = tl.where(doc_last == _doc_before(doc_ptr, b, c, T, Lp), passed, 0.0)
        state = passed + acc
        if c == nc - 1:
            tl.store(final_ptr + bh * P * N + pn, state, mask=pn_mask)
        else:
            tl.store(ring_ptr + (bh * 2 + c % 2) * P * N + pn, state, mask=pn_mask)
            _raise_flag(flags + c, FENCE)
    else:
        tl.store(states_ptr + ((b * nc + c) * H + hh) * P * N + pn, acc, mask=pn_mask)


@triton.jit(do_not_specialize=["nc"])
def _state_pass_fwd(
    states_ptr, init_ptr, final_ptr, cum_ptr, doc_ptr, prev_ptr,
    H, PN, nc,
    T: tl.constexpr, BLOCK: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DOC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b, hh = bh // H, bh % H
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    Lp = nc * T
    if HAS_INIT:
        state = tl.load(init_ptr + bh * PN + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(nc):
        at = ((b * nc + c) * H + hh) * PN + offs
        added = tl.load(states_ptr + at, mask=mask, other=0.0)
        # Summed in float32; stored in prev's dtype (the inputs' for bf16/fp16: the scan multiplies it in
        # that dtype anyway, and half the bytes go through memory).
        tl.store(prev_ptr + at, state, mask=mask)
        passed = tl.exp(tl.load(cum_ptr + bh * Lp + c * T + T - 1)) * state
        if HAS_DOC:
            # where, not a product with 0: NaN of a finished document must not leak into the next.
            carry = tl.load(doc_ptr + b * Lp + c * T + T - 1) == _doc_before(doc_ptr, b, c, T, Lp)
            passed = tl.where(carry, passed, 0.0)
        state = passed + added
    tl.store(final_ptr + bh * PN + offs, state, mask=mask)


@triton.jit(do_not_specialize=["L", "nc"])
def _chunk_cb_fwd(
    B_ptr, C_ptr, cb_ptr,
    L, G, N: tl.constexpr, nc,
    T: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    """C Bᵀ per (chunk, group), the causal (row block >= column block) tiles only: shared by the heads
    of a group, so the n-long dot products are done once per group, not once per head."""
    pid = tl.program_id(0).to(tl.int64)
    nrb = T // BM
    c, m, k = pid // (nrb * nrb), pid // nrb % nrb, pid % nrb
    bg = tl.program_id(1).to(tl.int64)
    b, gg = bg // G, bg % G
    if k <= m:
        rn = tl.arange(0, BN)
        t = c * T + m * BM + tl.arange(0, BM)
        s = c * T + k * BM + tl.arange(0, BM)
        Ct = tl.load(C_ptr + ((b * L + t[:, None]) * G + gg) * N + rn[None, :],
                     mask=(t[:, None] < L) & (rn[None, :] < N), other=0.0).to(DOT)
        Bs = tl.load(B_ptr + ((b * L + s[:, None]) * G + gg) * N + rn[None, :],
                     mask=(s[:, None] < L) & (rn[None, :] < N), other=0.0).to(DOT)
        cb = tl.dot(Ct, tl.trans(Bs), input_precision=PREC)
        tl.store(cb_ptr + _cb_offsets(b, c, gg, G, nc, t - c * T, s - c * T, T), cb)


@triton.jit
def _cb_offsets(b, c, gg, G, nc, rows, cols, T: tl.constexpr):
    """Offsets of a tile of the (b, chunks, g, T, T) C Bᵀ buffer; rows, cols are positions in the chunk."""
    return ((b * nc + c) * G + gg) * T * T + rows[:, None] * T + cols[None, :]


@triton.jit
def _scan_entering(prev_ptr, cum_c, Ct, first, b, c, hh, H, nc, r, rp, rn, P: tl.constexpr, N: tl.constexpr,
                   DOT: tl.constexpr, PREC: tl.constexpr):
    """Rows r of head hh from what earlier chunks pass on: exp(cum_t) C_t S'_{c-1} where ``first`` (the rows
    of the document entering the chunk), else 0. Returns that (BM, BP) float32 tile and cum_t."""
    cum_t = tl.load(cum_c + r)
    prev = tl.load(prev_ptr + ((b * nc + c) * H + hh).to(tl.int64) * P * N + rp[:, None] * N + rn[None, :],
                   mask=(rp[:, None] < P) & (rn[None, :] < N), other=0.0)
    off = tl.dot(Ct, tl.trans(prev.to(DOT)), input_precision=PREC)
    return tl.where(first[:, None], off * tl.exp(cum_t)[:, None], 0.0), cum_t


@triton.jit
def _scan_block(acc, cb, keep, x_c, cum_c, delta_c, cum_t, q, in_seq, rp, H, P: tl.constexpr, DOT: tl.constexpr,
                PREC: tl.constexpr):
    """acc + ((C Bᵀ) ⊙ L)(Δx) of one head over the source block q (x_c, cum_c, delta_c: that head's chunk;
    in_seq: which of q are positions of the sequence, not padding)."""
    xs = tl.load(x_c + q[:, None] * (H * P) + rp[None, :], mask=in_seq[:, None] & (rp[None, :] < P),
                 other=0.0).to(DOT)
    cum_s = tl.load(cum_c + q)
    delta_s = tl.load(delta_c + q)
    decay = tl.exp(tl.where(keep, cum_t[:, None] - cum_s[None, :], float("-inf")))
    scores = (cb * decay * delta_s[None, :]).to(DOT)
    return acc + tl.dot(scores, xs, input_precision=PREC)


@triton.jit
def _scan_out(acc, x_ptr, z_ptr, D_ptr, out_ptr, ypre_ptr, row0, hh, r, t, rp, L, H, P: tl.constexpr,
              HAS_Z: tl.constexpr, HAS_D: tl.constexpr, STORE_YPRE: tl.constexpr):
    """Head hh's rows r: y = acc + D x stored as y · silu(z) (and y itself in ypre for the backward)."""
    # Pointer first, then the int32 tile: an int64 scalar plus the tile would make an int64 tile.
    io0 = row0 * H * P + hh * P
    io = r[:, None] * (H * P) + rp[None, :]
    io_mask = (t[:, None] < L) & (rp[None, :] < P)
    if HAS_D:
        xt = tl.load(x_ptr + io0 + io, mask=io_mask, other=0.0).to(tl.float32)
        acc += xt * tl.load(D_ptr + hh * P + rp, mask=rp < P, other=0.0)[None, :]
    if HAS_Z:
        if STORE_YPRE:
            tl.store(ypre_ptr + io0 + io, acc, mask=io_mask)
        zt = tl.load(z_ptr + io0 + io, mask=io_mask, other=0.0).to(tl.float32)
        acc = acc * zt * tl.sigmoid(zt)
    tl.store(out_ptr + io0 + io, acc, mask=io_mask)


@triton.jit(do_not_specialize=["L", "nc"])
def _chunk_scan_fwd(
    x_ptr, z_ptr, D_ptr, C_ptr, cb_ptr, delta_ptr, cum_ptr, doc_ptr, prev_ptr, out_ptr, ypre_ptr,
    L, H, G, P: tl.constexpr, N: tl.constexpr, nc,
    T: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_DOC: tl.constexpr, STORE_YPRE: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr, TWO_HEADS: tl.constexpr,
):
    # prev_ptr: the states entering the chunks. Grid (row blocks x heads, chunks, batch): the programs of
    # one chunk run together and share its C Bᵀ and C in L2. TWO_HEADS: a program takes two heads of one
    # group (hh, hh + 1), loading C and each tile of C Bᵀ once for both (half those bytes from L2).
    # Addresses: int64 scalar bases of the chunk, int32 offsets inside it (int64 tiles of offsets double
    # the registers of every address).
    pid = tl.program_id(0)
    m, hh = pid % (T // BM), pid // (T // BM)
    if TWO_HEADS:
        hh = hh * 2
    c = tl.program_id(1)
    b = tl.program_id(2)
    gg = hh // (H // G)
    Lp = nc * T
    row0 = (b * L + c * T).to(tl.int64)
    x_c = x_ptr + row0 * H * P + hh * P
    C_c = C_ptr + row0 * G * N + gg * N
    cum_c = cum_ptr + (b * H + hh).to(tl.int64) * Lp + c * T
    delta_c = delta_ptr + (b * H + hh).to(tl.int64) * Lp + c * T
    doc_c = doc_ptr + b.to(tl.int64) * Lp + c * T
    cb_c = cb_ptr + ((b * nc + c) * G + gg).to(tl.int64) * T * T
    rp = tl.arange(0, BP)
    rn = tl.arange(0, BN)
    r = m * BM + tl.arange(0, BM)  # rows t, as positions in the chunk
    t = c * T + r
    Ct = tl.load(C_c + r[:, None] * (G * N) + rn[None, :], mask=(t[:, None] < L) & (rn[None, :] < N),
                 other=0.0).to(DOT)
    first = tl.full((BM,), 1, tl.int1)
    if HAS_DOC:
        doc_t = tl.load(doc_c + r)
        first = doc_t == _doc_before(doc_ptr, b, c, T, Lp)
    acc, cum_t = _scan_entering(prev_ptr, cum_c, Ct, first, b, c, hh, H, nc, r, rp, rn, P, N, DOT, PREC)
    if TWO_HEADS:
        acc1, cum_t1 = _scan_entering(prev_ptr, cum_c + Lp, Ct, first, b, c, hh + 1, H, nc, r, rp, rn, P, N, DOT,
                                      PREC)

    # Intra-chunk part, causal: source blocks up to the diagonal one.
    for k in range(0, (m + 1) * BM, BM):
        q = k + tl.arange(0, BM)  # sources s, as positions in the chunk
        keep = q[None, :] <= r[:, None]
        if HAS_DOC:
            keep = keep & (tl.load(doc_c + q)[None, :] == doc_t[:, None])
        cb = tl.load(cb_c + r[:, None] * T + q[None, :])
        in_seq = c * T + q < L
        acc = _scan_block(acc, cb, keep, x_c, cum_c, delta_c, cum_t, q, in_seq, rp, H, P, DOT, PREC)
        if TWO_HEADS:
            acc1 = _scan_block(acc1, cb, keep, x_c + P, cum_c + Lp, delta_c + Lp, cum_t1, q, in_seq, rp, H, P, DOT,
                               PREC)

    _scan_out(acc, x_ptr, z_ptr, D_ptr, out_ptr, ypre_ptr, row0, hh, r, t, rp, L, H, P, HAS_Z, HAS_D, STORE_YPRE)
    if TWO_HEADS:
        _scan_out(acc1, x_ptr, z_ptr, D_ptr, out_ptr, ypre_ptr, row0, hh + 1, r, t, rp, L, H, P, HAS_Z, HAS_D,
                  STORE_YPRE)
