"""Reverse scans of the time-wise backward by runs: each thread walks the run of 4 or 8 consecutive steps
it holds of a (BD, T) tile by hand, and one reverse scan carries a value a thread across the threads.

Why: Triton 3.6 lowers ``tl.associative_scan(..., reverse=True)`` by moving every operand and result
register across the lanes, five shuffles each, before and after a forward scan (Triton 3.9: one each):
for the adjoint's two operands and one result at 8 steps a thread, 120 shuffles a thread per tile and
state index. Split into runs (``tl.reshape`` + ``tl.split``: register renames when the run is what each
thread holds), the steps of a run never cross lanes.
"""

import triton
import triton.language as tl


@triton.jit
def _split4(x):
    """The 4 consecutive steps each thread holds of a (BD, T) tile as 4 (BD, T / 4) tensors, step k of
    every run in the k-th."""
    x = tl.reshape(x, (x.shape[0], x.shape[1] // 4, 2, 2))
    even, odd = tl.split(x)
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def _join4(x0, x1, x2, x3):
    """Inverse of :func:`_split4`."""
    return tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), (x0.shape[0], x0.shape[1] * 4))


@triton.jit
def _split8(x):
    """The 8 consecutive steps each thread holds of a (BD, T) tile as 8 (BD, T / 8) tensors, step k of
    every run of 8 in the k-th: register renames only when a thread's run is 8 steps."""
    x = tl.reshape(x, (x.shape[0], x.shape[1] // 8, 2, 2, 2))
    even, odd = tl.split(x)
    even_lo, even_hi = tl.split(even)
    odd_lo, odd_hi = tl.split(odd)
    x0, x4 = tl.split(even_lo)
    x1, x5 = tl.split(odd_lo)
    x2, x6 = tl.split(even_hi)
    x3, x7 = tl.split(odd_hi)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _join8(x0, x1, x2, x3, x4, x5, x6, x7):
    """Inverse of :func:`_split8`."""
    even = tl.join(tl.join(x0, x4), tl.join(x2, x6))
    odd = tl.join(tl.join(x1, x5), tl.join(x3, x7))
    return tl.reshape(tl.join(even, odd), (x0.shape[0], x0.shape[1] * 8))


@triton.jit
def _step_back(a, c, x_later, p_later):
    # One step of the in-thread suffix: x = c + a x_later, p = a p_later (a = 0 drops x_later outright).
    return tl.where(a == 0.0, c, c + a * x_later), a * p_later


@triton.jit
def _with_tail(x, p, w_next):
    # A step's g from its suffix in the run (x, p) and w of the next run.
    return tl.where(p == 0.0, x, x + p * w_next)


@triton.jit
def _tail_combine(fa_late, fx_late, ta_late, tx_late, fa_early, fx_early, ta_early, tx_early):
    # Reverse scan over the threads' runs (the accumulated later segment first). (fa, fx): the affine map
    # of a whole segment; (ta, tx): of the segment without its first run, whose value is what the first
    # run's thread needs from the threads after it (the identity for a single run).
    return (
        fa_early * fa_late, tl.where(fa_early == 0.0, fx_early, fx_early + fa_early * fx_late),
        ta_early * fa_late, tl.where(ta_early == 0.0, tx_early, tx_early + ta_early * fx_late),
    )


@triton.jit
def _next_runs(a0, x0, p0):
    """w = a_0 g_0 of the run after each thread's, from each run's first decay a_0 and its suffix (x_0, p_0):
    a run maps the next run's w to its own, w = a_0 (x_0 + p_0 w_next) (0 where a document starts)."""
    run_x = tl.where(a0 == 0.0, 0.0, a0 * x0)
    _fa, _fx, _ta, w_next = tl.associative_scan(
        (a0 * p0, run_x, tl.full(p0.shape, 1.0, p0.dtype), tl.zeros(p0.shape, p0.dtype)), axis=1,
        combine_fn=_tail_combine, reverse=True,
    )
    return w_next


@triton.jit
def _adjoint_by_runs(a, c, RUN: tl.constexpr):
    """g_t = c_t + a_{t+1} g_{t+1} over a (BD, T) tile (a_t, c_t given; g past the tile is 0) whose threads
    hold runs of RUN = 4 or 8 consecutive steps: each thread walks its run back with its own a_1 .. a_{RUN-1},
    then adds in the next run's w = a_0 g_0 (its first decay included) from one reverse scan over the runs."""
    if RUN == 8:
        a0, a1, a2, a3, a4, a5, a6, a7 = _split8(a)
        c0, c1, c2, c3, c4, c5, c6, c7 = _split8(c)
        x7, p7 = c7, tl.full(c7.shape, 1.0, c7.dtype)
        x6, p6 = _step_back(a7, c6, x7, p7)
        x5, p5 = _step_back(a6, c5, x6, p6)
        x4, p4 = _step_back(a5, c4, x5, p5)
        x3, p3 = _step_back(a4, c3, x4, p4)
        x2, p2 = _step_back(a3, c2, x3, p3)
        x1, p1 = _step_back(a2, c1, x2, p2)
        x0, p0 = _step_back(a1, c0, x1, p1)
        w = _next_runs(a0, x0, p0)
        g = _join8(
            _with_tail(x0, p0, w), _with_tail(x1, p1, w), _with_tail(x2, p2, w), _with_tail(x3, p3, w),
            _with_tail(x4, p4, w), _with_tail(x5, p5, w), _with_tail(x6, p6, w), _with_tail(x7, p7, w),
        )
    else:
        tl.static_assert(RUN == 4, "runs of 4 or 8 steps")
        a0, a1, a2, a3 = _split4(a)
        c0, c1, c2, c3 = _split4(c)
        x3, p3 = c3, tl.full(c3.shape, 1.0, c3.dtype)
        x2, p2 = _step_back(a3, c2, x3, p3)
        x1, p1 = _step_back(a2, c1, x2, p2)
        x0, p0 = _step_back(a1, c0, x1, p1)
        w = _next_runs(a0, x0, p0)
        g = _join4(_with_tail(x0, p0, w), _with_tail(x1, p1, w), _with_tail(x2, p2, w), _with_tail(x3, p3, w))
    return g
