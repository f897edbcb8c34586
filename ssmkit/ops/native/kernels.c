/* CPU kernels for decode steps, each moving its bytes once (built by ssmkit/ops/native/__init__.py).
 *
 * 1. Matrix-vector products (ssmkit/ops/gemv), weights streamed from memory once:
 *
 *   y[i, r] = scale[r] * sum_j w[r, j] * x[i, j] (+ bias[r])
 *
 * w (n, k) row-major, int8 (ssmkit_int8_gemv, with per-row scales) or bfloat16 bits (ssmkit_bf16_gemv,
 * scale NULL); x (m, k) float32; bias (n,) float32 or NULL; y (m, n) float32. Each weight row is read
 * once (the m <= 8 activation rows stay in L1) and converted to float32 exactly, so the only rounding
 * is the float32 accumulation. At batch 1 the cost is streaming w: each step prefetches the weights a
 * few rows ahead (without it the hardware prefetcher leaves rows of 1-3 KB well below the bandwidth
 * long float32 rows reach). Rows are split over OpenMP threads (torch's own runtime when torch is
 * loaded first: the same pool, no oversubscription).
 *
 * 2. The Mamba-2 state step (ssmkit/ops/state_update/native.py), state read and written once.
 *
 * Built at first use with the host's compiler and -march=native; the AVX-512 paths are taken where the
 * compiler targets AVX-512, portable loops elsewhere.
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 6144
#endif

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static float dot_int8(const int8_t *w, const float *x, long k) {
    long j = 0;
    float acc = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; j + 64 <= k; j += 64) {
        __builtin_prefetch((const char *)(w + j) + PREFETCH_BYTES);
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
        if (!(j & 63)) __builtin_prefetch((const char *)(w + j) + PREFETCH_BYTES);
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
        __builtin_prefetch((const char *)(w + j) + PREFETCH_BYTES);
        __builtin_prefetch((const char *)(w + j) + PREFETCH_BYTES + 64);
        a0 = _mm512_fmadd_ps(bf16x16(w + j), _mm512_loadu_ps(x + j), a0);
        a1 = _mm512_fmadd_ps(bf16x16(w + j + 16), _mm512_loadu_ps(x + j + 16), a1);
        a2 = _mm512_fmadd_ps(bf16x16(w + j + 32), _mm512_loadu_ps(x + j + 32), a2);
        a3 = _mm512_fmadd_ps(bf16x16(w + j + 48), _mm512_loadu_ps(x + j + 48), a3);
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
    float p0 = 0.f, p1 = 0.f, p2 = 0.f, p3 = 0.f;
    for (; j + 4 <= k; j += 4) {
        if (!(j & 31)) __builtin_prefetch((const char *)(w + j) + PREFETCH_BYTES);
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

/* One Mamba-2 decode step, in place, with a scalar decay per head:
 *
 *   state[b, h, p, :] = state[b, h, p, :] * dA[b, h] + (dt[b, h] * x[b, h, p]) * B[b, g(h), :]
 *   y[b, h, p]        = state[b, h, p, :] . C[b, g(h), :]
 *
 * state (b, h, p, n) float32, x (b, h, p), dt and dA (b, h) (dt after bias, softplus and limits;
 * dA = exp(dt * A)), B and C (b, g, n), y (b, h, p); head h reads group h / (h_total / g). torch's ops
 * pass over the state three times (decay, update, read-out); at mamba2-130m sizes the states of all
 * layers are ~19 MB, beyond the caches, so one pass saves about two thirds of that traffic.
 */
void ssmkit_ssd_step(float *state, const float *x, const float *dt, const float *dA, const float *B,
                     const float *C, float *y, long b, long h, long p, long n, long g, int threads) {
    const long heads_per_group = h / g;
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(static) if (threads > 1 && h * p * n >= (1L << 16))
    for (long bi = 0; bi < b; ++bi) {
        for (long hi = 0; hi < h; ++hi) {
            const long bh = bi * h + hi;
            const float decay = dA[bh], step = dt[bh];
            const float *Bv = B + (bi * g + hi / heads_per_group) * n;
            const float *Cv = C + (bi * g + hi / heads_per_group) * n;
            for (long pi = 0; pi < p; ++pi) {
                float *s = state + (bh * p + pi) * n;
                const float u = step * x[bh * p + pi];
                float acc = 0.f;
                #pragma omp simd reduction(+:acc)
                for (long j = 0; j < n; ++j) {
                    const float v = s[j] * decay + u * Bv[j];
                    s[j] = v;
                    acc += v * Cv[j];
                }
                y[bh * p + pi] = acc;
            }
        }
    }
}
