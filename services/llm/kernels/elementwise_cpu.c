/* RMSNorm (with its residual add), rotary and SiLU-and-mul for decode-sized CPU steps, bit for bit the eager
 * torch references (kernels/norm.py, rotary.py, activation.py): each value is rounded where torch rounds it
 * (bf16 round-to-nearest-even after every bf16 op), the RMS sum of squares is added in the order of torch's
 * vectorized sum (lanes of `lanes` floats, 4 interleaved accumulators, then the lanes in order), and SiLU's exp
 * is SLEEF's expf_u10 (torch's vectorized exp) with libm's expf on the elements torch leaves to its scalar loop.
 * Built with -ffp-contract=off: torch never fuses a multiply into an add where this code writes them apart.
 * Branch-free selects and dtype-specialized loops so that gcc vectorizes them.
 * dtype: 0 = fp32, 1 = bf16. Row strides are in elements; the last dimension is contiguous. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define MAX_LANES 16

static inline float load(const void *p, int64_t i, int dtype) {
    return dtype ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store(void *p, int64_t i, float v, int dtype) {
    if (dtype) ((uint16_t *)p)[i] = float_to_bf16(v);
    else ((float *)p)[i] = v;
}

/* The value as the model's dtype holds it: rounded to bf16 for bf16, unchanged for fp32. */
static inline float in_dtype(float v, int dtype) {
    return dtype ? bf16_to_float(float_to_bf16(v)) : v;
}

static int64_t ceil_log2(int64_t x) {
    if (x <= 2) return 1;
    int64_t bits = 0;
    for (uint64_t v = (uint64_t)(x - 1); v; v >>= 1) bits++;
    return bits;
}

/* torch's sum of a contiguous fp32 row (SumKernel.cpp: vectorized_inner_sum, row_sum, multi_row_sum). */
static float torch_row_sum(const float *x, int64_t n, int lanes) {
    const int64_t vec_size = n / lanes, size_ilp = vec_size / 4;
    const int64_t level_power = ceil_log2(size_ilp) / 4 > 4 ? ceil_log2(size_ilp) / 4 : 4;
    const int64_t level_step = (int64_t)1 << level_power, level_mask = level_step - 1;
    float acc[4][4][MAX_LANES];
    memset(acc, 0, sizeof(acc));
    int64_t i = 0;
    for (; i + level_step <= size_ilp;) {
        for (int64_t j = 0; j < level_step; ++j, ++i)
            for (int k = 0; k < 4; ++k)
                for (int l = 0; l < lanes; ++l) acc[0][k][l] += x[(i * 4 + k) * lanes + l];
        for (int j = 1; j < 4; ++j) {
            for (int k = 0; k < 4; ++k)
                for (int l = 0; l < lanes; ++l) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0f;
                }
            if ((i & (level_mask << (j * level_power))) != 0) break;
        }
    }
    for (; i < size_ilp; ++i)
        for (int k = 0; k < 4; ++k)
            for (int l = 0; l < lanes; ++l) acc[0][k][l] += x[(i * 4 + k) * lanes + l];
    for (int j = 1; j < 4; ++j)
        for (int k = 0; k < 4; ++k)
            for (int l = 0; l < lanes; ++l) acc[0][k][l] += acc[j][k][l];
    for (int64_t v = size_ilp * 4; v < vec_size; ++v)
        for (int l = 0; l < lanes; ++l) acc[0][0][l] += x[v * lanes + l];
    for (int k = 1; k < 4; ++k)
        for (int l = 0; l < lanes; ++l) acc[0][0][l] += acc[0][k][l];
    float total = 0.0f;
    for (int64_t e = vec_size * lanes; e < n; ++e) total += x[e];
    for (int l = 0; l < lanes; ++l) total += acc[0][0][l];
    return total;
}

/* out[r] = weight * dtype(x * rsqrt(mean(x^2) + eps)), x = in[r] (+ residual[r], rounded, also written to
 * summed[r] when given). `squares` is scratch of n floats. */
static inline __attribute__((always_inline)) void norm_row(const void *in, const void *residual, void *summed, const void *weight, void *out, int64_t n,
                     float eps, int dtype, int lanes, float *row, float *squares) {
    for (int64_t e = 0; e < n; ++e) {
        float v = load(in, e, dtype);
        if (residual) {
            v = in_dtype(v + load(residual, e, dtype), dtype);
            store(summed, e, v, dtype);
        }
        row[e] = v;
        squares[e] = v * v;
    }
    const float mean = torch_row_sum(squares, n, lanes) / (float)n;
    const float scale = 1.0f / sqrtf(mean + eps);
    for (int64_t e = 0; e < n; ++e)
        store(out, e, load(weight, e, dtype) * in_dtype(row[e] * scale, dtype), dtype);
}

int rms_norm(const void *x, int64_t x_stride, const void *residual, int64_t residual_stride, void *summed,
             const void *weight, void *out, int64_t rows, int64_t n, float eps, int dtype, int lanes) {
    if (lanes > MAX_LANES || n > 16384) return 1;
    float row[16384], squares[16384];
    const int64_t size = dtype ? 2 : 4;
    for (int64_t r = 0; r < rows; ++r) {
        const void *in = (const char *)x + r * x_stride * size;
        const void *res = residual ? (const char *)residual + r * residual_stride * size : NULL;
        void *sum = residual ? (char *)summed + r * n * size : NULL, *o = (char *)out + r * n * size;
        if (dtype) norm_row(in, res, sum, weight, o, n, eps, 1, lanes, row, squares);
        else norm_row(in, res, sum, weight, o, n, eps, 0, lanes, row, squares);
    }
    return 0;
}

/* Rotate-half on `heads` heads of one token: x1' = x1 c - x2 s, x2' = x2 c + x1 s, each product and sum rounded
 * to the dtype (torch's eager ops). */
static inline __attribute__((always_inline)) void rotate_heads(void *x, int64_t heads, int64_t head_dim, const float *cos, const float *sin, int dtype) {
    const int64_t half = head_dim / 2;
    for (int64_t h = 0; h < heads; ++h)
        for (int64_t e = 0; e < half; ++e) {
            const int64_t i1 = h * head_dim + e, i2 = i1 + half;
            const float x1 = load(x, i1, dtype), x2 = load(x, i2, dtype);
            const float first = in_dtype(x1 * cos[e], dtype) - in_dtype(x2 * sin[e], dtype);
            const float second = in_dtype(x2 * cos[e], dtype) + in_dtype(x1 * sin[e], dtype);
            store(x, i1, first, dtype);
            store(x, i2, second, dtype);
        }
}

int rotary(void *q, int64_t q_stride, int64_t q_heads, void *k, int64_t k_stride, int64_t k_heads,
           const int64_t *positions, const float *cos_sin, int64_t rows, int64_t head_dim, int dtype) {
    if (head_dim > 1024 || head_dim % 2) return 1;
    const int64_t half = head_dim / 2, size = dtype ? 2 : 4;
    float cos[512], sin[512];
    for (int64_t r = 0; r < rows; ++r) {
        const float *table = cos_sin + positions[r] * head_dim;
        for (int64_t e = 0; e < half; ++e) {
            cos[e] = in_dtype(table[e], dtype);
            sin[e] = in_dtype(table[half + e], dtype);
        }
        if (dtype) {
            rotate_heads((char *)q + r * q_stride * size, q_heads, head_dim, cos, sin, 1);
            rotate_heads((char *)k + r * k_stride * size, k_heads, head_dim, cos, sin, 1);
        } else {
            rotate_heads((char *)q + r * q_stride * size, q_heads, head_dim, cos, sin, 0);
            rotate_heads((char *)k + r * k_stride * size, k_heads, head_dim, cos, sin, 0);
        }
    }
    return 0;
}

/* SLEEF's xexpf (u10), as torch's Vectorized<float>::exp computes it with FMA. */
static inline float sleef_expf(float d) {
    const int q = (int)rintf(d * 1.442695040888963407359924681001892137426645954152985934135449406931f);
    float s = fmaf((float)q, -0.693145751953125f, d);
    s = fmaf((float)q, -1.428606765330187045e-06f, s);
    float u = 0.000198527617612853646278381f;
    u = fmaf(u, s, 0.00139304355252534151077271f);
    u = fmaf(u, s, 0.00833336077630519866943359f);
    u = fmaf(u, s, 0.0416664853692054748535156f);
    u = fmaf(u, s, 0.166666671633720397949219f);
    u = fmaf(u, s, 0.5f);
    u = 1.0f + fmaf(s * s, u, s);
    uint32_t b1 = (uint32_t)((q >> 1) + 0x7f) << 23, b2 = (uint32_t)((q - (q >> 1)) + 0x7f) << 23;
    float p1, p2;
    memcpy(&p1, &b1, 4);
    memcpy(&p2, &b2, 4);
    u = u * p1 * p2;
    u = d < -104.0f ? 0.0f : u;
    return d > 100.0f ? INFINITY : u;
}

/* out[r] = dtype(silu(gate)) * up over [rows, 2 * n] inputs; torch's elementwise loop runs the first
 * n - n % vector_block elements of a row vectorized (SLEEF exp), the rest in its scalar loop (libm expf). */
static inline __attribute__((always_inline)) void silu_rows(const void *x, int64_t x_stride, void *out,
                                                            int64_t rows, int64_t n, int dtype,
                                                            int64_t vector_block) {
    const int64_t size = dtype ? 2 : 4, vectorized = n - n % vector_block;
    for (int64_t r = 0; r < rows; ++r) {
        const char *gate = (const char *)x + r * x_stride * size, *up = gate + n * size;
        char *o = (char *)out + r * n * size;
        for (int64_t e = 0; e < vectorized; ++e) {
            const float g = load(gate, e, dtype);
            store(o, e, in_dtype(g / (1.0f + sleef_expf(-g)), dtype) * load(up, e, dtype), dtype);
        }
        for (int64_t e = vectorized; e < n; ++e) {
            const float g = load(gate, e, dtype);
            store(o, e, in_dtype(g / (1.0f + expf(-g)), dtype) * load(up, e, dtype), dtype);
        }
    }
}

int silu_and_mul(const void *x, int64_t x_stride, void *out, int64_t rows, int64_t n, int dtype,
                 int64_t vector_block) {
    if (dtype) silu_rows(x, x_stride, out, rows, n, 1, vector_block);
    else silu_rows(x, x_stride, out, rows, n, 0, vector_block);
    return 0;
}
