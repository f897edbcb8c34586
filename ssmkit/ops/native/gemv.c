/* CPU kernels for decode steps, each moving its bytes once (built with steps.c by ssmkit/ops/native/__init__.py).
 *
 * Matrix-vector products (ssmkit/ops/gemv and the layer step in steps.c), weights streamed from memory once:
 *
 *   y[i, r] = scale[r] * sum_j w[r, j] * x[i, j] (+ bias[r])
 *
 * w (n, k) row-major, int8 (ssmkit_int8_gemv, with per-row scales), bfloat16 bits (ssmkit_bf16_gemv,
 * scale NULL) or float32 (ssmkit_gemv_any's kind 0); x (m, k) float32; bias (n,) float32 or NULL; y (m, n) float32. Each weight row is read
 * once (the m <= 8 activation rows stay in L1) and converted to float32 exactly, so the only rounding
 * is the float32 accumulation. At batch 1 the cost is streaming w: each step prefetches the weights a
 * few rows ahead (without it the hardware prefetcher leaves rows of 1-3 KB well below the bandwidth
 * long float32 rows reach). Rows are split over OpenMP threads (torch's own runtime when torch is
 * loaded first: the same pool, no oversubscription).
 */
#include "common.h"

static float dot_int8(const int8_t *w, const float *x, long k) {
    long j = 0;
    float acc = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; j + 64 <= k; j += 64) {
        prefetch_weights((const char *)(w + j) + PREFETCH_BYTES);
        /* sign-extending loads of 16 bytes each (no lane extracts: the shuffle port is the bound) */
        a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + j)))),
                             _mm512_loadu_ps(x + j), a0);
        a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + j + 16)))),
                             _mm512_loadu_ps(x + j + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + j + 32)))),
                             _mm512_loadu_ps(x + j + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + j + 48)))),
                             _mm512_loadu_ps(x + j + 48), a3);
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
    float p0 = 0.f, p1 = 0.f, p2 = 0.f, p3 = 0.f;
    for (; j + 4 <= k; j += 4) {
        if (!(j & 63)) prefetch_weights((const char *)(w + j) + PREFETCH_BYTES);
        p0 += (float)w[j] * x[j];
        p1 += (float)w[j + 1] * x[j + 1];
        p2 += (float)w[j + 2] * x[j + 2];
        p3 += (float)w[j + 3] * x[j + 3];
    }
    acc = (p0 + p1) + (p2 + p3);
#endif
    for (; j < k; ++j) acc += (float)w[j] * x[j];
    return acc;
}

#if defined(__AVX512F__)
static inline __m512 bf16x16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#endif

static float dot_bf16(const uint16_t *w, const float *x, long k) {
    long j = 0;
    float acc = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; j + 64 <= k; j += 64) {
        prefetch_weights((const char *)(w + j) + PREFETCH_BYTES);
        prefetch_weights((const char *)(w + j) + PREFETCH_BYTES + 64);
        a0 = _mm512_fmadd_ps(bf16x16(w + j), _mm512_loadu_ps(x + j), a0);
        a1 = _mm512_fmadd_ps(bf16x16(w + j + 16), _mm512_loadu_ps(x + j + 16), a1);
        a2 = _mm512_fmadd_ps(bf16x16(w + j + 32), _mm512_loadu_ps(x + j + 32), a2);
        a3 = _mm512_fmadd_ps(bf16x16(w + j + 48), _mm512_loadu_ps(x + j + 48), a3);
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
    float p0 = 0.f, p1 = 0.f, p2 = 0.f, p3 = 0.f;
    for (; j + 4 <= k; j += 4) {
        if (!(j & 31)) prefetch_weights((const char *)(w + j) + PREFETCH_BYTES);
        p0 += bf16_to_float(w[j]) * x[j];
        p1 += bf16_to_float(w[j + 1]) * x[j + 1];
        p2 += bf16_to_float(w[j + 2]) * x[j + 2];
        p3 += bf16_to_float(w[j + 3]) * x[j + 3];
    }
    acc = (p0 + p1) + (p2 + p3);
#endif
    for (; j < k; ++j) acc += bf16_to_float(w[j]) * x[j];
    return acc;
}

void ssmkit_int8_gemv(const int8_t *w, const float *x, const float *scale, const float *bias, float *y,
                      long m, long n, long k, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && n * k >= (1L << 17))
    for (long r = 0; r < n; ++r) {
        const int8_t *row = w + r * k;
        for (long i = 0; i < m; ++i) {
            float acc = dot_int8(row, x + i * k, k) * scale[r];
            y[i * n + r] = bias ? acc + bias[r] : acc;
        }
    }
}

void ssmkit_bf16_gemv(const uint16_t *w, const float *x, const float *scale, const float *bias, float *y,
                      long m, long n, long k, int threads) {
    (void)scale;
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && n * k >= (1L << 16))
    for (long r = 0; r < n; ++r) {
        const uint16_t *row = w + r * k;
        for (long i = 0; i < m; ++i) {
            float acc = dot_bf16(row, x + i * k, k);
            y[i * n + r] = bias ? acc + bias[r] : acc;
        }
    }
}

static float dot_f32(const float *w, const float *x, long k) {
    long j = 0;
    float acc = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; j + 64 <= k; j += 64) {
        for (int line = 0; line < 256; line += 64) prefetch_weights((const char *)(w + j) + PREFETCH_BYTES + line);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j), _mm512_loadu_ps(x + j), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 16), _mm512_loadu_ps(x + j + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 32), _mm512_loadu_ps(x + j + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 48), _mm512_loadu_ps(x + j + 48), a3);
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
    float p0 = 0.f, p1 = 0.f, p2 = 0.f, p3 = 0.f;
    for (; j + 4 <= k; j += 4) {
        if (!(j & 15)) prefetch_weights((const char *)(w + j) + PREFETCH_BYTES);
        p0 += w[j] * x[j];
        p1 += w[j + 1] * x[j + 1];
        p2 += w[j + 2] * x[j + 2];
        p3 += w[j + 3] * x[j + 3];
    }
    acc = (p0 + p1) + (p2 + p3);
#endif
    for (; j < k; ++j) acc += w[j] * x[j];
    return acc;
}

/* y (m, n) = x (m, k) w (n, k)^T (* scale) + bias, for a weight of `kind` 0 (float32), 1 (bfloat16 bits) or
 * 2 (int8 with per-row scales): the GEMVs above behind one entry point (the layer step below). */
void ssmkit_gemv_any(int kind, const void *w, const float *x, const float *scale, const float *bias, float *y,
                     long m, long n, long k, int threads) {
    if (kind == 1) {
        ssmkit_bf16_gemv((const uint16_t *)w, x, scale, bias, y, m, n, k, threads);
        return;
    }
    if (kind == 2) {
        ssmkit_int8_gemv((const int8_t *)w, x, scale, bias, y, m, n, k, threads);
        return;
    }
    const float *wf = (const float *)w;
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && n * k >= (1L << 15))
    for (long r = 0; r < n; ++r)
        for (long i = 0; i < m; ++i) {
            const float acc = dot_f32(wf + r * k, x + i * k, k);
            y[i * n + r] = bias ? acc + bias[r] : acc;
        }
}
