/* CPU kernels for the chunked (whole-sequence) ops (built with gemv.c and steps.c by
 * ssmkit/ops/native/__init__.py).
 *
 * The SSD's intra-chunk scores (ssmkit/ops/ssd/chunked.py), one pass instead of torch's five
 * (difference, clamp, exp, threshold, product with C Bᵀ) over a (heads, T, T) block per chunk:
 *
 *   scores[k, h, t, s] = L(cum[k, h, t] - cum[k, h, s]) * cb[k, g(h), t, s]   for s <= t, else 0
 *   L(d) = exp(max(d, lo)), then 0 where that is <= 2 exp(lo)
 *
 * lo is log of the smallest decay factor kept (about sqrt of the float's tiny, chunked.py's _log_floor):
 * the max keeps exp away from denormal results (microcode assists, ~50x slower), the threshold sets
 * the factors that small to exactly 0 (so the matmuls after never meet denormals). A NaN difference
 * stays NaN. cum (k, h, T), cb (k, g, T, T), scores (k, h, T, T), all float32 and contiguous; head h
 * reads group h / (heads / g).
 */
#include "common.h"

static void scores_row(const float *ct, float ctt, const float *cb, float *out, long t, long T, float lo, float cut) {
    long s = 0;
#if defined(__AVX512F__)
    const __m512 vt = _mm512_set1_ps(ctt), vlo = _mm512_set1_ps(lo), vcut = _mm512_set1_ps(cut);
    for (; s <= t; s += 16) {
        const long left = t + 1 - s;
        const __mmask16 lanes = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
        const __m512 d = _mm512_sub_ps(vt, _mm512_maskz_loadu_ps(lanes, ct + s));
        const __mmask16 nan = _mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q);
        __m512 v = exp16(_mm512_max_ps(vlo, d));
        v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, vcut, _CMP_GT_OQ), v);
        v = _mm512_mask_blend_ps(nan, v, d);
        _mm512_mask_storeu_ps(out + s, lanes, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(lanes, cb + s)));
    }
    s = t + 1;
#else
    for (; s <= t; ++s) {
        const float d = ctt - ct[s];
        float v = d != d ? d : expf(d > lo ? d : lo);
        if (v <= cut) v = 0.f;
        out[s] = v * cb[s];
    }
#endif
    if (s < T) memset(out + s, 0, (size_t)(T - s) * sizeof(float));
}

void ssmkit_ssd_scores(const float *cum, const float *cb, float *scores, long k, long h, long g, long T, float lo,
                       int threads) {
    const long heads_per_group = h / g;
    const float cut = 2.f * expf(lo);
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(static) if (threads > 1)
    for (long ki = 0; ki < k; ++ki) {
        for (long hi = 0; hi < h; ++hi) {
            const float *ct = cum + (ki * h + hi) * T;
            const float *cbh = cb + (ki * g + hi / heads_per_group) * T * T;
            float *out = scores + (ki * h + hi) * T * T;
            for (long t = 0; t < T; ++t) scores_row(ct, ct[t], cbh + t * T, out + t * T, t, T, lo, cut);
        }
    }
}
