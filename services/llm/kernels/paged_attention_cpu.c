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
        const int bf16_pairs = io_dtype == DTYPE_BF16 && cache_dtype == DTYPE_BF16 && head_dim % 32 == 0;
#else
        const int bf16_pairs = 0;
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
#if defined(__AVX512BF16__)
                    if (bf16_pairs) {
                        const uint16_t *q = (const uint16_t *)q_heads + g * head_dim;
                        for (int d = 0; d < head_dim; d += 32)
                            dot = _mm512_dpbf16_ps(dot, (__m512bh)_mm512_loadu_si512(q + d),
                                                   (__m512bh)_mm512_loadu_si512((const uint16_t *)k_cache + k + d));
                        dots[t] = dot;
                        continue;
                    }
#endif
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
   rate). Each acc element still sums the tokens in order, so the result is the same bit for bit. */
static inline void accumulate_slices(const float *weights, int weight_stride, int len, int group, int head_dim,
                                     const void *v_cache, int cache_dtype, int64_t first_value,
                                     int64_t token_stride, float *acc, int d, int chunks) {
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
            const int left = (head_dim - d) / 16;
            accumulate_slices(weights, weight_stride, len, group, head_dim, v_cache, cache_dtype, first_value,
                              token_stride, acc, d, left < per_pass ? left : per_pass);
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
