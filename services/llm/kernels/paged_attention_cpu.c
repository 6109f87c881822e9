/* Decode attention over the paged KV cache, reading each sequence's blocks in place (no gather copy).

   For each decode row and KV head: the query heads that share the KV head (GQA) are held in fp32, every key of
   the row's blocks is loaded once and dotted with all of them, the softmax is streamed block by block (running
   max and sum, fp32) and p·v is accumulated in fp32; the row's output is written once, in the model's dtype.
   The cache is fp32, bf16 or fp8 e4m3 (widened on read; its scale is applied by the caller). The torch
   reference is `attention.paged_attention_reference`; `paged_attention_cpu.py` builds, loads and calls this.
   The (row, KV head) pairs are independent jobs shared out among torch's OpenMP threads, so any thread count
   gives the same bits. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1, DTYPE_FP8_E4M3 = 2 };

#define MAX_GROUP 16   /* query heads per KV head */
#define MAX_HEAD_DIM 256

static inline float fp8_e4m3_to_f32(uint8_t x) {
    uint32_t magnitude = x & 0x7fu;
    float f;
    if (magnitude < 8) {
        f = (float)magnitude * 0x1p-9f;  /* subnormal: m/8 * 2^-6 */
    } else {
        uint32_t bits = (magnitude << 20) + (120u << 23);  /* exponent bias 7 -> 127 */
        memcpy(&f, &bits, 4);
    }
    return (x & 0x80u) ? -f : f;
}

static inline float load_scalar(const void *base, int64_t i, int dtype) {
    switch (dtype) {
    case DTYPE_BF16: return bf16_to_float(((const uint16_t *)base)[i]);
    case DTYPE_FP8_E4M3: return fp8_e4m3_to_f32(((const uint8_t *)base)[i]);
    default: return ((const float *)base)[i];
    }
}

#if defined(__AVX512F__)
/* 16 elements from `base + i`, widened to fp32. */
static inline __m512 load16(const void *base, int64_t i, int dtype) {
    if (dtype == DTYPE_BF16) {
        __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    }
    if (dtype == DTYPE_FP8_E4M3) {
        __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((const uint8_t *)base + i)));
        __m512i magnitude = _mm512_and_si512(x, _mm512_set1_epi32(0x7f));
        __m512 normal = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(magnitude, 20),
                                                              _mm512_set1_epi32(120 << 23)));
        __m512 subnormal = _mm512_mul_ps(_mm512_cvtepi32_ps(magnitude), _mm512_set1_ps(0x1p-9f));
        __mmask16 small = _mm512_cmplt_epi32_mask(magnitude, _mm512_set1_epi32(8));
        __m512 f = _mm512_mask_blend_ps(small, normal, subnormal);
        __m512i sign = _mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x80)), 24);
        return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(f), sign));
    }
    return _mm512_loadu_ps((const float *)base + i);
}

/* 16 floats rounded to bf16 as torch's cast rounds them: to nearest even (add 0x7fff plus the lowest kept bit, keep
   the top half). */
static inline __m256i round16_to_bf16(__m512 x) {
    __m512i bits = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
}

/* e^x for x <= 0 (scores minus their running max): 2^n * p(r), r in [-ln2/2, ln2/2], relative error ~1e-7. */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

#if defined(__AVX512F__)
/* Lane j of the result is the sum of the 16 lanes of v[j]: a transpose-and-add tree, 45 instructions for the 16
   sums instead of one horizontal reduction (about 8 dependent instructions) per key. */
static inline __m512 sum_lanes16(const __m512 *v) {
    __m512 pairs[8], quads[4], halves[2];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3) of v[2i], v[2i+1] */
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                                 _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* per 128-bit lane: that lane's sums of v[4i..4i+3] */
        __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
        quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++)  /* lanes: quads[2i] over 128-bit lanes 0+1 and 2+3, then quads[2i+1]'s */
        halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

#if defined(__AVX512BF16__)
/* key_scores's bf16 products for one query head and 16 keys (the first n of them live), stored scaled at `out`: each
   key's dot product is its own chain of _mm512_dpbf16_ps over the head from zero (exact products, fp32 sums), the
   16 reduced together by sum_lanes16. Inlined with head_dim a constant (bf16_scores), the 16 chains stay in
   registers instead of going through the stack. */
static inline __attribute__((always_inline)) void bf16_scores16(const uint16_t *q, const uint16_t *k_cache,
                                                                int64_t key, int64_t token_stride, int n,
                                                                int head_dim, float scale, float *out) {
    __m512 dots[16];
#pragma GCC unroll 16
    for (int t = 0; t < 16; t++) {
        __m512 dot = _mm512_setzero_ps();
        if (t < n)
            for (int d = 0; d < head_dim; d += 32)
                dot = _mm512_dpbf16_ps(dot, (__m512bh)_mm512_loadu_si512(q + d),
                                       (__m512bh)_mm512_loadu_si512(k_cache + key + (int64_t)t * token_stride + d));
        dots[t] = dot;
    }
    _mm512_mask_storeu_ps(out, (__mmask16)((1u << n) - 1), _mm512_mul_ps(sum_lanes16(dots), _mm512_set1_ps(scale)));
}

/* key_scores for bf16 queries and cache (head_dim a multiple of 32), with the common head sizes as constants. */
static void bf16_scores(const uint16_t *q_heads, int group, int head_dim, const uint16_t *k_cache, int64_t key,
                        int64_t token_stride, int len, float scale, float *scores, int score_stride) {
#define SCORES(D)                                                                                               \
    for (int first = 0; first < len; first += 16)                                                               \
        for (int g = 0; g < group; g++)                                                                         \
            bf16_scores16(q_heads + g * (D), k_cache, key + (int64_t)first * token_stride, token_stride,        \
                          len - first < 16 ? len - first : 16, D, scale, scores + g * score_stride + first);
#define SCORES_CASE(D) case D: SCORES(D) return;
    switch (head_dim) {
#if !defined(PAGED_ATTENTION_GENERIC)  /* defined only by a test build: every shape on the generic code */
        SCORES_CASE(32) SCORES_CASE(64) SCORES_CASE(96) SCORES_CASE(128) SCORES_CASE(256)
#endif
    default:
        SCORES(head_dim)
    }
#undef SCORES_CASE
#undef SCORES
}
#endif

/* scores[g * score_stride + t] = scale * q_g · k_t for the block's first `len` keys (one KV head's, `key` the first
   key's element, `token_stride` apart), g over the `group` query heads that share it. The softmax scale is
   applied to each dot product, so queries are used as they come (bf16 pairs for _mm512_dpbf16_ps where query
   and cache are both bf16: exact products, fp32 sums). */
static void key_scores(const void *q_heads, int io_dtype, const float *q_f32, int group, int head_dim,
                       const void *k_cache, int cache_dtype, int64_t key, int64_t token_stride, int len, float scale,
                       float *scores, int score_stride) {
#if defined(__AVX512F__)
    if (head_dim % 16 == 0) {
#if defined(__AVX512BF16__)
        if (io_dtype == DTYPE_BF16 && cache_dtype == DTYPE_BF16 && head_dim % 32 == 0) {
            bf16_scores((const uint16_t *)q_heads, group, head_dim, (const uint16_t *)k_cache, key, token_stride, len,
                        scale, scores, score_stride);
            return;
        }
#endif
        for (int first = 0; first < len; first += 16) {
            const int n = len - first < 16 ? len - first : 16;
            for (int g = 0; g < group; g++) {
                __m512 dots[16];
                for (int t = 0; t < 16; t++) {
                    __m512 dot = _mm512_setzero_ps();
                    const int64_t k = key + (int64_t)(first + t) * token_stride;
                    if (t >= n) {
                        dots[t] = dot;
                        continue;
                    }
                    for (int d = 0; d < head_dim; d += 16)
                        dot = _mm512_fmadd_ps(_mm512_loadu_ps(q_f32 + g * head_dim + d),
                                              load16(k_cache, k + d, cache_dtype), dot);
                    dots[t] = dot;
                }
                const __m512 sums = _mm512_mul_ps(sum_lanes16(dots), _mm512_set1_ps(scale));
                _mm512_mask_storeu_ps(scores + g * score_stride + first, (__mmask16)((1u << n) - 1), sums);
            }
        }
        return;
    }
#endif
    (void)q_heads;
    (void)io_dtype;
    for (int t = 0; t < len; t++)
        for (int g = 0; g < group; g++) {
            float dot = 0.0f;
            for (int d = 0; d < head_dim; d++)
                dot += q_f32[g * head_dim + d] * load_scalar(k_cache, key + t * token_stride + d, cache_dtype);
            scores[g * score_stride + t] = dot * scale;
        }
}

#if defined(__AVX512F__)
#define ACC_CHUNKS 4      /* 16-wide slices of the head dimension accumulated together in one pass over the block */
#define MAX_ACC_CHAINS 16 /* accumulator registers a pass may use (of 32) */

/* One pass of accumulate_values over `chunks` 16-wide slices starting at dimension d: every value slice is loaded
   once per token for all query heads, and the group x chunks accumulators are independent FMA chains, so the
   FMA latency is hidden (one slice at a time left `group` chains, 3 for a 9/3-head model: a third of the FMA
   rate). Each acc element still sums the tokens in order, so the result is the same bit for bit. Inlined where
   group and chunks are constants (accumulate_values's cases), the accumulators and value slices stay in
   registers; with either a variable, gcc keeps both arrays on the stack and every FMA goes through memory (at 32
   sequences of about 300 tokens, 9/3 heads of 64, one thread: this and bf16_scores took a layer's decode
   attention from 0.50 to 0.27 ms with the KV in cache, and from 0.95 to 0.63 ms from memory). */
static inline __attribute__((always_inline)) void accumulate_slices(const float *weights, int weight_stride,
                                                                    int len, int group, int head_dim,
                                                                    const void *v_cache, int cache_dtype,
                                                                    int64_t first_value, int64_t token_stride,
                                                                    float *acc, int d, int chunks) {
    __m512 sums[MAX_ACC_CHAINS];
    for (int g = 0; g < group; g++)
        for (int c = 0; c < chunks; c++) sums[g * chunks + c] = _mm512_loadu_ps(acc + g * head_dim + d + 16 * c);
    for (int t = 0; t < len; t++) {
        __m512 v[ACC_CHUNKS];
        for (int c = 0; c < chunks; c++)
            v[c] = load16(v_cache, first_value + t * token_stride + d + 16 * c, cache_dtype);
        for (int g = 0; g < group; g++) {
            const __m512 w = _mm512_set1_ps(weights[g * weight_stride + t]);
            for (int c = 0; c < chunks; c++) sums[g * chunks + c] = _mm512_fmadd_ps(w, v[c], sums[g * chunks + c]);
        }
    }
    for (int g = 0; g < group; g++)
        for (int c = 0; c < chunks; c++) _mm512_storeu_ps(acc + g * head_dim + d + 16 * c, sums[g * chunks + c]);
}
#endif

/* acc[g] += sum over the block's tokens t of weights[g][t] * v_t, each value loaded once for all query heads. */
static void accumulate_values(const float *weights, int weight_stride, int len, int group, int head_dim,
                              const void *v_cache, int cache_dtype, int64_t first_value, int64_t token_stride,
                              float *acc) {
#if defined(__AVX512F__)
    if (head_dim % 16 == 0 && group <= MAX_GROUP) {
        int per_pass = MAX_ACC_CHAINS / group;  /* slices a pass can hold for every query head: 1 to ACC_CHUNKS */
        per_pass = per_pass < 1 ? 1 : per_pass > ACC_CHUNKS ? ACC_CHUNKS : per_pass;
        for (int d = 0; d < head_dim; d += 16 * per_pass) {
            const int left = (head_dim - d) / 16, chunks = left < per_pass ? left : per_pass;
#define ACC_CASE(G, C)                                                                                          \
    case (G) * (ACC_CHUNKS + 1) + (C):                                                                          \
        accumulate_slices(weights, weight_stride, len, G, head_dim, v_cache, cache_dtype, first_value,         \
                          token_stride, acc, d, C);                                                             \
        break;
            switch (group * (ACC_CHUNKS + 1) + chunks) {
#if !defined(PAGED_ATTENTION_GENERIC)
                ACC_CASE(1, 1) ACC_CASE(1, 2) ACC_CASE(1, 3) ACC_CASE(1, 4)
                ACC_CASE(2, 1) ACC_CASE(2, 2) ACC_CASE(2, 3) ACC_CASE(2, 4)
                ACC_CASE(3, 1) ACC_CASE(3, 2) ACC_CASE(3, 3) ACC_CASE(3, 4)
                ACC_CASE(4, 1) ACC_CASE(4, 2) ACC_CASE(4, 3) ACC_CASE(4, 4)
                ACC_CASE(5, 1) ACC_CASE(5, 2) ACC_CASE(5, 3)
                ACC_CASE(6, 1) ACC_CASE(6, 2) ACC_CASE(7, 1) ACC_CASE(7, 2) ACC_CASE(8, 1) ACC_CASE(8, 2)
#endif
            default:
                accumulate_slices(weights, weight_stride, len, group, head_dim, v_cache, cache_dtype, first_value,
                                  token_stride, acc, d, chunks);
            }
#undef ACC_CASE
        }
        return;
    }
#endif
    for (int t = 0; t < len; t++)
        for (int d = 0; d < head_dim; d++) {
            const float v = load_scalar(v_cache, first_value + t * token_stride + d, cache_dtype);
            for (int g = 0; g < group; g++) acc[g * head_dim + d] += weights[g * weight_stride + t] * v;
        }
}

/* Turns a block's scores into weights against the running max, rescales what came before; returns the sum. */
static float softmax_block(float *s, int len, float *running_max, float *running_sum, float *acc, int head_dim) {
    float block_max = *running_max;
    for (int t = 0; t < len; t++) block_max = s[t] > block_max ? s[t] : block_max;
    const float correction = expf(*running_max - block_max);
    *running_max = block_max;
    float sum = 0.0f;
    int t = 0;
#if defined(__AVX512F__)
    __m512 sums = _mm512_setzero_ps();
    for (; t < len; t += 16) {
        const __mmask16 live = len - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (len - t)) - 1);
        __m512 p = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + t), _mm512_set1_ps(block_max)));
        _mm512_mask_storeu_ps(s + t, live, p);
        sums = _mm512_add_ps(sums, _mm512_maskz_mov_ps(live, p));
    }
    sum = _mm512_reduce_add_ps(sums);
#endif
    for (; t < len; t++) {
        s[t] = expf(s[t] - block_max);
        sum += s[t];
    }
    *running_sum = *running_sum * correction + sum;
    if (correction != 1.0f)
        for (int d = 0; d < head_dim; d++) acc[d] *= correction;
    return sum;
}

static inline void prefetch(const void *cache, int64_t first, int64_t elements, int element_size) {
#if defined(__AVX512F__)
    const char *p = (const char *)cache + first * element_size;
    for (int64_t offset = 0; offset < elements * element_size; offset += 64) _mm_prefetch(p + offset, _MM_HINT_T0);
#else
    (void)cache, (void)first, (void)elements, (void)element_size;
#endif
}

/* n elements widened to fp32 */
static void widen(const void *src, int64_t first, int io_dtype, int n, float *dst) {
    int e = 0;
#if defined(__AVX512F__)
    for (; e + 16 <= n; e += 16) _mm512_storeu_ps(dst + e, load16(src, first + e, io_dtype));
#endif
    for (; e < n; e++) dst[e] = load_scalar(src, first + e, io_dtype);
}

/* n elements of acc / sums[e / head_dim], written in the model's dtype */
static void write_output(const float *acc, const float *sums, int head_dim, int n, void *out, int64_t first,
                         int io_dtype) {
    int e = 0;
#if defined(__AVX512F__)
    if (head_dim % 16 == 0)
        for (; e < n; e += 16) {
            __m512 value = _mm512_div_ps(_mm512_loadu_ps(acc + e), _mm512_set1_ps(sums[e / head_dim]));
            if (io_dtype == DTYPE_BF16) {
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + first + e), round16_to_bf16(value));
            } else {
                _mm512_storeu_ps((float *)out + first + e, value);
            }
        }
#endif
    for (; e < n; e++) {
        const float value = acc[e] / sums[e / head_dim];
        if (io_dtype == DTYPE_BF16)
            ((uint16_t *)out)[first + e] = float_to_bf16(value);
        else
            ((float *)out)[first + e] = value;
    }
}

static int element_size(int dtype) { return dtype == DTYPE_F32 ? 4 : dtype == DTYPE_BF16 ? 2 : 1; }

/* One decode row's attention for one KV head: the `group` query heads that share it (queries at `q_heads`, output
   at `out_first`). Its blocks are walked in order, the next block's keys and values prefetched as this one is
   read. */
static void attend_kv_head(const void *q_heads, void *out, int64_t out_first, int io_dtype, const void *k_cache,
                           const void *v_cache, int cache_dtype, int block_size, const int32_t *table, int seq_len,
                           int64_t head_offset, int64_t token_stride, int group, int head_dim, float scale) {
    const int64_t block_stride = (int64_t)block_size * token_stride;
    const int cache_element = element_size(cache_dtype);
    float queries[group * head_dim], acc[group * head_dim];
    float running_max[group], running_sum[group];
    float scores[group * block_size];  /* [head][token of the block] */
    widen(q_heads, 0, io_dtype, group * head_dim, queries);
    for (int g = 0; g < group; g++) {
        running_max[g] = -INFINITY;
        running_sum[g] = 0.0f;
    }
    memset(acc, 0, sizeof(acc));
    for (int start = 0; start < seq_len; start += block_size) {
        const int len = seq_len - start < block_size ? seq_len - start : block_size;
        const int64_t base = (int64_t)table[start / block_size] * block_stride + head_offset;
        if (start + block_size < seq_len) {
            const int64_t next = (int64_t)table[start / block_size + 1] * block_stride + head_offset;
            for (int t = 0; t < block_size; t++) {
                prefetch(k_cache, next + t * token_stride, head_dim, cache_element);
                prefetch(v_cache, next + t * token_stride, head_dim, cache_element);
            }
        }
        key_scores(q_heads, io_dtype, queries, group, head_dim, k_cache, cache_dtype, base, token_stride, len, scale,
                   scores, block_size);
        for (int g = 0; g < group; g++)
            softmax_block(scores + g * block_size, len, running_max + g, running_sum + g, acc + g * head_dim,
                          head_dim);
        accumulate_values(scores, block_size, len, group, head_dim, v_cache, cache_dtype, base, token_stride, acc);
    }
    write_output(acc, running_sum, head_dim, group * head_dim, out, out_first, io_dtype);
}

/* q [.., num_heads, head_dim] at `q_rows[i] * q_row_stride`, out likewise at `q_rows[i] * out_row_stride` (heads
   and elements contiguous within a row); caches [num_blocks, block_size, num_kv_heads, head_dim] contiguous;
   block_tables [num_seqs, table_stride] int32; seq_lens [num_seqs] int32 (>= 1). The (row, KV head) pairs are
   shared out among `threads` OpenMP threads (torch's own pool: the library links the libgomp torch loaded), each
   taking the next pair as it finishes one, since rows differ in length. Returns 0, or -1 for shapes beyond
   MAX_GROUP / MAX_HEAD_DIM (the caller checks first). */
int paged_decode_attention(const void *q, int64_t q_row_stride, void *out, int64_t out_row_stride, int io_dtype,
                           const void *k_cache, const void *v_cache, int cache_dtype, int block_size,
                           const int32_t *block_tables, int64_t table_stride, const int32_t *seq_lens,
                           const int64_t *q_rows, int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                           float scale, int threads) {
    const int group = num_heads / num_kv_heads;
    if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM || num_heads % num_kv_heads) return -1;
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim;
    const int items = num_seqs * num_kv_heads;
    const int io_element = element_size(io_dtype);
    int next_item = 0;
#pragma omp parallel num_threads(threads < items ? threads : items)
    for (;;) {
        const int item = __atomic_fetch_add(&next_item, 1, __ATOMIC_RELAXED);
        if (item >= items) break;
        const int i = item / num_kv_heads, h = item % num_kv_heads;
        const int64_t first_head = (int64_t)h * group * head_dim;
        attend_kv_head((const char *)q + (q_rows[i] * q_row_stride + first_head) * io_element, out,
                       q_rows[i] * out_row_stride + first_head, io_dtype, k_cache, v_cache, cache_dtype, block_size,
                       block_tables + i * table_stride, seq_lens[i], (int64_t)h * head_dim, token_stride, group,
                       head_dim, scale);
    }
    return 0;
}

/* ---- Prefill: a sequence's new tokens attend causally over its whole paged history, in tiles (bf16) ----

   For each (sequence, KV head) the keys and values are first packed out of the cache into the pair-interleaved
   layouts _mm512_dpbf16_ps reads (two bf16 of the summed dimension side by side in each 32-bit lane):
     keys, in groups of 16 tokens: for each pair of dimensions p, the 16 tokens' (d 2p, d 2p+1);
     values, in pairs of tokens: for each dimension d, (token 2j, token 2j+1).
   Then each tile of query positions (times the group of query heads that share the KV head) is one job:
   scores = q · k for every key up to the tile's last position (a small GEMM, 4 rows x 64 keys per register block),
   a softmax per row over that row's causal span in fp32, the weights rounded to bf16 (as torch's CPU flash
   attention rounds them before its second GEMM), and p · v (4 rows x 64 dimensions per block), divided by the
   row's sum and written once in bf16. Products are exact and summed in fp32. Only bf16 queries and caches take this
   path, and only where the compiler has AVX512-BF16; paged_prefill_available() says whether it was built. */

#if defined(__AVX512BF16__)
#define PREFILL_ROWS 48     /* query rows (positions x query heads of one KV head) per job */
#define QK_ROWS 4           /* rows per score register block */
#define QK_GROUPS 4         /* groups of 16 keys per score register block */

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* Packs one KV head's first seq_len keys and values (zero past seq_len) from the paged cache. */
static void pack_kv_head(const uint16_t *k_cache, const uint16_t *v_cache, int block_size, const int32_t *table,
                         int seq_len, int64_t head_offset, int64_t token_stride, int head_dim, uint16_t *keys,
                         uint16_t *values) {
    const int pairs = head_dim / 2;
    const int key_groups = (int)round_up(seq_len, 16) / 16;
    memset(keys, 0, (size_t)key_groups * 16 * head_dim * 2);
    memset(values, 0, (size_t)round_up(seq_len, 2) * head_dim * 2);
    for (int t = 0; t < seq_len; t++) {
        const int64_t at = (int64_t)table[t / block_size] * block_size * token_stride
                           + (int64_t)(t % block_size) * token_stride + head_offset;
        const uint16_t *k = k_cache + at, *v = v_cache + at;
        uint16_t *key_group = keys + (int64_t)(t / 16) * 16 * head_dim + (t % 16) * 2;
        for (int p = 0; p < pairs; p++) {
            key_group[p * 32] = k[2 * p];
            key_group[p * 32 + 1] = k[2 * p + 1];
        }
        uint16_t *value_pair = values + (int64_t)(t / 2) * 2 * head_dim + (t % 2);
        for (int d = 0; d < head_dim; d++) value_pair[2 * d] = v[d];
    }
}

/* scores[r][16 g + j] = scale * (row r's query · key 16 g + j), for QK_ROWS rows and `groups` (<= QK_GROUPS) key
   groups from `first_group`. */
static inline __attribute__((always_inline)) void score_block(const uint16_t *const *rows, const uint16_t *keys,
                                                              int first_group, int groups, int pairs, float scale,
                                                              float *const *scores) {
    __m512 acc[QK_ROWS][QK_GROUPS];
    for (int r = 0; r < QK_ROWS; r++)
        for (int g = 0; g < QK_GROUPS; g++) acc[r][g] = _mm512_setzero_ps();
    const uint16_t *group_keys = keys + (int64_t)first_group * 32 * pairs;
    for (int p = 0; p < pairs; p++) {
        __m512i k[QK_GROUPS];
        for (int g = 0; g < QK_GROUPS; g++)
            k[g] = g < groups ? _mm512_loadu_si512(group_keys + ((int64_t)g * pairs + p) * 32) : _mm512_setzero_si512();
        for (int r = 0; r < QK_ROWS; r++) {
            int32_t pair;
            memcpy(&pair, rows[r] + 2 * p, 4);
            const __m512bh q = (__m512bh)_mm512_set1_epi32(pair);
            for (int g = 0; g < QK_GROUPS; g++)
                if (g < groups) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], q, (__m512bh)k[g]);
        }
    }
    const __m512 s = _mm512_set1_ps(scale);
    for (int r = 0; r < QK_ROWS; r++)
        for (int g = 0; g < QK_GROUPS; g++)
            if (g < groups) _mm512_storeu_ps(scores[r] + 16 * (first_group + g), _mm512_mul_ps(acc[r][g], s));
}

/* Softmax of s[0:valid] (fp32), written as bf16 weights w[0:width] (zero past valid); returns the fp32 sum. */
static float softmax_row(const float *s, int valid, int width, uint16_t *w) {
    __m512 maxes = _mm512_set1_ps(-INFINITY);
    int t = 0;
    for (; t + 16 <= valid; t += 16) maxes = _mm512_max_ps(maxes, _mm512_loadu_ps(s + t));
    if (t < valid)
        maxes = _mm512_mask_max_ps(maxes, (__mmask16)((1u << (valid - t)) - 1), maxes, _mm512_loadu_ps(s + t));
    const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(maxes));
    __m512 sums = _mm512_setzero_ps();
    for (t = 0; t < width; t += 16) {
        const int n = width - t < 16 ? width - t : 16;
        const __mmask16 live = valid - t >= 16 ? (__mmask16)0xffff
                               : valid > t ? (__mmask16)((1u << (valid - t)) - 1) : (__mmask16)0;
        const __m512 p = _mm512_maskz_mov_ps(live, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + t),
                                                                                  max)));
        sums = _mm512_add_ps(sums, p);
        _mm256_mask_storeu_epi16(w + t, (__mmask16)((1u << n) - 1), round16_to_bf16(p));
    }
    return _mm512_reduce_add_ps(sums);
}

/* out rows = (weights · values) / sums for `rows` rows and `chunks` 16-wide slices of the head (both compile-time
   constants at each call, rows x chunks <= 16 registers) over `key_pairs` pairs of keys; only the first `stored`
   rows are written (the others repeat the last row, for a tail shorter than `rows`). */
static inline __attribute__((always_inline)) void value_block(const uint16_t *const *weights, const uint16_t *values,
                                                              int key_pairs, int head_dim, int rows, int chunks,
                                                              int stored, const float *sums, uint16_t *const *out) {
    __m512 acc[4][16];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < chunks; c++) acc[r][c] = _mm512_setzero_ps();
    for (int j = 0; j < key_pairs; j++) {
        __m512bh w[4];
        for (int r = 0; r < rows; r++) {
            int32_t pair;
            memcpy(&pair, weights[r] + 2 * j, 4);
            w[r] = (__m512bh)_mm512_set1_epi32(pair);
        }
        const uint16_t *v = values + (int64_t)j * 2 * head_dim;
        for (int c = 0; c < chunks; c++) {
            const __m512bh vc = (__m512bh)_mm512_loadu_si512(v + 32 * c);
            for (int r = 0; r < rows; r++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], w[r], vc);
        }
    }
    for (int r = 0; r < rows && r < stored; r++) {
        const __m512 inverse = _mm512_set1_ps(1.0f / sums[r]);
        for (int c = 0; c < chunks; c++)
            _mm256_storeu_si256((__m256i *)(out[r] + 16 * c), round16_to_bf16(_mm512_mul_ps(acc[r][c], inverse)));
    }
}

/* value_block with its register shape fixed per head size (16 x chunks): rows = min(4, 16 / chunks), e.g. 4 rows x 4
   slices for 64, 2 x 8 for 128, 1 x 16 for 256 */
static void value_rows(const uint16_t *const *weights, const uint16_t *values, int key_pairs, int head_dim,
                       int stored, const float *sums, uint16_t *const *out) {
    switch (head_dim / 16) {
    case 1: value_block(weights, values, key_pairs, head_dim, 4, 1, stored, sums, out); break;
    case 2: value_block(weights, values, key_pairs, head_dim, 4, 2, stored, sums, out); break;
    case 3: value_block(weights, values, key_pairs, head_dim, 4, 3, stored, sums, out); break;
    case 4: value_block(weights, values, key_pairs, head_dim, 4, 4, stored, sums, out); break;
    case 5: value_block(weights, values, key_pairs, head_dim, 3, 5, stored, sums, out); break;
    case 6: value_block(weights, values, key_pairs, head_dim, 2, 6, stored, sums, out); break;
    case 7: value_block(weights, values, key_pairs, head_dim, 2, 7, stored, sums, out); break;
    case 8: value_block(weights, values, key_pairs, head_dim, 2, 8, stored, sums, out); break;
    case 9: value_block(weights, values, key_pairs, head_dim, 1, 9, stored, sums, out); break;
    case 10: value_block(weights, values, key_pairs, head_dim, 1, 10, stored, sums, out); break;
    case 11: value_block(weights, values, key_pairs, head_dim, 1, 11, stored, sums, out); break;
    case 12: value_block(weights, values, key_pairs, head_dim, 1, 12, stored, sums, out); break;
    case 13: value_block(weights, values, key_pairs, head_dim, 1, 13, stored, sums, out); break;
    case 14: value_block(weights, values, key_pairs, head_dim, 1, 14, stored, sums, out); break;
    case 15: value_block(weights, values, key_pairs, head_dim, 1, 15, stored, sums, out); break;
    case 16: value_block(weights, values, key_pairs, head_dim, 1, 16, stored, sums, out); break;
    default: break;
    }
}

static int value_block_rows(int head_dim) { return 16 / (head_dim / 16) < 4 ? 16 / (head_dim / 16) : 4; }

/* One job: query positions [first, last) of one sequence (q_len new tokens after `offset` cached ones) against one
   KV head's packed keys and values. Row r is position first + r / group, query head r % group. Returns 0, or -2
   where its score buffers could not be allocated. */
static int prefill_tile(const uint16_t *q, int64_t q_row_stride, uint16_t *out, int64_t out_row_stride,
                         int64_t q_start, int offset, int first, int last, int kv_head, int group, int head_dim,
                         const uint16_t *keys, const uint16_t *values, float scale) {
    const int rows = (last - first) * group;
    const int span = offset + last;                 /* keys the tile's last position sees */
    const int width = (int)round_up(span, 16);      /* score row length: whole key groups */
    float *scores = malloc((size_t)rows * width * sizeof(float));
    uint16_t *weights = malloc((size_t)rows * width * sizeof(uint16_t));
    if (scores == NULL || weights == NULL) {
        free(scores);
        free(weights);
        return -2;
    }
    float sums[PREFILL_ROWS];
    const uint16_t *row_q[PREFILL_ROWS];
    uint16_t *row_out[PREFILL_ROWS];
    for (int r = 0; r < rows; r++) {
        const int64_t token = q_start + first + r / group, head = (int64_t)kv_head * group + r % group;
        row_q[r] = q + token * q_row_stride + head * head_dim;
        row_out[r] = out + token * out_row_stride + head * head_dim;
    }
    const int key_groups = width / 16;
    for (int r0 = 0; r0 < rows; r0 += QK_ROWS) {
        const uint16_t *block_q[QK_ROWS];
        float *block_scores[QK_ROWS];
        for (int r = 0; r < QK_ROWS; r++) {  /* past the last row: recompute the last one, store nothing new */
            const int at = r0 + r < rows ? r0 + r : rows - 1;
            block_q[r] = row_q[at];
            block_scores[r] = scores + (int64_t)at * width;
        }
        int g = 0;
        for (; g + QK_GROUPS <= key_groups; g += QK_GROUPS)
            score_block(block_q, keys, g, QK_GROUPS, head_dim / 2, scale, block_scores);
        switch (key_groups - g) {  /* the tail, with its register shape fixed too */
        case 3: score_block(block_q, keys, g, 3, head_dim / 2, scale, block_scores); break;
        case 2: score_block(block_q, keys, g, 2, head_dim / 2, scale, block_scores); break;
        case 1: score_block(block_q, keys, g, 1, head_dim / 2, scale, block_scores); break;
        default: break;
        }
    }
    const int weight_width = (int)round_up(span, 2);
    for (int r = 0; r < rows; r++)
        sums[r] = softmax_row(scores + (int64_t)r * width, offset + first + r / group + 1, weight_width,
                              weights + (int64_t)r * width);
    const int block_rows = value_block_rows(head_dim);
    for (int r0 = 0; r0 < rows; r0 += block_rows) {
        const int n = rows - r0 < block_rows ? rows - r0 : block_rows;
        const uint16_t *block_weights[4];
        for (int r = 0; r < block_rows; r++) block_weights[r] = weights + (int64_t)(r0 + (r < n ? r : n - 1)) * width;
        /* a row's weights are zero past its own span, so every row may run to the tile's */
        value_rows(block_weights, values, weight_width / 2, head_dim, n, sums + r0, row_out + r0);
    }
    free(scores);
    free(weights);
    return 0;
}
#endif

int paged_prefill_available(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

/* Causal attention of `num_seqs` prefills, bf16 queries, outputs and caches. Sequence i's q_lens[i] new tokens are
   rows q_starts[i].. of q and out ([.., num_heads, head_dim], heads contiguous within a row) and the last of its
   seq_lens[i] tokens, all already in the cache ([num_blocks, block_size, num_kv_heads, head_dim] contiguous) at
   block_tables[i * table_stride ..]. Jobs are shared out among `threads` OpenMP threads: first packing each
   (sequence, KV head), then the tiles. Returns 0; -1 where the build or the shapes do not allow it (head_dim a
   multiple of 16 up to 256, at most MAX_GROUP query heads per KV head); -2 where memory ran out. */
int paged_prefill_attention(const void *q, int64_t q_row_stride, void *out, int64_t out_row_stride,
                            const void *k_cache, const void *v_cache, int block_size, const int32_t *block_tables,
                            int64_t table_stride, const int64_t *q_starts, const int32_t *q_lens,
                            const int32_t *seq_lens, int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                            float scale, int threads) {
#if defined(__AVX512BF16__)
    const int group = num_kv_heads > 0 ? num_heads / num_kv_heads : 0;
    if (group < 1 || group > MAX_GROUP || num_heads % num_kv_heads || head_dim % 16 || head_dim > MAX_HEAD_DIM)
        return -1;
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim;
    const int positions_per_tile = PREFILL_ROWS / group;
    int64_t packed_at[num_seqs + 1];  /* each sequence's packed keys (then values) start, per KV head */
    int tiles_before[num_seqs + 1];
    packed_at[0] = 0;
    tiles_before[0] = 0;
    for (int i = 0; i < num_seqs; i++) {
        packed_at[i + 1] = packed_at[i] + round_up(seq_lens[i], 16) * head_dim;
        tiles_before[i + 1] = tiles_before[i] + (q_lens[i] + positions_per_tile - 1) / positions_per_tile;
    }
    uint16_t *keys = malloc((size_t)packed_at[num_seqs] * num_kv_heads * sizeof(uint16_t));
    uint16_t *values = malloc((size_t)packed_at[num_seqs] * num_kv_heads * sizeof(uint16_t));
    if (keys == NULL || values == NULL) {
        free(keys);
        free(values);
        return -2;
    }
    const int pack_jobs = num_seqs * num_kv_heads, jobs = tiles_before[num_seqs] * num_kv_heads;
    int next_pack = 0, next_job = 0, failed = 0;
#pragma omp parallel num_threads(threads < jobs ? threads : jobs)
    {
        for (;;) {
            const int item = __atomic_fetch_add(&next_pack, 1, __ATOMIC_RELAXED);
            if (item >= pack_jobs) break;
            const int i = item / num_kv_heads, h = item % num_kv_heads;
            const int64_t at = (packed_at[i] * num_kv_heads) + (int64_t)h * (packed_at[i + 1] - packed_at[i]);
            pack_kv_head(k_cache, v_cache, block_size, block_tables + i * table_stride, seq_lens[i],
                         (int64_t)h * head_dim, token_stride, head_dim, keys + at, values + at);
        }
#pragma omp barrier
        for (;;) {
            const int item = __atomic_fetch_add(&next_job, 1, __ATOMIC_RELAXED);
            if (item >= jobs) break;
            const int h = item % num_kv_heads, tile = item / num_kv_heads;
            int i = 0;
            while (tiles_before[i + 1] <= tile) i++;
            const int first = (tile - tiles_before[i]) * positions_per_tile;
            const int last = first + positions_per_tile < q_lens[i] ? first + positions_per_tile : q_lens[i];
            const int64_t at = (packed_at[i] * num_kv_heads) + (int64_t)h * (packed_at[i + 1] - packed_at[i]);
            if (prefill_tile(q, q_row_stride, out, out_row_stride, q_starts[i], seq_lens[i] - q_lens[i], first, last,
                             h, group, head_dim, keys + at, values + at, scale))
                __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
        }
    }
    free(keys);
    free(values);
    return failed ? -2 : 0;
#else
    (void)q, (void)q_row_stride, (void)out, (void)out_row_stride, (void)k_cache, (void)v_cache, (void)block_size;
    (void)block_tables, (void)table_stride, (void)q_starts, (void)q_lens, (void)seq_lens, (void)num_seqs;
    (void)num_heads, (void)num_kv_heads, (void)head_dim, (void)scale, (void)threads;
    return -1;
#endif
}
