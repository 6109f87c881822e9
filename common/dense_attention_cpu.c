/* Dense bf16 attention (softmax(q k^T * scale) v) on AMX, for encoders' padded batches and causal prompts.

   torch's CPU flash attention runs at about 60 GFLOP/s on an AMX Xeon core pair for an encoder's shapes (head
   size 32, 254 keys), so in all-MiniLM-L6-v2 in bf16 it takes 45% of a batch while the linear layers, on AMX
   through oneDNN, run at about 600 GFLOP/s. Here both products run on AMX tiles as well.

   One work unit is a (batch row, query head). Its keys [start, end) are packed once into the tile layouts AMX
   reads as the B operand: K as [key block of 16][32 head dims][16 keys][2] for q k^T, V as [key block of 32][16
   head dims][16 key pairs][2] for p v, zero past the end. Then, 16 queries at a time:
   - scores: one fp32 16 x 16 tile per 16 keys, summed over the head size in chunks of 32 (`tdpbf16ps`);
   - softmax over each query's keys in fp32 (AVX-512: a degree-6 polynomial for exp, `vscalefps` for 2^n), the
     probabilities rounded to bf16 and kept unnormalised, their fp32 sum kept;
   - output: p v in fp32 tiles, 16 head dims a tile, scaled by 1 / sum and rounded to bf16 (nearest even).
   Keys past a query's limit get probability 0, so they never reach the output. Rounding p to bf16 before p v is
   what bf16 flash attention does; against an fp32 computation outputs differ by about 2^-8 relative.

   A query may see keys [start, end) of its batch row, and with `causal` only those up to its own position,
   counted from the end (query i of q_len sees keys up to i + kv_len - q_len, as with a cached prefix). A query
   that sees no key gets zeros. Query head h reads key/value head h / (heads / kv_heads) (grouped queries).

   Units are shared out among `threads` OpenMP threads (torch's pool: the library links the libgomp torch loaded);
   each unit is computed the same way on any thread, so any thread count gives the same bits. */

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"

#define ROWS 16        /* queries per block: a tile's rows */
#define DIM_CHUNK 32   /* head dims per q tile (64 bytes of bf16) */
#define DIM_GROUP 16   /* head dims per output tile (64 bytes of fp32) */
#define KEY_BLOCK 16   /* keys per score tile */
#define VALUE_BLOCK 32 /* keys per p tile and value tile */
#define TILE_BYTES 1024
#define MAX_HEAD_DIM 256

#if HAVE_AMX
/* Every tile 16 rows of 64 bytes. Scores: 0 accumulates, 4 holds queries, 6 keys. Output: 0-3 accumulate, 4
   holds probabilities, 5-7 values. */
static void configure_tiles(void) {
    TileConfig config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.rows[t] = 16;
        config.bytes_per_row[t] = 64;
    }
    _tile_loadconfig(&config);
}

/* exp(x) for x <= 0 (x - the row's maximum), relative error about 2e-7; 0 below -100. */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-100.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* r = x - n ln 2, with ln 2 split in two so r stays exact to float precision; |r| <= ln(2) / 2 */
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __mmask16 lanes_below(int64_t limit, int64_t from) {
    const int64_t n = limit - from;
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

/* Probabilities of one query row: scores s[0, limit) scaled and exponentiated against their maximum, rounded to
   bf16 into p[0, width), zero from `limit` on; returns 1 / their fp32 sum (0 where limit is 0). */
static float softmax_row(const float *s, int64_t limit, int64_t width, float scale, uint16_t *p) {
    if (limit <= 0) {
        memset(p, 0, (size_t)width * 2);
        return 0.0f;
    }
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < limit; j += 16)
        top = _mm512_max_ps(top, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), lanes_below(limit, j), s + j));
    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top) * scale), factor = _mm512_set1_ps(scale);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < width; j += 32) {
        const __mmask16 low_lanes = lanes_below(limit, j), high_lanes = lanes_below(limit, j + 16);
        __m512 low = _mm512_maskz_mov_ps(low_lanes, exp_nonpositive(
            _mm512_fmsub_ps(_mm512_maskz_loadu_ps(low_lanes, s + j), factor, shift)));
        __m512 high = _mm512_maskz_mov_ps(high_lanes, exp_nonpositive(
            _mm512_fmsub_ps(_mm512_maskz_loadu_ps(high_lanes, s + j + 16), factor, shift)));
        sum = _mm512_add_ps(sum, _mm512_add_ps(low, high));
        _mm512_storeu_si512(p + j, (__m512i)_mm512_cvtne2ps_pbh(high, low));
    }
    return 1.0f / _mm512_reduce_add_ps(sum);
}

typedef struct {
    const uint16_t *q, *k, *v;
    uint16_t *out;
    int64_t heads, group, q_len, kv_len, head_dim;
    const int64_t *q_strides, *k_strides, *v_strides, *out_strides; /* batch, head, position; elements */
    const int64_t *kv_ranges;                                        /* [batch][2] or NULL */
    float scale;
    int causal;
} Problem;

typedef struct {
    uint16_t *keys, *values, *probs, *queries;
    float *scores, *sums; /* sums: 1 / each query row's probability sum */
} Scratch;

/* Keys [start, start + n) of one head in the score tiles' B layout, zero past n up to `blocks` * 16. */
static void pack_keys(const uint16_t *k, int64_t stride, int64_t n, int64_t blocks, int64_t head_dim,
                      uint16_t *packed) {
    const int64_t chunks = head_dim / DIM_CHUNK;
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t c = 0; c < chunks; c++) {
            uint32_t *tile = (uint32_t *)(packed + (b * chunks + c) * (TILE_BYTES / 2));
            for (int64_t key = 0; key < KEY_BLOCK; key++) {
                const int64_t at = b * KEY_BLOCK + key;
                const uint32_t *row = (const uint32_t *)(k + at * stride + c * DIM_CHUNK);
                for (int pair = 0; pair < DIM_CHUNK / 2; pair++) tile[pair * KEY_BLOCK + key] = at < n ? row[pair] : 0;
            }
        }
}

/* Values [start, start + n) of one head in the output tiles' B layout, zero past n up to `blocks` * 32. */
static void pack_values(const uint16_t *v, int64_t stride, int64_t n, int64_t blocks, int64_t head_dim,
                        uint16_t *packed) {
    const int64_t groups = head_dim / DIM_GROUP;
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t g = 0; g < groups; g++) {
            uint16_t *tile = packed + (b * groups + g) * (TILE_BYTES / 2);
            for (int pair = 0; pair < VALUE_BLOCK / 2; pair++)
                for (int e = 0; e < 2; e++) {
                    const int64_t at = b * VALUE_BLOCK + 2 * pair + e;
                    const uint16_t *row = v + at * stride + g * DIM_GROUP;
                    for (int d = 0; d < DIM_GROUP; d++) tile[(pair * DIM_GROUP + d) * 2 + e] = at < n ? row[d] : 0;
                }
        }
}

static void attend_unit(const Problem *P, int64_t unit, Scratch *w) {
    const int64_t b = unit / P->heads, h = unit % P->heads, kv_h = h / P->group, D = P->head_dim;
    const int64_t start = P->kv_ranges ? P->kv_ranges[2 * b] : 0;
    const int64_t end = P->kv_ranges ? P->kv_ranges[2 * b + 1] : P->kv_len;
    const int64_t n = end > start ? end - start : 0;
    const int64_t chunks = D / DIM_CHUNK, groups = D / DIM_GROUP;
    const int64_t value_blocks = (n + VALUE_BLOCK - 1) / VALUE_BLOCK, width = value_blocks * VALUE_BLOCK;
    const uint16_t *q = P->q + b * P->q_strides[0] + h * P->q_strides[1];
    uint16_t *out = P->out + b * P->out_strides[0] + h * P->out_strides[1];
    pack_keys(P->k + b * P->k_strides[0] + kv_h * P->k_strides[1] + start * P->k_strides[2], P->k_strides[2], n,
              width / KEY_BLOCK, D, w->keys);
    pack_values(P->v + b * P->v_strides[0] + kv_h * P->v_strides[1] + start * P->v_strides[2], P->v_strides[2], n,
                value_blocks, D, w->values);
    for (int64_t first = 0; first < P->q_len; first += ROWS) {
        const int64_t rows = P->q_len - first < ROWS ? P->q_len - first : ROWS;
        int64_t limits[ROWS], longest = 0;
        for (int64_t m = 0; m < ROWS; m++) {
            int64_t limit = n;
            if (P->causal) {
                const int64_t last = (first + (m < rows ? m : rows - 1)) + P->kv_len - P->q_len; /* last key seen */
                limit = last + 1 - start < n ? last + 1 - start : n;
                if (limit < 0) limit = 0;
            }
            limits[m] = limit;
            if (limit > longest) longest = limit;
        }
        for (int64_t m = 0; m < ROWS; m++) {
            if (m < rows) memcpy(w->queries + m * D, q + (first + m) * P->q_strides[2], (size_t)D * 2);
            else memset(w->queries + m * D, 0, (size_t)D * 2);
        }
        const int64_t used = (longest + VALUE_BLOCK - 1) / VALUE_BLOCK; /* value blocks any row needs */
        for (int64_t kb = 0; kb < used * (VALUE_BLOCK / KEY_BLOCK); kb++) {
            _tile_zero(0);
            for (int64_t c = 0; c < chunks; c++) {
                _tile_loadd(4, w->queries + c * DIM_CHUNK, D * 2);
                _tile_loadd(6, w->keys + (kb * chunks + c) * (TILE_BYTES / 2), 64);
                _tile_dpbf16ps(0, 4, 6);
            }
            _tile_stored(0, w->scores + kb * KEY_BLOCK, width * 4);
        }
        for (int64_t m = 0; m < ROWS; m++)
            w->sums[m] = softmax_row(w->scores + m * width, limits[m], used * VALUE_BLOCK, P->scale,
                                     w->probs + m * width);
        for (int64_t g0 = 0; g0 < groups; g0 += 4) {
            const int64_t count = groups - g0 < 4 ? groups - g0 : 4;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t vb = 0; vb < used; vb++) {
                _tile_loadd(4, w->probs + vb * VALUE_BLOCK, width * 2);
                const uint16_t *tiles = w->values + (vb * groups + g0) * (TILE_BYTES / 2);
                _tile_loadd(5, tiles, 64);
                _tile_dpbf16ps(0, 4, 5);
                if (count > 1) {
                    _tile_loadd(6, tiles + TILE_BYTES / 2, 64);
                    _tile_dpbf16ps(1, 4, 6);
                }
                if (count > 2) {
                    _tile_loadd(7, tiles + TILE_BYTES, 64);
                    _tile_dpbf16ps(2, 4, 7);
                }
                if (count > 3) {
                    _tile_loadd(5, tiles + 3 * (TILE_BYTES / 2), 64);
                    _tile_dpbf16ps(3, 4, 5);
                }
            }
            float acc[ROWS * 64] __attribute__((aligned(64)));
            _tile_stored(0, acc, 64 * 4);
            _tile_stored(1, acc + 16, 64 * 4);
            _tile_stored(2, acc + 32, 64 * 4);
            _tile_stored(3, acc + 48, 64 * 4);
            for (int64_t m = 0; m < rows; m++) {
                const __m512 norm = _mm512_set1_ps(w->sums[m]);
                uint16_t *row = out + (first + m) * P->out_strides[2] + g0 * DIM_GROUP;
                for (int64_t g = 0; g < count; g++) {
                    const __m512 x = _mm512_mul_ps(_mm512_load_ps(acc + m * 64 + g * 16), norm);
                    _mm256_storeu_si256((__m256i *)(row + g * DIM_GROUP), (__m256i)_mm512_cvtneps_pbh(x));
                }
            }
        }
    }
}
#endif

/* out = softmax(q k^T * scale) v per (batch, head), bf16, for q [batch, heads, q_len, head_dim] and k, v
   [batch, kv_heads, kv_len, head_dim] given by element strides (batch, head, position; head dims contiguous),
   out likewise [batch, heads, q_len, head_dim]. `kv_ranges`: [batch][2] key ranges [start, end), or NULL for
   all keys. Returns 0, or -1 where this build has no AMX kernel, for a head size that is not a multiple of 32
   up to 256, heads not a multiple of kv_heads, a key range outside [0, kv_len), or scratch memory it cannot get. */
int dense_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t batch,
                    int64_t heads, int64_t kv_heads, int64_t q_len, int64_t kv_len, int64_t head_dim,
                    const int64_t *q_strides, const int64_t *k_strides, const int64_t *v_strides,
                    const int64_t *out_strides, const int64_t *kv_ranges, float scale, int causal, int threads) {
#if HAVE_AMX
    if (head_dim % DIM_CHUNK || head_dim < DIM_CHUNK || head_dim > MAX_HEAD_DIM || kv_heads < 1 || heads % kv_heads
        || batch < 0 || q_len < 0 || kv_len < 0) return -1;
    if (kv_ranges)
        for (int64_t b = 0; b < batch; b++)
            if (kv_ranges[2 * b] < 0 || kv_ranges[2 * b + 1] > kv_len) return -1;
    const Problem problem = {q, k, v, out, heads, heads / kv_heads, q_len, kv_len, head_dim, q_strides, k_strides,
                             v_strides, out_strides, kv_ranges, scale, causal};
    const int64_t units = batch * heads;
    const int64_t width = (kv_len + VALUE_BLOCK - 1) / VALUE_BLOCK * VALUE_BLOCK;
    int failed = 0;
    if (units == 0) return 0;
#pragma omp parallel num_threads(threads < units ? threads : (int)units) reduction(| : failed)
    {
        const int64_t count = omp_get_num_threads(), me = omp_get_thread_num();
        Scratch w;
        w.keys = aligned_alloc(64, (size_t)(width * head_dim * 2 + 64));
        w.values = aligned_alloc(64, (size_t)(width * head_dim * 2 + 64));
        w.probs = aligned_alloc(64, (size_t)(ROWS * width * 2 + 64));
        w.scores = aligned_alloc(64, (size_t)(ROWS * width * 4 + 64));
        w.queries = aligned_alloc(64, (size_t)(ROWS * head_dim * 2 + 64));
        w.sums = aligned_alloc(64, ROWS * 4);
        if (w.keys && w.values && w.probs && w.scores && w.queries && w.sums) {
            configure_tiles();
            for (int64_t unit = units * me / count; unit < units * (me + 1) / count; unit++)
                attend_unit(&problem, unit, &w);
            _tile_release();
        } else {
            failed = 1;
        }
        free(w.keys), free(w.values), free(w.probs), free(w.scores), free(w.queries), free(w.sums);
    }
    return failed ? -1 : 0;
#else
    (void)q, (void)k, (void)v, (void)out, (void)batch, (void)heads, (void)kv_heads, (void)q_len, (void)kv_len;
    (void)head_dim, (void)q_strides, (void)k_strides, (void)v_strides, (void)out_strides, (void)kv_ranges;
    (void)scale, (void)causal, (void)threads;
    return -1;
#endif
}
