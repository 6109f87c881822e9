/* Decode attention over the paged KV cache, reading each sequence's blocks in place (no gather copy).

   For each decode row and KV head: the query heads that share the KV head (GQA) are held in fp32, every key of
   the row's blocks is loaded once and dotted with all of them, the softmax is streamed block by block (running
   max and sum, fp32) and p·v is accumulated in fp32; the row's output is written once, in the model's dtype.
   The cache is fp32, bf16 or fp8 e4m3 (widened on read; its scale is applied by the caller). The torch
   reference is `attention.paged_attention_reference`; `paged_attention_cpu.py` builds, loads and calls this. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1, DTYPE_FP8_E4M3 = 2 };

#define MAX_GROUP 16   /* query heads per KV head */
#define MAX_HEAD_DIM 256

static inline float bf16_to_f32(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch's cast */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);  /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

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
    case DTYPE_BF16: return bf16_to_f32(((const uint16_t *)base)[i]);
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

/* The softmax scale is applied to each dot product, so queries are used as they come (bf16 pairs for
   _mm512_dpbf16_ps where query and cache are both bf16: exact products, fp32 sums). */
static void key_scores(const void *q_row, int io_dtype, const float *q_f32, int group, int head_dim,
                       const void *k_cache, int cache_dtype, int64_t key, float scale, float *scores,
                       int score_stride) {
#if defined(__AVX512BF16__)
    if (io_dtype == DTYPE_BF16 && cache_dtype == DTYPE_BF16 && head_dim % 32 == 0) {
        const uint16_t *k = (const uint16_t *)k_cache + key;
        const uint16_t *q = (const uint16_t *)q_row;
        for (int g = 0; g < group; g++) {
            __m512 dot = _mm512_setzero_ps();
            for (int d = 0; d < head_dim; d += 32)
                dot = _mm512_dpbf16_ps(dot, (__m512bh)_mm512_loadu_si512(q + g * head_dim + d),
                                       (__m512bh)_mm512_loadu_si512(k + d));
            scores[g * score_stride] = _mm512_reduce_add_ps(dot) * scale;
        }
        return;
    }
#endif
#if defined(__AVX512F__)
    if (head_dim % 16 == 0) {
        float k[MAX_HEAD_DIM];
        for (int d = 0; d < head_dim; d += 16) _mm512_storeu_ps(k + d, load16(k_cache, key + d, cache_dtype));
        for (int g = 0; g < group; g++) {
            __m512 dot = _mm512_setzero_ps();
            for (int d = 0; d < head_dim; d += 16)
                dot = _mm512_fmadd_ps(_mm512_loadu_ps(q_f32 + g * head_dim + d), _mm512_loadu_ps(k + d), dot);
            scores[g * score_stride] = _mm512_reduce_add_ps(dot) * scale;
        }
        return;
    }
#endif
    (void)q_row;
    (void)io_dtype;
    for (int g = 0; g < group; g++) {
        float dot = 0.0f;
        for (int d = 0; d < head_dim; d++) dot += q_f32[g * head_dim + d] * load_scalar(k_cache, key + d, cache_dtype);
        scores[g * score_stride] = dot * scale;
    }
}

/* acc[g] += sum over the block's tokens t of weights[g][t] * v_t, each value loaded once for all query heads. */
static void accumulate_values(const float *weights, int weight_stride, int len, int group, int head_dim,
                              const void *v_cache, int cache_dtype, int64_t first_value, int64_t token_stride,
                              float *acc) {
#if defined(__AVX512F__)
    if (head_dim % 16 == 0 && group <= MAX_GROUP) {
        for (int d = 0; d < head_dim; d += 16) {
            __m512 sums[MAX_GROUP];
            for (int g = 0; g < group; g++) sums[g] = _mm512_loadu_ps(acc + g * head_dim + d);
            for (int t = 0; t < len; t++) {
                __m512 v = load16(v_cache, first_value + t * token_stride + d, cache_dtype);
                for (int g = 0; g < group; g++)
                    sums[g] = _mm512_fmadd_ps(_mm512_set1_ps(weights[g * weight_stride + t]), v, sums[g]);
            }
            for (int g = 0; g < group; g++) _mm512_storeu_ps(acc + g * head_dim + d, sums[g]);
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
                /* round to nearest even, as torch's cast: add 0x7fff plus the lowest kept bit, keep the top half */
                __m512i bits = _mm512_castps_si512(value);
                __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
                bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + first + e),
                                    _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
            } else {
                _mm512_storeu_ps((float *)out + first + e, value);
            }
        }
#endif
    for (; e < n; e++) {
        const float value = acc[e] / sums[e / head_dim];
        if (io_dtype == DTYPE_BF16)
            ((uint16_t *)out)[first + e] = f32_to_bf16(value);
        else
            ((float *)out)[first + e] = value;
    }
}

static int element_size(int dtype) { return dtype == DTYPE_F32 ? 4 : dtype == DTYPE_BF16 ? 2 : 1; }

/* q [.., num_heads, head_dim] at `q_rows[i] * q_row_stride`, out likewise at `q_rows[i] * out_row_stride` (heads
   and elements contiguous within a row); caches [num_blocks, block_size, num_kv_heads, head_dim] contiguous;
   block_tables [num_seqs, table_stride] int32; seq_lens [num_seqs] int32 (>= 1). A row's blocks are walked in
   order, each read whole (all KV heads) while the next one is prefetched. Returns 0, or -1 for shapes beyond
   MAX_GROUP / MAX_HEAD_DIM (the caller checks first). */
int paged_decode_attention(const void *q, int64_t q_row_stride, void *out, int64_t out_row_stride, int io_dtype,
                           const void *k_cache, const void *v_cache, int cache_dtype, int block_size,
                           const int32_t *block_tables, int64_t table_stride, const int32_t *seq_lens,
                           const int64_t *q_rows, int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                           float scale) {
    const int group = num_heads / num_kv_heads;
    if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM || num_heads % num_kv_heads) return -1;
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim;
    const int64_t block_stride = (int64_t)block_size * token_stride;
    const int cache_element = element_size(cache_dtype);
    float queries[num_heads * head_dim], acc[num_heads * head_dim];
    float running_max[num_heads], running_sum[num_heads];
    float scores[num_heads * block_size];  /* [head][token of the block] */
    for (int i = 0; i < num_seqs; i++) {
        const int64_t q_row = q_rows[i] * q_row_stride, out_row = q_rows[i] * out_row_stride;
        const void *q_bytes = (const char *)q + q_row * element_size(io_dtype);
        const int32_t *table = block_tables + i * table_stride;
        const int seq_len = seq_lens[i];
        widen(q, q_row, io_dtype, num_heads * head_dim, queries);
        for (int h = 0; h < num_heads; h++) {
            running_max[h] = -INFINITY;
            running_sum[h] = 0.0f;
        }
        memset(acc, 0, sizeof(acc));
        for (int start = 0; start < seq_len; start += block_size) {
            const int len = seq_len - start < block_size ? seq_len - start : block_size;
            const int64_t base = (int64_t)table[start / block_size] * block_stride;
            /* the next block, token by token as this one is read (all at once would fill the line buffers) */
            const int64_t next = start + block_size < seq_len ? (int64_t)table[start / block_size + 1] * block_stride
                                                               : -1;
            for (int t = 0; t < len; t++) {
                if (next >= 0) {
                    prefetch(k_cache, next + t * token_stride, token_stride, cache_element);
                    prefetch(v_cache, next + t * token_stride, token_stride, cache_element);
                }
                for (int h = 0; h < num_kv_heads; h++) {
                    const int first = h * group;
                    key_scores((const char *)q_bytes + (int64_t)first * head_dim * element_size(io_dtype), io_dtype,
                               queries + first * head_dim, group, head_dim, k_cache, cache_dtype,
                               base + t * token_stride + h * head_dim, scale, scores + first * block_size + t,
                               block_size);
                }
            }
            for (int h = 0; h < num_heads; h++)
                softmax_block(scores + h * block_size, len, running_max + h, running_sum + h, acc + h * head_dim,
                              head_dim);
            for (int h = 0; h < num_kv_heads; h++)
                accumulate_values(scores + h * group * block_size, block_size, len, group, head_dim, v_cache,
                                  cache_dtype, base + h * head_dim, token_stride, acc + h * group * head_dim);
        }
        write_output(acc, running_sum, head_dim, num_heads * head_dim, out, out_row, io_dtype);
    }
    return 0;
}
