/* Mamba-1's selective scan over a whole sequence on CPU, forward only (inference: prefill, evaluation),
 * for ssmkit/ops/selective_scan/native.py. Built with the other kernels by ssmkit/ops/native/__init__.py.
 *
 * torch's chunked form walks time with one small fused update per step and layer (about 2,000 ops a layer
 * at L 2048, each a pass over a (b, d, n) state): at mamba-130m's shapes on a CPU that is about half of a
 * whole forward. Here one program holds 16 channels' n states in registers and walks time once: per step,
 * for each state index, h = exp(Δ A) h + Δ B u over the 16 channels and y += C h, with no reduction across
 * lanes (channels are the vector lanes). Inputs are time-major, as a Mamba layer has them: consecutive
 * channels of one position are contiguous.
 *
 *   u, delta, z, out: (b, l, d) float32, channel stride 1, row stride s_l, batch stride s_b;
 *   A_t: (n, d) float32 (A transposed), B, C: (b, g, l, n) float32 contiguous (channel i reads group
 *   i / (d / g)); D, delta_bias: (d,) or NULL; starts: (b, l) uint8, 1 where a document starts, or NULL;
 *   state: (b, d, n) float32, the initial state in, the last state out.
 *
 * Returns 0 when built without AVX-512 (the caller then keeps torch's form, faster than scalar loops), 1 done.
 */
#include "common.h"

int ssmkit_selective_scan_vectorized(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

int ssmkit_selective_scan(const float *u, const float *delta, const float *z, float *out, long s_b, long s_l,
                          const float *A_t, const float *B, const float *C, const float *D, const float *delta_bias,
                          const unsigned char *starts, float *state, long b, long l, long d, long n, long g,
                          int softplus_dt, int threads) {
#if defined(__AVX512F__)
    const long blocks = (d + 15) / 16, per_group = d / g;
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(static) if (threads > 1)
    for (long bi = 0; bi < b; ++bi) {
        for (long blk = 0; blk < blocks; ++blk) {
            const long i0 = blk * 16, width = d - i0 < 16 ? d - i0 : 16;
            const __mmask16 lanes = (__mmask16)((1u << width) - 1u);
            float h[n * 16];  /* state index j of lane k at h[j * 16 + k] */
            for (long j = 0; j < n; ++j) {
                /* The initial state, channel-major in memory, gathered into lanes. */
                for (long k = 0; k < 16; ++k) h[j * 16 + k] = k < width ? state[(bi * d + i0 + k) * n + j] : 0.f;
            }
            const __m512 vD = D ? _mm512_maskz_loadu_ps(lanes, D + i0) : _mm512_setzero_ps();
            const __m512 vbias = delta_bias ? _mm512_maskz_loadu_ps(lanes, delta_bias + i0) : _mm512_setzero_ps();
            /* Group of each lane (channels of a block may straddle two groups when per_group < 16). */
            long grp[16];
            for (long k = 0; k < 16; ++k) grp[k] = bi * g + (k < width ? (i0 + k) / per_group : (i0) / per_group);
            const int one_group = grp[0] == grp[width - 1];
            const float *Bg = B + grp[0] * l * n, *Cg = C + grp[0] * l * n;
            const float *ub = u + bi * s_b + i0, *db = delta + bi * s_b + i0, *zb = z ? z + bi * s_b + i0 : NULL;
            float *ob = out + bi * s_b + i0;
            const unsigned char *st = starts ? starts + bi * l : NULL;
            for (long t = 0; t < l; ++t) {
                __m512 dt = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, db + t * s_l), vbias);
                if (softplus_dt) dt = softplus16(dt);
                const __m512 x = _mm512_maskz_loadu_ps(lanes, ub + t * s_l);
                const __m512 dx = _mm512_mul_ps(dt, x);
                if (st && st[t]) memset(h, 0, sizeof(float) * (size_t)(n * 16));
                __m512 y = _mm512_mul_ps(vD, x);
                for (long j = 0; j < n; ++j) {
                    __m512 vb, vc;
                    if (one_group) {
                        vb = _mm512_set1_ps(Bg[t * n + j]);
                        vc = _mm512_set1_ps(Cg[t * n + j]);
                    } else {
                        float bl[16], cl[16];
                        for (long k = 0; k < 16; ++k) {
                            bl[k] = B[(grp[k] * l + t) * n + j];
                            cl[k] = C[(grp[k] * l + t) * n + j];
                        }
                        vb = _mm512_loadu_ps(bl);
                        vc = _mm512_loadu_ps(cl);
                    }
                    const __m512 decay = exp16(_mm512_mul_ps(dt, _mm512_maskz_loadu_ps(lanes, A_t + j * d + i0)));
                    const __m512 hj = _mm512_fmadd_ps(decay, _mm512_loadu_ps(h + j * 16), _mm512_mul_ps(dx, vb));
                    _mm512_storeu_ps(h + j * 16, hj);
                    y = _mm512_fmadd_ps(hj, vc, y);
                }
                if (zb) y = _mm512_mul_ps(y, silu16(_mm512_maskz_loadu_ps(lanes, zb + t * s_l)));
                _mm512_mask_storeu_ps(ob + t * s_l, lanes, y);
            }
            for (long j = 0; j < n; ++j)
                for (long k = 0; k < width; ++k) state[(bi * d + i0 + k) * n + j] = h[j * 16 + k];
        }
    }
    return 1;
#else
    (void)u; (void)delta; (void)z; (void)out; (void)s_b; (void)s_l; (void)A_t; (void)B; (void)C; (void)D;
    (void)delta_bias; (void)starts; (void)state; (void)b; (void)l; (void)d; (void)n; (void)g; (void)softplus_dt;
    (void)threads;
    return 0;
#endif
}
