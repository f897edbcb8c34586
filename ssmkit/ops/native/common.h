/* What the native kernels share (gemv.c, steps.c, mamba_step.c): vector math, bfloat16 conversions, the
 * GEMV and step entry points the layer steps call. Static inline helpers only, besides the declarations. */
#ifndef SSMKIT_NATIVE_COMMON_H
#define SSMKIT_NATIVE_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 6144
#endif

/* A weight line wanted soon, fetched into L2 (prefetcht1), not L1: a single thread then keeps more lines in
 * flight (L2's queue, not L1's fill buffers), and the GEMVs streamed 5-25% faster than with prefetcht0 at
 * batch 1 on this project's AVX-512 CPU (bfloat16 and int8 rows most). */
#define prefetch_weights(p) __builtin_prefetch((p), 0, 2)

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float to_bf16_rne(float v) {  /* to the nearest bfloat16, ties to even (inf and NaN kept) */
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    if ((bits & 0x7f800000u) == 0x7f800000u) return v;
    bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* exp(x) for 16 floats: x = k ln2 + r, |r| <= ln2 / 2, exp(r) by Cephes' expf polynomial (about 1 ulp),
 * 2^k applied by scalef (exact, down to zero for very negative x). */
#if defined(__AVX512F__)
static inline __m512 exp16(__m512 x) {
    /* min/max return their second operand when one is NaN: the bound first, so a NaN x stays NaN. */
    x = _mm512_max_ps(_mm512_set1_ps(-104.f), _mm512_min_ps(_mm512_set1_ps(88.5f), x));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, k);
}
#endif

static inline float softplus(float v) { return v > 20.f ? v : log1pf(expf(v)); }  /* torch's threshold */
static inline float silu(float v) { return v / (1.f + expf(-v)); }

#if defined(__AVX512F__)
/* log(1 + u) for 16 floats u >= 0: log(w), w = 1 + u, by Cephes' logf polynomial on the mantissa
 * (about 1 ulp), times u / (w - 1) to undo the rounding of 1 + u (u where 1 + u rounds to 1). */
static inline __m512 log1p16(__m512 u) {
    const __m512 one = _mm512_set1_ps(1.f), w = _mm512_add_ps(u, one);
    __m512 e = _mm512_getexp_ps(w), m = _mm512_getmant_ps(w, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
    const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356237f), _CMP_GT_OQ);
    m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
    e = _mm512_mask_add_ps(e, big, e, one);
    const __m512 x = _mm512_sub_ps(m, one), z = _mm512_mul_ps(x, x);
    __m512 y = _mm512_set1_ps(7.0376836292e-2f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(-1.1514610310e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.1676998740e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(-1.2420140846e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.4249322787e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(-1.6668057665e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(2.0000714765e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(-2.4999993993e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(3.3333331174e-1f));
    y = _mm512_mul_ps(_mm512_mul_ps(y, x), z);
    y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
    y = _mm512_fnmadd_ps(z, _mm512_set1_ps(0.5f), y);
    __m512 logw = _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), _mm512_add_ps(x, y));
    const __m512 wm1 = _mm512_sub_ps(w, one);
    const __mmask16 tiny = _mm512_cmp_ps_mask(wm1, _mm512_setzero_ps(), _CMP_EQ_OQ);
    return _mm512_mask_blend_ps(tiny, _mm512_mul_ps(logw, _mm512_div_ps(u, _mm512_mask_blend_ps(tiny, wm1, one))), u);
}

static inline __m512 softplus16(__m512 v) {
    const __mmask16 linear = _mm512_cmp_ps_mask(v, _mm512_set1_ps(20.f), _CMP_GT_OQ);
    return _mm512_mask_blend_ps(linear, log1p16(exp16(v)), v);
}

static inline __m512 silu16(__m512 v) {
    return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
}
#endif

void ssmkit_int8_gemv(const int8_t *w, const float *x, const float *scale, const float *bias, float *y,
                      long m, long n, long k, int threads);
void ssmkit_bf16_gemv(const uint16_t *w, const float *x, const float *scale, const float *bias, float *y,
                      long m, long n, long k, int threads);
void ssmkit_gemv_any(int kind, const void *w, const float *x, const float *scale, const float *bias, float *y,
                     long m, long n, long k, int threads);
void ssmkit_conv_step(void *window, int conv_bf16, const float *x, long x_stride, const float *w, const float *bias,
                      float *out, long b, long c, long width);

#endif
