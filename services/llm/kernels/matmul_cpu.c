/* bf16 linear layers of decode-sized CPU steps (up to 32 rows), reading the weight oneDNN packed at load, in
   place, so the weights are stored once. Two builds from this file, by the cores it is compiled for:

   AMX. `PackedLinear` keeps each weight in oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`).
   On AMX cores oneDNN picks AB16b32a2b for it: for each block of 32 output features, every block of 32 input
   features in order, each a 32 x 32 tile of [16 input pairs][32 outputs][2 inputs], exactly the B operand of AMX's
   bf16 dot product (two 16-column tiles side by side, 128 bytes a row). For at most 32 rows this computes what
   oneDNN's brgemm computes, bit for bit: one fp32 accumulator tile per 16 x 16 outputs, the input blocks added in
   order by `tdpbf16ps`, the bias added in fp32, then one round-to-nearest-even to bf16 (`vcvtne2ps2bf16`). It is
   faster because it streams the weight once, 32 outputs at a time, prefetching a few tiles ahead, where oneDNN
   read it at 3-6.5 GB/s on one core of an AMX Xeon whose plain reads run at 8 GB/s (this kernel: about 7).

   AVX512-BF16 without AMX (AMD Zen 4, Intel Cooper Lake). There oneDNN packs AB16b64a2b: for each block of 64
   output features (the last one padded with zeros), every input pair in order, as [64 outputs][2 inputs] (256
   bytes: four registers of 16 outputs, each lane one output's pair, the operand of `vdpbf16ps`). Each row's
   input pair is broadcast and multiplied into the four registers. oneDNN's brgemm (3.x, avx512_core_bf16) sums
   the inputs in blocks of 512 (1,024 for more than one row when there are over 1,024 inputs): each block from
   zero by `vdpbf16ps` in order, then the block sums added in order; this does the same, so the bits are
   oneDNN's. At 1 to 8 rows oneDNN read the bundled model's weights at 21-35 GB/s on a 2-core EPYC where a torch
   sum over as many bytes reads 44-49; this kernel at 34-45 GB/s (up to 6 rows per pass over a block, 4 x 6
   accumulators; more rows take more passes, the block then coming from L2).

   Either way the engine checks the bits against oneDNN on the model's shapes before using it (`matmul_cpu.py`),
   which also catches a layout or a blocking other than the ones assumed here. The output blocks are shared out
   among `threads` OpenMP threads (torch's pool: the library links the libgomp torch loaded), each taking a
   contiguous run, so any thread count gives the same bits. */

#include <string.h>

#include "amx.h"

#define MAX_ROWS 32
#define BLOCK 32  /* outputs and inputs per weight tile */
#define TILE_ELEMENTS (BLOCK * BLOCK)
#define PREFETCH_TILES 4  /* how far ahead the weight stream is prefetched (2 KiB a tile) */

#if HAVE_AMX || defined(__AVX512BF16__)
#include <immintrin.h>
#include <omp.h>

/* 16 bf16 values (the bias) widened to fp32, exactly. */
static inline __m512 widen16(__m256i bf16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}
#endif

#if HAVE_AMX
/* Tiles 0-3: accumulators [row half][output half]; 4, 5: the two row halves of the input; 6, 7: the two output
   halves of a weight tile. `rows` is 1 to 32; an unused second half still gets a valid (1-row) shape. */
static void configure_tiles(int rows) {
    TileConfig config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    const int first = rows < 16 ? rows : 16, second = rows > 16 ? rows - 16 : 1;
    const int tile_rows[8] = {first, first, second, second, first, second, 16, 16};
    for (int t = 0; t < 8; t++) {
        config.rows[t] = (uint8_t)tile_rows[t];
        config.bytes_per_row[t] = 64;
    }
    _tile_loadconfig(&config);
}

/* The 32 outputs of block `n_block` for every row. */
static void output_block(const uint16_t *x, int rows, int64_t in_features, const uint16_t *weight,
                         const uint16_t *weight_end, int64_t n_block, const uint16_t *bias, uint16_t *y,
                         int64_t out_features) {
    const int64_t k_blocks = in_features / BLOCK;
    const uint16_t *tile = weight + n_block * k_blocks * TILE_ELEMENTS;
    const int two_halves = rows > 16;
    float sums[MAX_ROWS * BLOCK] __attribute__((aligned(64)));
    _tile_zero(0);
    _tile_zero(1);
    if (two_halves) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t k = 0; k < k_blocks; k++, tile += TILE_ELEMENTS) {
        const char *ahead = (const char *)(tile + PREFETCH_TILES * TILE_ELEMENTS);
        if (ahead < (const char *)weight_end)
            for (int line = 0; line < TILE_ELEMENTS * 2; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
        _tile_loadd(4, x + k * BLOCK, in_features * 2);
        _tile_loadd(6, tile, 128);
        _tile_loadd(7, tile + 32, 128);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two_halves) {
            _tile_loadd(5, x + 16 * in_features + k * BLOCK, in_features * 2);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, sums, BLOCK * 4);
    _tile_stored(1, sums + 16, BLOCK * 4);
    if (two_halves) {
        _tile_stored(2, sums + 16 * BLOCK, BLOCK * 4);
        _tile_stored(3, sums + 16 * BLOCK + 16, BLOCK * 4);
    }
    const int64_t first_output = n_block * BLOCK;
    const __m512 bias_low = bias ? widen16(_mm256_loadu_si256((const __m256i *)(bias + first_output)))
                                 : _mm512_setzero_ps();
    const __m512 bias_high = bias ? widen16(_mm256_loadu_si256((const __m256i *)(bias + first_output + 16)))
                                  : _mm512_setzero_ps();
    for (int m = 0; m < rows; m++) {
        __m512 low = _mm512_load_ps(sums + m * BLOCK), high = _mm512_load_ps(sums + m * BLOCK + 16);
        if (bias) {
            low = _mm512_add_ps(low, bias_low);
            high = _mm512_add_ps(high, bias_high);
        }
        _mm512_storeu_si512(y + m * out_features + first_output, (__m512i)_mm512_cvtne2ps_pbh(high, low));
    }
}
#elif defined(__AVX512BF16__)

#define WIDE_BLOCK 64  /* outputs per packed block */
#define SLICE 16       /* outputs per register, the unit the threads share out */
#define SLICES (WIDE_BLOCK / SLICE)
#define ROW_GROUP 6    /* rows per pass over a block: 6 x 4 accumulators */
#define PREFETCH_PAIRS 8  /* how far ahead the weight stream is prefetched (2 KiB of a block) */

/* The inputs oneDNN's brgemm sums as one block before adding the block to the rest. */
static inline int64_t onednn_input_block(int64_t rows, int64_t in_features) {
    return rows == 1 || in_features <= 1024 ? 512 : 1024;
}

/* Outputs `first_output` .. + 16 x `slices` (slices 1-4 of one packed block, from `first_slice`) of `rows` rows
   (1 to ROW_GROUP), the inputs summed in blocks of `input_block`; `rows` and `slices` are constants once inlined,
   so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void block_pass(
        const uint16_t *x, const int rows, const int slices, int64_t in_features, int64_t input_block,
        const uint16_t *block, int first_slice, const uint16_t *bias, uint16_t *y, int64_t out_features,
        int64_t first_output) {
    const int64_t pairs = in_features / 2, block_pairs = input_block / 2;
    const uint32_t *x_pairs = (const uint32_t *)x;  /* row r's input pair k: x_pairs[r * pairs + k] */
    __m512 sum[ROW_GROUP][SLICES], total[ROW_GROUP][SLICES];
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < slices; j++) total[r][j] = _mm512_setzero_ps();  /* set by the first input block */
    for (int64_t start = 0; start < pairs; start += block_pairs) {
        const int64_t end = start + block_pairs < pairs ? start + block_pairs : pairs;
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < slices; j++) sum[r][j] = _mm512_setzero_ps();
        const uint16_t *w = block + start * 2 * WIDE_BLOCK + first_slice * 2 * SLICE;
        for (int64_t k = start; k < end; k++, w += 2 * WIDE_BLOCK) {
            __m512bh weights[SLICES];
            for (int j = 0; j < slices; j++) {
                _mm_prefetch((const char *)(w + PREFETCH_PAIRS * 2 * WIDE_BLOCK + j * 2 * SLICE), _MM_HINT_T0);
                weights[j] = (__m512bh)_mm512_loadu_si512(w + j * 2 * SLICE);
            }
            for (int r = 0; r < rows; r++) {
                const __m512bh pair = (__m512bh)_mm512_set1_epi32((int)x_pairs[r * pairs + k]);
                for (int j = 0; j < slices; j++) sum[r][j] = _mm512_dpbf16_ps(sum[r][j], pair, weights[j]);
            }
        }
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < slices; j++)
                total[r][j] = start == 0 ? sum[r][j] : _mm512_add_ps(total[r][j], sum[r][j]);
    }
    for (int j = 0; j < slices; j++) {
        const int64_t output = first_output + j * SLICE;
        const int64_t valid = out_features - output < SLICE ? out_features - output : SLICE;
        if (valid <= 0) break;
        const __mmask16 mask = (__mmask16)((1u << valid) - 1);
        const __m512 bias_fp32 = bias ? widen16(_mm256_maskz_loadu_epi16(mask, bias + output)) : _mm512_setzero_ps();
        for (int r = 0; r < rows; r++) {
            const __m512 value = bias ? _mm512_add_ps(total[r][j], bias_fp32) : total[r][j];
            _mm256_mask_storeu_epi16(y + r * out_features + output, mask, (__m256i)_mm512_cvtneps_pbh(value));
        }
    }
}

typedef void (*BlockPass)(const uint16_t *, int64_t, int64_t, const uint16_t *, int, const uint16_t *, uint16_t *,
                          int64_t, int64_t);
#define PASS(R, S)                                                                                                \
    static void pass_##R##_##S(const uint16_t *x, int64_t in_features, int64_t input_block, const uint16_t *block,  \
                               int first_slice, const uint16_t *bias, uint16_t *y, int64_t out_features,           \
                               int64_t first_output) {                                                             \
        block_pass(x, R, S, in_features, input_block, block, first_slice, bias, y, out_features, first_output);    \
    }
#define PASSES_OF(R) PASS(R, 1) PASS(R, 2) PASS(R, 3) PASS(R, 4)
PASSES_OF(1) PASSES_OF(2) PASSES_OF(3) PASSES_OF(4) PASSES_OF(5) PASSES_OF(6)
#define ROW_OF(R) {pass_##R##_1, pass_##R##_2, pass_##R##_3, pass_##R##_4}
static const BlockPass PASSES[ROW_GROUP][SLICES] = {ROW_OF(1), ROW_OF(2), ROW_OF(3), ROW_OF(4), ROW_OF(5), ROW_OF(6)};

/* Slices [first, end) of the output (16 outputs each; the last may be partial), every row. */
static void output_slices(const uint16_t *x, int64_t rows, int64_t in_features, const uint16_t *weight, int64_t first,
                          int64_t end, const uint16_t *bias, uint16_t *y, int64_t out_features) {
    const int64_t input_block = onednn_input_block(rows, in_features);  /* from all the rows, not a pass's */
    for (int64_t slice = first; slice < end;) {
        const int64_t block = slice / SLICES;
        const int first_slice = (int)(slice % SLICES);
        const int slices = (int)(end - slice < SLICES - first_slice ? end - slice : SLICES - first_slice);
        const uint16_t *packed = weight + block * WIDE_BLOCK * in_features;
        for (int64_t row = 0; row < rows; row += ROW_GROUP) {
            const int group = (int)(rows - row < ROW_GROUP ? rows - row : ROW_GROUP);
            PASSES[group - 1][slices - 1](x + row * in_features, in_features, input_block, packed, first_slice,
                                          bias, y + row * out_features, out_features, slice * SLICE);
        }
        slice += slices;
    }
}
#endif

/* y [rows, out_features] = x [rows, in_features] @ weight^T (+ bias), all bf16 and contiguous; `weight` is the
   oneDNN-packed buffer (out_features x in_features elements; on AVX512-BF16 the outputs padded to a multiple of 64),
   `bias` [out_features] or NULL. Returns 0, or -1 where this build has no kernel or for shapes it does not take
   (rows outside 1..32; input features not a multiple of 32, or on AMX output features not one): the caller checks
   first. */
int packed_linear(const uint16_t *x, int64_t rows, int64_t in_features, const uint16_t *weight,
                  int64_t out_features, const uint16_t *bias, uint16_t *y, int threads) {
#if HAVE_AMX
    if (rows < 1 || rows > MAX_ROWS || in_features % BLOCK || out_features % BLOCK) return -1;
    const int64_t n_blocks = out_features / BLOCK;
    const uint16_t *weight_end = weight + out_features * in_features;
#pragma omp parallel num_threads(threads < n_blocks ? threads : (int)n_blocks)
    {
        const int64_t count = omp_get_num_threads(), me = omp_get_thread_num();
        configure_tiles((int)rows);
        for (int64_t n = n_blocks * me / count; n < n_blocks * (me + 1) / count; n++)
            output_block(x, (int)rows, in_features, weight, weight_end, n, bias, y, out_features);
        _tile_release();
    }
    return 0;
#elif defined(__AVX512BF16__)
    if (rows < 1 || rows > MAX_ROWS || in_features % BLOCK || out_features < 1) return -1;
    const int64_t n_slices = (out_features + SLICE - 1) / SLICE;
#pragma omp parallel num_threads(threads < n_slices ? threads : (int)n_slices)
    {
        const int64_t count = omp_get_num_threads(), me = omp_get_thread_num();
        output_slices(x, rows, in_features, weight, n_slices * me / count, n_slices * (me + 1) / count, bias, y,
                      out_features);
    }
    return 0;
#else
    (void)x, (void)rows, (void)in_features, (void)weight, (void)out_features, (void)bias, (void)y, (void)threads;
    return -1;
#endif
}

/* Which packed layout this build reads: 1 AMX's, 2 AVX512-BF16's, 0 none (no kernel). */
int packed_linear_layout(void) {
#if HAVE_AMX
    return 1;
#elif defined(__AVX512BF16__)
    return 2;
#else
    return 0;
#endif
}
