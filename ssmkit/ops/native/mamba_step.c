/* A whole pre-norm Mamba(-1) block's decode step in one call (built with gemv.c and steps.c by
 * ssmkit/ops/native/__init__.py; bound by ssmkit/ops/state_update/native.py's native_mamba_layer_step):
 *
 *   hn      = RMSNorm(r[b]) * norm_w                 (norm_eps)
 *   (x, z)  = in_proj(hn)                            (b, I) each
 *   x       = silu(conv step of x over the window)   ssmkit_conv_step, the window shifted in place
 *   (dt, B, C) = x_proj(x)                           (b, R), (b, n), (b, n)
 *   y       = the selective step from x, dt, B, C, z ssmkit_selective_step_ex: dt_proj, softplus(dt + dt_bias),
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

typedef struct {
    const void *w;       /* (rows, cols) row-major: float32, bfloat16 bits or int8 */
    const float *scale;  /* (rows,) for int8, else NULL */
    const float *bias;   /* (rows,) or NULL */
    int kind;            /* 0 float32, 1 bfloat16, 2 int8: ssmkit_gemv_any's */
} Matrix;

/* A block's parameters, bound once (ssmkit/ops/state_update/native.py mirrors it field by field and checks
 * its size against ssmkit_mamba_layer_size). Shapes: H d_model, I d_inner, n d_state, R dt_rank, width the
 * convolution's; norm_w (H,); in_proj (2I, H), x_proj (R + 2n, I), out_proj (H, I); dt_w16 (ceil(I / 16), R,
 * 16) dt_proj's weight in blocks of 16 channels (ssmkit_selective_step_ex), float32 or bfloat16 bits
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
    ssmkit_selective_step_ex(state, xc, I, dbc, nx, L->dt_w16, L->dt_bf16, L->bf16, R, L->dt_bias, L->A, dbc + R,
                             dbc + R + n, nx, L->D, xz + I, 2 * I, y, b, I, n, threads);
    if (L->bf16) round_bf16(y, b * I);
    gemv(&L->out_proj, y, hn, b, H, I, threads);  /* hn is read: its b·H floats take out_proj's output */
    for (long k = 0; k < b * H; ++k) out[k] = r[k] + (L->bf16 ? to_bf16_rne(hn[k]) : hn[k]);
}
