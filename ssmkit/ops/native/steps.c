/* CPU kernels for decode steps, each moving its bytes once (built with gemv.c by ssmkit/ops/native/__init__.py):
 *
 * the Mamba-2 state step (ssmkit/ops/state_update/native.py), state read and written once (Mamba-1's is in
 * mamba_step.c), and the depthwise causal convolution's one-token update (ssmkit/ops/causal_conv1d/native.py):
 * each replaces a dozen small torch ops of a decode step; Mamba-2's convolution and state step together, from
 * in_proj's output to out_proj's input; and a whole pre-norm Mamba-2 block (the norm and both projections
 * too, through gemv.c).
 *
 * Built at first use with the host's compiler and -march=native; the AVX-512 paths are taken where the
 * compiler targets AVX-512, portable loops elsewhere.
 */
#include "common.h"

/* One row of a head's state, s = s * decay + u * B, read out as s . C, in one pass over s (n floats). */
static inline float state_row_update(float *s, float decay, float u, const float *Bv, const float *Cv, long n) {
    float acc = 0.f;
    #pragma omp simd reduction(+:acc)
    for (long j = 0; j < n; ++j) {
        const float v = s[j] * decay + u * Bv[j];
        s[j] = v;
        acc += v * Cv[j];
    }
    return acc;
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
            for (long pi = 0; pi < p; ++pi)
                y[bh * p + pi] = state_row_update(state + (bh * p + pi) * n, decay, step * x[bh * p + pi], Bv, Cv, n);
        }
    }
}

/* The depthwise causal convolution's one-token update with SiLU, the window shifted in place:
 *
 *   window[b, c, :] = (window[b, c, 1:], x[b, c]);  out[b, c] = silu(window[b, c, :] . w[c, :] + bias[c])
 *
 * window (b, c, width) float32 (conv_bf16 = 0) or bfloat16 bits (conv_bf16 = 1: x must hold bfloat16
 * values, which are stored exactly); x (b, c) with row stride x_stride; w (c, width) float32; bias (c,)
 * or NULL; out (b, c) float32.
 */
void ssmkit_conv_step(void *window, int conv_bf16, const float *x, long x_stride, const float *w, const float *bias,
                      float *out, long b, long c, long width) {
    for (long bi = 0; bi < b; ++bi) {
        float *o = out + bi * c;
        for (long ci = 0; ci < c; ++ci) {
            const long row = (bi * c + ci) * width;
            const float *wc = w + ci * width, xv = x[bi * x_stride + ci];
            float acc = bias ? bias[ci] : 0.f;
            if (conv_bf16) {
                uint16_t *win = (uint16_t *)window + row;
                for (long j = 0; j + 1 < width; ++j) {
                    win[j] = win[j + 1];
                    acc += bf16_to_float(win[j]) * wc[j];
                }
                uint32_t bits;
                memcpy(&bits, &xv, sizeof bits);
                win[width - 1] = (uint16_t)(bits >> 16);
            } else {
                float *win = (float *)window + row;
                for (long j = 0; j + 1 < width; ++j) {
                    win[j] = win[j + 1];
                    acc += win[j] * wc[j];
                }
                win[width - 1] = xv;
            }
            o[ci] = acc + xv * wc[width - 1];
        }
        long ci = 0;  /* SiLU over the row, 16 channels at a time where the compiler targets AVX-512 */
#if defined(__AVX512F__)
        for (; ci + 16 <= c; ci += 16) _mm512_storeu_ps(o + ci, silu16(_mm512_loadu_ps(o + ci)));
#endif
        for (; ci < c; ++ci) o[ci] = silu(o[ci]);
    }
}

/* One batch row of a Mamba-2 layer's decode step between its convolution and out_proj, in place on the
 * row's state (h, p, n): x (h·p), Bm and Cm (g·n) the convolution's output; dt (h), z (h·p); o (h·p).
 * The formulas are those of ssmkit_mamba2_step below. */
static void mamba2_row(float *state, const float *x, const float *Bm, const float *Cm, const float *dt,
                       const float *dt_bias, const float *A, float dt_min, float dt_max, const float *D,
                       int D_per_channel, const float *zr, const float *norm_w, long group, float eps, int round_bf16,
                       float *o, long h, long p, long n, long g, int threads) {
    const long heads_per_group = h / g, I = h * p;
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && I * n >= (1L << 16))
    for (long hi = 0; hi < h; ++hi) {
        float delta = softplus(dt[hi] + (dt_bias ? dt_bias[hi] : 0.f));
        delta = delta < dt_min ? dt_min : (delta > dt_max ? dt_max : delta);
        const float decay = expf(delta * A[hi]);
        const float *Bv = Bm + (hi / heads_per_group) * n, *Cv = Cm + (hi / heads_per_group) * n;
        for (long pi = 0; pi < p; ++pi) {
            const long c = hi * p + pi;
            float acc = state_row_update(state + c * n, decay, delta * x[c], Bv, Cv, n);
            if (D) acc += D[D_per_channel ? c : hi] * x[c];
            o[c] = round_bf16 ? to_bf16_rne(acc) : acc;
        }
    }
    long c = 0;
#if defined(__AVX512F__)
    for (; c + 16 <= I; c += 16)
        _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_loadu_ps(o + c), silu16(_mm512_loadu_ps(zr + c))));
#endif
    for (; c < I; ++c) o[c] *= silu(zr[c]);
    if (!norm_w) return;
    for (long start = 0; start < I; start += group) {
        float ss = 0.f;
        for (long k = start; k < start + group; ++k) ss += o[k] * o[k];
        const float scale = 1.f / sqrtf(ss / (float)group + eps);
        for (long k = start; k < start + group; ++k) o[k] = o[k] * scale * norm_w[k];
    }
}

/* A Mamba-2 layer's decode step between its convolution and out_proj, in place on the state:
 *
 *   delta[h] = clamp(softplus(dt[b, h] + dt_bias[h]), dt_min, dt_max);  decay = exp(delta[h] * A[h])
 *   state[h, p, :] = state[h, p, :] * decay + (delta[h] * x[h, p]) * B[g(h), :]
 *   y[h, p] = state[h, p, :] . C[g(h), :] + D[h or h, p] * x[h, p]         (rounded to bfloat16 if round_bf16)
 *   out = y * silu(z), then, with norm_w, RMSNorm over groups of `group` channels (eps) times norm_w
 *
 * xbc (b, ·) the convolution's output with row stride xbc_stride: x (h·p) at 0, B (g·n) at h·p, C (g·n)
 * after; dt (b, h) and z (b, h·p) with row strides; dt_bias (h,) or NULL; A (h,); D (h,) or (h·p,)
 * (D_per_channel), or NULL; norm_w (h·p,) or NULL; out (b, h·p) float32.
 */
void ssmkit_mamba2_step(float *state, const float *xbc, long xbc_stride, const float *dt, long dt_stride,
                        const float *dt_bias, const float *A, float dt_min, float dt_max, const float *D,
                        int D_per_channel, const float *z, long z_stride, const float *norm_w, long group, float eps,
                        int round_bf16, float *out, long b, long h, long p, long n, long g, int threads) {
    const long I = h * p;
    for (long bi = 0; bi < b; ++bi) {
        const float *x = xbc + bi * xbc_stride;
        mamba2_row(state + bi * I * n, x, x + I, x + I + g * n, dt + bi * dt_stride, dt_bias, A, dt_min, dt_max, D,
                   D_per_channel, z + bi * z_stride, norm_w, group, eps, round_bf16, out + bi * I, h, p, n, g,
                   threads);
    }
}

/* A Mamba-2 layer's whole decode step between in_proj and out_proj, from in_proj's output:
 *
 *   (z, xBC, dt) = zxbcdt[b]                          (each rounded to bfloat16 first with bf16 = 1)
 *   xBC = silu(conv step of xBC over the window)      ssmkit_conv_step (rounded to bfloat16 with bf16 = 1)
 *   out = the step of ssmkit_mamba2_step from xBC, dt, z (with bf16 = 1 and a gated norm, y rounded to
 *         bfloat16 before it: the layer's scan output; without the norm the scan applies the gate itself),
 *         then rounded to bfloat16 with bf16 = 1 (out_proj's input in a bfloat16 layer)
 *
 * The rounding points are a bfloat16 layer's, where every tensor between its ops is bfloat16 and the
 * arithmetic float32. zxbcdt (b, ·) float32 with row stride zx_stride: z (h·p) at 0, xBC (c = h·p + 2·g·n)
 * after, dt (h) after; window (b, c, width) float32 (bf16 = 0) or bfloat16 bits (bf16 = 1); conv_w (c, width),
 * conv_b (c,) or NULL; scratch (2·c + h·p + h) float32 (the row's convolution output and rounded inputs);
 * out (b, h·p) float32. One call replaces the convolution's and the state step's calls and the casts
 * between them.
 */
void ssmkit_mamba2_conv_step(float *state, void *window, const float *zxbcdt, long zx_stride, const float *conv_w,
                             const float *conv_b, long width, const float *dt_bias, const float *A, float dt_min,
                             float dt_max, const float *D, int D_per_channel, const float *norm_w, long group,
                             float eps, int bf16, float *scratch, float *out, long b, long h, long p, long n, long g,
                             int threads) {
    const long I = h * p, c = I + 2 * g * n;
    float *xbc = scratch, *xr = scratch + c, *zr = xr + c, *dtr = zr + I;
    for (long bi = 0; bi < b; ++bi) {
        const float *row = zxbcdt + bi * zx_stride, *z = row, *xin = row + I, *dt = row + I + c;
        if (bf16) {  /* in_proj's output as the bfloat16 layer holds it */
            for (long k = 0; k < I; ++k) zr[k] = to_bf16_rne(z[k]);
            for (long k = 0; k < h; ++k) dtr[k] = to_bf16_rne(dt[k]);
            for (long k = 0; k < c; ++k) xr[k] = to_bf16_rne(xin[k]);
            z = zr, dt = dtr, xin = xr;
        }
        ssmkit_conv_step(window, bf16, xin, 0, conv_w, conv_b, xbc, 1, c, width);
        if (bf16)
            for (long k = 0; k < c; ++k) xbc[k] = to_bf16_rne(xbc[k]);
        float *o = out + bi * I;
        mamba2_row(state + bi * I * n, xbc, xbc + I, xbc + I + g * n, dt, dt_bias, A, dt_min, dt_max, D,
                   D_per_channel, z, norm_w, group, eps, bf16 && norm_w, o, h, p, n, g, threads);
        if (bf16)
            for (long k = 0; k < I; ++k) o[k] = to_bf16_rne(o[k]);
        window = bf16 ? (void *)((uint16_t *)window + c * width) : (void *)((float *)window + c * width);
    }
}

/* A whole pre-norm Mamba-2 block's decode step with a float32 residual stream, in one call:
 *
 *   hn  = RMSNorm(r[b]) * norm_w                      (eps; rounded to bfloat16 with bf16 = 1)
 *   zx  = in_proj(hn)                                 (weight in_w of kind in_kind, see gemv_any)
 *   o   = ssmkit_mamba2_conv_step(zx)                 (the convolution and the state step, window and state
 *                                                      updated in place; bfloat16 rounding points with bf16 = 1)
 *   out[b] = r[b] + out_proj(o)                       (out_proj's output rounded to bfloat16 with bf16 = 1)
 *
 * r, out (b, H) float32 (out may be r); in_w (nin, H), out_w (H, I) with scales (int8) and biases or NULL;
 * scratch (b·(H + nin + I) + 2·c + I + h) float32. At batch 1 a block's step is then one call that streams
 * its two weight matrices and its state once, with none of the per-op overhead between them.
 */
void ssmkit_mamba2_layer_step(float *r, float *out_r, long H, const float *norm_w, float norm_eps, int in_kind,
                              const void *in_w, const float *in_scale, const float *in_bias, long nin, int out_kind,
                              const void *out_w, const float *out_scale, const float *out_bias, float *state,
                              void *window, const float *conv_w, const float *conv_b, long width,
                              const float *dt_bias, const float *A, float dt_min, float dt_max, const float *D,
                              int D_per_channel, const float *gnorm_w, long group, float eps, int bf16,
                              float *scratch, long b, long h, long p, long n, long g, int threads) {
    const long I = h * p;
    float *hn = scratch, *zx = hn + b * H, *o = zx + b * nin, *rest = o + b * I;
    for (long bi = 0; bi < b; ++bi) {
        const float *ri = r + bi * H;
        float ss = 0.f;
        #pragma omp simd reduction(+:ss)
        for (long k = 0; k < H; ++k) ss += ri[k] * ri[k];
        const float scale = 1.f / sqrtf(ss / (float)H + norm_eps);
        for (long k = 0; k < H; ++k) {
            const float v = ri[k] * scale * norm_w[k];
            hn[bi * H + k] = bf16 ? to_bf16_rne(v) : v;
        }
    }
    ssmkit_gemv_any(in_kind, in_w, hn, in_scale, in_bias, zx, b, nin, H, threads);
    ssmkit_mamba2_conv_step(state, window, zx, nin, conv_w, conv_b, width, dt_bias, A, dt_min, dt_max, D,
                            D_per_channel, gnorm_w, group, eps, bf16, rest, o, b, h, p, n, g, threads);
    float *y = hn;  /* hn is read; its b·H floats take out_proj's output */
    ssmkit_gemv_any(out_kind, out_w, o, out_scale, out_bias, y, b, H, I, threads);
    for (long k = 0; k < b * H; ++k) out_r[k] = r[k] + (bf16 ? to_bf16_rne(y[k]) : y[k]);
}
