/* bf16 linear layers of decode-sized CPU steps (up to 32 rows) on AMX, reading the weight oneDNN packed at load.

   `PackedLinear` keeps each weight in oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`). On AMX
   cores oneDNN picks AB16b32a2b for it: for each block of 32 output features, every block of 32 input features in
   order, each a 32 x 32 tile of [16 input pairs][32 outputs][2 inputs], exactly the B operand of AMX's bf16 dot
   product (two 16-column tiles side by side, 128 bytes a row). This kernel reads that buffer in place, so the
   weights are stored once. For at most 32 rows it computes what oneDNN's brgemm computes, bit for bit: one fp32
   accumulator tile per 16 x 16 outputs, the input blocks added in order by `tdpbf16ps`, the bias added in fp32,
   then one round-to-nearest-even to bf16 (`vcvtne2ps2bf16`). It is faster because it streams the weight once,
   32 outputs at a time, prefetching a few tiles ahead, where oneDNN read it at 3-6.5 GB/s on one core of an AMX
   Xeon whose plain reads run at 8 GB/s (this kernel: about 7). The engine checks the bits against oneDNN on the model's shapes before using it
   (`matmul_cpu.py`), which also catches a layout other than the one assumed here.

   The blocks of 32 outputs are shared out among `threads` OpenMP threads (torch's pool: the library links the
   libgomp torch loaded), each taking a contiguous run, so any thread count gives the same bits. */

#include <string.h>

#include "amx.h"

#define MAX_ROWS 32
#define BLOCK 32  /* outputs and inputs per weight tile */
#define TILE_ELEMENTS (BLOCK * BLOCK)
#define PREFETCH_TILES 4  /* how far ahead the weight stream is prefetched (2 KiB a tile) */

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

static inline __m512 widen16(const uint16_t *bf16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)bf16)),
                                                 16));
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
    const __m512 bias_low = bias ? widen16(bias + first_output) : _mm512_setzero_ps();
    const __m512 bias_high = bias ? widen16(bias + first_output + 16) : _mm512_setzero_ps();
    for (int m = 0; m < rows; m++) {
        __m512 low = _mm512_load_ps(sums + m * BLOCK), high = _mm512_load_ps(sums + m * BLOCK + 16);
        if (bias) {
            low = _mm512_add_ps(low, bias_low);
            high = _mm512_add_ps(high, bias_high);
        }
        _mm512_storeu_si512(y + m * out_features + first_output, (__m512i)_mm512_cvtne2ps_pbh(high, low));
    }
}
#endif

/* y [rows, out_features] = x [rows, in_features] @ weight^T (+ bias), all bf16 and contiguous; `weight` is the
   oneDNN-packed buffer (out_features x in_features elements), `bias` [out_features] or NULL. Returns 0, or -1
   where this build has no AMX kernel or for shapes it does not take (rows outside 1..32, features not multiples
   of 32): the caller checks first. */
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
#else
    (void)x, (void)rows, (void)in_features, (void)weight, (void)out_features, (void)bias, (void)y, (void)threads;
    return -1;
#endif
}
