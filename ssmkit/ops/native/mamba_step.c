/* Mamba(-1)'s decode steps (built with gemv.c and steps.c by ssmkit/ops/native/__init__.py, bound by
 * ssmkit/ops/state_update/native.py): the selective step (native_selective_step) and a whole pre-norm
 * block's step in one call (native_mamba_layer_step):
 *
 *   hn      = RMSNorm(r[b]) * norm_w                 (norm_eps)
 *   (x, z)  = in_proj(hn)                            (b, I) each
 *   x       = silu(conv step of x over the window)   ssmkit_conv_step, the window shifted in place
 *   (dt, B, C) = x_proj(x)                           (b, R), (b, n), (b, n)
 *   y       = the selective step from x, dt, B, C, z selective_step_ex: dt_proj, softplus(dt + dt_bias),
 *                                                    the state update in place, D and the gate silu(z)
 *   out[b]  = r[b] + out_proj(y)
 *
 * With bf16 = 1 every tensor between the ops is rounded to bfloat16 where a bfloat16 block holds it (hn,
 * in_proj's, the convolution's, x_proj's and dt_proj's outputs, y and out_proj's output), the arithmetic
 * float32, as torch's bfloat16 ops compute; the residual stream r stays float32. The projections go through
 * gemv.c's kernels (float32, bfloat16 or int8 with per-row scales, each its own kind). At batch 1 a block's
 * step is then one call that streams its four weight matrices and its state once; torch's form takes about
 * twenty calls and the casts between them, a few milliseconds a token at mamba-130m's 24 blocks.
 */
#include "common.h"

static inline float dt_weight_at(const void *dt_w16, int dt_bf16, long at) {
    return dt_bf16 ? bf16_to_float(((const uint16_t *)dt_w16)[at]) : ((const float *)dt_w16)[at];
}

/* One Mamba(-1) selective-scan step, in place, from the layer's projections:
 *
 *   dt[b, i]   = dt_low[b, :] . dt_w[i, :]                       (dt_w16 NULL: dt_low holds dt (b, I))
 *   delta[i]   = softplus(dt[b, i] + dt_bias[i])                 (dt rounded to bfloat16 first with dt_round)
 *   state[i,:] = state[i,:] * exp(delta[i] * A[i,:]) + (delta[i] * x[b, i]) * B[b,:]
 *   y[b, i]    = (state[i,:] . C[b,:] + D[i] * x[b, i]) * silu(z[b, i])      (z NULL: no gate)
 *
 * state (b, I, n) float32; x, z (b, I) and dt_low (b, R) (or (b, I)) with row strides x_stride, z_stride,
 * dt_stride (slices of the projections' outputs); dt_w16 (ceil(I / 16), R, 16) dt_proj's weight dt_w (I, R)
 * in blocks of 16 channels, zero-padded, float32 (dt_bf16 = 0) or bfloat16 bits (dt_bf16 = 1): a block's
 * R·16 weights contiguous, read in one sequential pass (a (R, I) transpose read 16 channels at a time
 * touches R lines a block, which the hardware prefetcher does not follow); A (I, n); dt_bias, D (I,) or
 * NULL; B, C (b, n) with row stride bc_stride; y (b, I). The per-channel work (the dt projection,
 * softplus, D and the gate) is done 16 channels at a time, then each channel's state row.
 */
static void selective_step_ex(float *state, const float *x, long x_stride, const float *dt_low, long dt_stride,
                              const void *dt_w16, int dt_bf16, int dt_round, long R, const float *dt_bias,
                              const float *A, const float *B, const float *C, long bc_stride, const float *D,
                              const float *z, long z_stride, float *y, long b, long I, long n, int threads) {
    const long blocks = (I + 15) / 16;
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(static) if (threads > 1 && I * n >= (1L << 16))
    for (long bi = 0; bi < b; ++bi) {
        for (long blk = 0; blk < blocks; ++blk) {
            const long i0 = blk * 16, width = I - i0 < 16 ? I - i0 : 16;
            const float *Bv = B + bi * bc_stride, *Cv = C + bi * bc_stride, *xr = x + bi * x_stride + i0;
            const float *dl = dt_low + bi * dt_stride;
            float delta[16], gate[16];
#if defined(__AVX512F__)
            const __mmask16 lanes = (__mmask16)((1u << width) - 1u);
            __m512 dt;
            if (dt_w16) {
                dt = _mm512_setzero_ps();
                const long at = blk * R * 16;
                for (long r = 0; r < R; ++r) {
                    const __m512 w = dt_bf16
                        ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                              (const __m256i *)((const uint16_t *)dt_w16 + at + r * 16))), 16))
                        : _mm512_loadu_ps((const float *)dt_w16 + at + r * 16);
                    dt = _mm512_fmadd_ps(_mm512_set1_ps(dl[r]), w, dt);
                }
                if (dt_round) {
                    _mm512_storeu_ps(delta, dt);
                    for (long k = 0; k < 16; ++k) delta[k] = to_bf16_rne(delta[k]);
                    dt = _mm512_loadu_ps(delta);
                }
            } else {
                dt = _mm512_maskz_loadu_ps(lanes, dl + i0);
            }
            if (dt_bias) dt = _mm512_add_ps(dt, _mm512_maskz_loadu_ps(lanes, dt_bias + i0));
            _mm512_storeu_ps(delta, softplus16(dt));
            _mm512_storeu_ps(gate, z ? silu16(_mm512_maskz_loadu_ps(lanes, z + bi * z_stride + i0)) : _mm512_set1_ps(1.f));
#else
            for (long k = 0; k < width; ++k) {
                float v = 0.f;
                if (dt_w16) {
                    for (long r = 0; r < R; ++r) v += dl[r] * dt_weight_at(dt_w16, dt_bf16, (blk * R + r) * 16 + k);
                    if (dt_round) v = to_bf16_rne(v);
                } else {
                    v = dl[i0 + k];
                }
                delta[k] = softplus(v + (dt_bias ? dt_bias[i0 + k] : 0.f));
                gate[k] = z ? silu(z[bi * z_stride + i0 + k]) : 1.f;
            }
#endif
            for (long k = 0; k < width; ++k) {
                const long i = i0 + k;
                const float *Ai = A + i * n;
                float *s = state + (bi * I + i) * n;
                const float xv = xr[k], d = delta[k], u = d * xv;
                float acc = 0.f;
                long j = 0;
#if defined(__AVX512F__)
                __m512 vacc = _mm512_setzero_ps();
                const __m512 vd = _mm512_set1_ps(d), vu = _mm512_set1_ps(u);
                for (; j + 16 <= n; j += 16) {
                    const __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(s + j),
                                                     exp16(_mm512_mul_ps(vd, _mm512_loadu_ps(Ai + j))),
                                                     _mm512_mul_ps(vu, _mm512_loadu_ps(Bv + j)));
                    _mm512_storeu_ps(s + j, v);
                    vacc = _mm512_fmadd_ps(v, _mm512_loadu_ps(Cv + j), vacc);
                }
                acc = _mm512_reduce_add_ps(vacc);
#endif
                for (; j < n; ++j) {
                    const float v = s[j] * expf(d * Ai[j]) + u * Bv[j];
                    s[j] = v;
                    acc += v * Cv[j];
                }
                if (D) acc += D[i] * xv;
                y[bi * I + i] = acc * gate[k];
            }
        }
    }
}

/* The step above with float32 dt weights, nothing rounded (ssmkit/ops/state_update/native.py). */
void ssmkit_selective_step(float *state, const float *x, long x_stride, const float *dt_low, long dt_stride,
                           const float *dt_w16, long R, const float *dt_bias, const float *A, const float *B,
                           const float *C, long bc_stride, const float *D, const float *z, long z_stride, float *y,
                           long b, long I, long n, int threads) {
    selective_step_ex(state, x, x_stride, dt_low, dt_stride, dt_w16, 0, 0, R, dt_bias, A, B, C, bc_stride, D, z,
                      z_stride, y, b, I, n, threads);
}

typedef struct {
    const void *w;       /* (rows, cols) row-major: float32, bfloat16 bits or int8 */
    const float *scale;  /* (rows,) for int8, else NULL */
    const float *bias;   /* (rows,) or NULL */
    int kind;            /* 0 float32, 1 bfloat16, 2 int8: ssmkit_gemv_any's */
} Matrix;

/* A block's parameters, bound once (ssmkit/ops/state_update/native.py mirrors it field by field and checks
 * its size against ssmkit_mamba_layer_size). Shapes: H d_model, I d_inner, n d_state, R dt_rank, width the
 * convolution's; norm_w (H,); in_proj (2I, H), x_proj (R + 2n, I), out_proj (H, I); dt_w16 (ceil(I / 16), R,
 * 16) dt_proj's weight in blocks of 16 channels (selective_step_ex), float32 or bfloat16 bits
 * (dt_bf16); dt_bias (I,) or NULL; conv_w (I, width), conv_b (I,) or NULL; A (I, n); D (I,) or NULL; all
 * float32 but the matrices. */
typedef struct {
    long H, I, n, R, width;
    const float *norm_w;
    float norm_eps;
    int bf16;
    Matrix in_proj, x_proj, out_proj;
    const void *dt_w16;
    int dt_bf16;
    const float *dt_bias, *conv_w, *conv_b, *A, *D;
} MambaLayer;

long ssmkit_mamba_layer_size(void) { return (long)sizeof(MambaLayer); }

static void round_bf16(float *v, long count) {
    for (long k = 0; k < count; ++k) v[k] = to_bf16_rne(v[k]);
}

static void gemv(const Matrix *m, const float *x, float *y, long b, long rows, long cols, int threads) {
    ssmkit_gemv_any(m->kind, m->w, x, m->scale, m->bias, y, b, rows, cols, threads);
}

/* r, out (b, H) float32 (out may be r); state (b, I, n) float32 and window (b, I, width) float32 (bf16 = 0)
 * or bfloat16 bits (bf16 = 1), contiguous, updated in place; scratch (b·(H + 4I + R + 2n)) float32; b at
 * most the GEMVs' row count (8). */
void ssmkit_mamba_layer_step(const MambaLayer *L, const float *r, float *out, float *state, void *window,
                             float *scratch, long b, int threads) {
    const long H = L->H, I = L->I, n = L->n, R = L->R, nx = R + 2 * n;
    float *hn = scratch, *xz = hn + b * H, *xc = xz + b * 2 * I, *dbc = xc + b * I, *y = dbc + b * nx;
    for (long bi = 0; bi < b; ++bi) {
        const float *ri = r + bi * H;
        float ss = 0.f;
        #pragma omp simd reduction(+:ss)
        for (long k = 0; k < H; ++k) ss += ri[k] * ri[k];
        const float scale = 1.f / sqrtf(ss / (float)H + L->norm_eps);
        for (long k = 0; k < H; ++k) hn[bi * H + k] = ri[k] * scale * L->norm_w[k];
    }
    if (L->bf16) round_bf16(hn, b * H);
    gemv(&L->in_proj, hn, xz, b, 2 * I, H, threads);
    if (L->bf16) round_bf16(xz, b * 2 * I);  /* the bfloat16 window then stores x exactly */
    ssmkit_conv_step(window, L->bf16, xz, 2 * I, L->conv_w, L->conv_b, xc, b, I, L->width);
    if (L->bf16) round_bf16(xc, b * I);
    gemv(&L->x_proj, xc, dbc, b, nx, I, threads);
    if (L->bf16) round_bf16(dbc, b * nx);
    selective_step_ex(state, xc, I, dbc, nx, L->dt_w16, L->dt_bf16, L->bf16, R, L->dt_bias, L->A, dbc + R, dbc + R + n,
                      nx, L->D, xz + I, 2 * I, y, b, I, n, threads);
    if (L->bf16) round_bf16(y, b * I);
    gemv(&L->out_proj, y, hn, b, H, I, threads);  /* hn is read: its b·H floats take out_proj's output */
    for (long k = 0; k < b * H; ++k) out[k] = r[k] + (L->bf16 ? to_bf16_rne(hn[k]) : hn[k]);
}
