/* Weight-only int8 GEMV for CPU decode steps: y[i, r] = scale[r] * sum_j w[r, j] * x[i, j] (+ bias[r]).
 *
 * w (n, k) int8 row-major, x (m, k) float32, scale (n,) float32, bias (n,) float32 or NULL, y (m, n).
 * Each weight row is read from memory once (the m <= 8 activation rows stay in L1) and converted to
 * float32 exactly, so the only rounding is float32 accumulation. At batch 1 the cost is streaming w:
 * the row some distance ahead is prefetched (without it the hardware prefetcher leaves int8 rows of
 * 1-2 KB at about half the bandwidth float32 rows reach). Rows are split over OpenMP threads (torch's
 * own runtime when torch is loaded first: the same pool, no oversubscription).
 *
 * Built at first use by ssmkit/ops/int8_gemv/native.py with the host's compiler and -march=native;
 * the AVX-512 path is taken where the compiler targets it, the portable loop elsewhere.
 */
#include <stdint.h>
#include <stddef.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define PREFETCH_BYTES 6144

static float dot_row(const int8_t *w, const float *x, long k) {
    long j = 0;
    float acc = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; j + 64 <= k; j += 64) {
        __m512i raw = _mm512_loadu_si512((const void *)(w + j));
        a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(raw, 0))),
                             _mm512_loadu_ps(x + j), a0);
        a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(raw, 1))),
                             _mm512_loadu_ps(x + j + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(raw, 2))),
                             _mm512_loadu_ps(x + j + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(raw, 3))),
                             _mm512_loadu_ps(x + j + 48), a3);
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
    float p0 = 0.f, p1 = 0.f, p2 = 0.f, p3 = 0.f;
    for (; j + 4 <= k; j += 4) {
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

void ssmkit_int8_gemv(const int8_t *w, const float *x, const float *scale, const float *bias, float *y,
                      long m, long n, long k, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && n * k >= (1L << 17))
    for (long r = 0; r < n; ++r) {
        const int8_t *row = w + r * k;
        for (long off = 0; off < k; off += 64) __builtin_prefetch((const char *)row + PREFETCH_BYTES + off);
        for (long i = 0; i < m; ++i) {
            float acc = dot_row(row, x + i * k, k) * scale[r];
            y[i * n + r] = bias ? acc + bias[r] : acc;
        }
    }
}
