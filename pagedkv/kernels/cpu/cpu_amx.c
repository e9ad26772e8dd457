// Weight-only 4-bit matrix products with bfloat16 activations on AMX: out = x @ W^T, x and out
// bfloat16, W packed as pagedkv/kernels/cpu/cpu_int4.h lays it out. Each weight is dequantized in float32
// (scale * code + offset, as cpu_int4.c; Q8_0's halves joined into the 8-bit code) and rounded
// to bfloat16, the weight a bfloat16 model dequantized from the same file holds; TDPBF16PS adds
// the exact products to float32 sums; each output is rounded once to bfloat16.
//
// Why: with float32 arithmetic a batch (a prompt, a decode step of many sequences) runs at the
// pace of float32 FMAs, and a bfloat16 model's activations were converted to float32 for it.
// One AMX tile product is 8,192 multiply-adds. SmolLM2-135M's matrices (1 thread,
// tools/bench_cpu_kernels): 2 times cpu_int4.c's speed at 16 rows, 3.5 at 64, 4.4 to 4.8 from
// 128 on; at 1 row, where dequantizing the weights is the work, 0.63 times (a bfloat16 model's
// 4-bit layers take this kernel at every size all the same: see below).
//
// Every output is the same sum, over groups of 32 columns in increasing order, whatever the
// number of rows, the blocking and the threads: a row's result does not depend on its batch, so
// preemption stays invisible in the outputs. (VDPBF16PS or a float32 path for few rows would
// round differently.)
//
// Tiles: A = 16 rows of x by 32 columns (x copied once into contiguous A tiles, the last rows
// zero); B = one tile's group of weights, 16 column pairs by 16 output rows (VNNI: each dword
// holds a row's weights for columns 2p and 2p + 1), the order the packed codes already have;
// C = 16 rows of x by 16 outputs, float32. Up to 2 x 2 products per step: tiles 0-1 A, 2-3 B,
// 4-7 C. Up to 32 rows, each group's weights are dequantized as the pass reaches them; more
// rows take blocks of ROW_BLOCK, and the weights in chunks of CHUNK_GROUPS groups, dequantized
// once for the block and kept in L1 while its rows pass, the sums kept between chunks.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_api.h"
#include "cpu_int4.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023  // Linux: ask for a state component (AMX's tile data, 18)
#define XFEATURE_XTILEDATA 18
#define ROWS_PER_PASS 32     // rows of x per pass over a group's weights: two A tiles
#define CHUNK_GROUPS 8       // groups per chunk of weights dequantized for a block of rows (2 x 8 KB)
#define ROW_BLOCK 256        // rows of x per job: their A tiles stay in L2 while the weights pass
#define PREFETCH_BYTES 3072  // how far ahead a pass of few rows asks for the weights

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

static int amx_allowed = 1;  // amx_enable(0) turns AMX off, so that tests reach the other paths

// Whether the kernels may use AMX: the process's permission for AMX's tile state, asked once,
// and not turned off.
int amx_supported(void) {
    static int state;  // 0: not asked; 1: granted; -1: refused (an old kernel, a VM without AMX)
    if (!state) state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    return state == 1 && amx_allowed;
}

void amx_enable(int on) { amx_allowed = on; }

// Every tile 16 rows of 64 bytes (the kernels' A, B and C tiles all are). A constant in memory:
// GCC does not see that LDTILECFG reads its operand, and dropped the stores to a local one.
static const TileConfig TILES = {.palette = 1,
                                 .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
                                 .rows = {16, 16, 16, 16, 16, 16, 16, 16}};

void amx_configure_tiles(void) { _tile_loadconfig(&TILES); }

// C tile `c` (16 x 16 float32) to `rows` rows of out, rounded to bfloat16.
#define STORE_C(c, out, out_stride, rows)                                                      \
    do {                                                                                         \
        float sums[TILE * TILE] __attribute__((aligned(64)));                                    \
        _tile_stored(c, sums, TILE * 4);                                                         \
        for (int r_ = 0; r_ < (rows); r_++)                                                      \
            _mm256_storeu_si256((__m256i *)((out) + r_ * (out_stride)),                          \
                                (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(sums + r_ * TILE))); \
    } while (0)

#define A_WORDS (TILE * GROUP)  // an A or B tile: 16 rows of 32 bfloat16
#define C_FLOATS (TILE * TILE)  // a C tile

// x's rows as A tiles: slab s (rows 16s .. 16s + 15) and group g at (s * groups + g) * A_WORDS,
// rows past m zero, so that every tile load is one contiguous kilobyte.
static void pack_slab(const uint16_t *x, int64_t x_stride, int64_t m, int64_t groups, int64_t slab, uint16_t *dst) {
    for (int r = 0; r < TILE; r++) {
        const int64_t row = slab * TILE + r;
        for (int64_t g = 0; g < groups; g++) {
            uint16_t *d = dst + (slab * groups + g) * A_WORDS + r * GROUP;
            if (row < m) memcpy(d, x + row * x_stride + g * GROUP, GROUP * sizeof(uint16_t));
            else memset(d, 0, GROUP * sizeof(uint16_t));
        }
    }
}

// Groups g0 .. g1-1 for the slabs `slab` (and slab + 1 where a_rows is 32) against one or two
// tiles (`tiles`). The sums start from zero at group 0, else from `partial` (float32 C tiles,
// C_FLOATS apart), and go to `partial` again, or, after the last group, to `rows` rows of out.
// Weights from `panel` (two tiles' B tiles for these groups, `tile_words` apart), or, where it
// is NULL, dequantized group by group into `scratch`.
static inline __attribute__((always_inline)) void pass(const uint16_t *xa, int64_t groups, int64_t g0, int64_t g1,
                                                       int64_t split, const uint8_t *tile, int64_t tile_bytes,
                                                       const int tiles, const int a_rows, const uint16_t *panel,
                                                       int64_t tile_words, uint16_t *scratch, int half, float *partial,
                                                       uint16_t *out, int64_t out_stride, int rows) {
    if (g0 == 0) {
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
        _tile_zero(7);
    } else {
        _tile_loadd(4, partial, TILE * 4);
        if (tiles == 2) _tile_loadd(5, partial + C_FLOATS, TILE * 4);
        if (a_rows == 32) _tile_loadd(6, partial + 2 * C_FLOATS, TILE * 4);
        if (tiles == 2 && a_rows == 32) _tile_loadd(7, partial + 3 * C_FLOATS, TILE * 4);
    }
    for (int64_t g = g0; g < g1; g++) {
        const uint16_t *b0, *b1;
        if (panel) {
            b0 = panel + (g - g0) * A_WORDS;
            b1 = b0 + tile_words;
        } else {
            for (int line = 0; line < group_bytes(half); line += 64)
                __builtin_prefetch(tile + g * group_bytes(half) + PREFETCH_BYTES + line);
            weights_tile(tile, g, half, split, scratch);
            if (tiles == 2) weights_tile(tile + tile_bytes, g, half, split, scratch + A_WORDS);
            b0 = scratch;
            b1 = scratch + A_WORDS;
        }
        const uint16_t *a = xa + g * A_WORDS;
        _tile_loadd(0, a, 64);
        _tile_loadd(2, b0, 64);
        _tile_dpbf16ps(4, 0, 2);
        if (tiles == 2) {
            _tile_loadd(3, b1, 64);
            _tile_dpbf16ps(5, 0, 3);
        }
        if (a_rows == 32) {
            _tile_loadd(1, a + groups * A_WORDS, 64);
            _tile_dpbf16ps(6, 1, 2);
            if (tiles == 2) _tile_dpbf16ps(7, 1, 3);
        }
    }
    if (g1 < groups) {
        _tile_stored(4, partial, TILE * 4);
        if (tiles == 2) _tile_stored(5, partial + C_FLOATS, TILE * 4);
        if (a_rows == 32) _tile_stored(6, partial + 2 * C_FLOATS, TILE * 4);
        if (tiles == 2 && a_rows == 32) _tile_stored(7, partial + 3 * C_FLOATS, TILE * 4);
        return;
    }
    const int upper = rows < 16 ? rows : 16, lower = rows - upper;
    STORE_C(4, out, out_stride, upper);
    if (tiles == 2) STORE_C(5, out + TILE, out_stride, upper);
    if (a_rows == 32) {
        STORE_C(6, out + 16 * out_stride, out_stride, lower);
        if (tiles == 2) STORE_C(7, out + 16 * out_stride + TILE, out_stride, lower);
    }
}

#define PASS_CASES(...)                                                          \
    if (count == 2 && a_rows == 32) pass(__VA_ARGS__, 2, 32, PASS_REST);        \
    else if (count == 2) pass(__VA_ARGS__, 2, 16, PASS_REST);                   \
    else if (a_rows == 32) pass(__VA_ARGS__, 1, 32, PASS_REST);                 \
    else pass(__VA_ARGS__, 1, 16, PASS_REST);

// x: bfloat16 [m, x_cols], rows x_stride apart; W: [n_out, w_cols] packed (cpu_int4.h), w_cols
// = x_cols, or 2 * x_cols for Q8_0's split codes (columns x_cols.. hold the low halves); out:
// bfloat16 [m, n_out], contiguous. n_out a multiple of 16, x_cols of 32. Returns 0, -2 (out of
// memory) or -5 (no AMX here).
int int4_linear_amx(const uint16_t *x, int64_t x_stride, int64_t m, int64_t x_cols, const uint8_t *packed,
                    int half, int64_t n_out, int64_t w_cols, uint16_t *out, int num_threads) {
    if (!amx_supported()) return -5;
    if (m <= 0) return 0;
    // Groups of x's columns; Q8_0's split codes have twice as many, `split` apart.
    const int64_t tiles = n_out / TILE, groups = x_cols / GROUP, tile_bytes = w_cols / GROUP * group_bytes(half);
    const int64_t split = w_cols == x_cols ? 0 : groups;
    const int64_t pairs = (tiles + 1) / 2, blocks = (m + ROW_BLOCK - 1) / ROW_BLOCK, slabs = (m + TILE - 1) / TILE;
    const int64_t jobs = pairs * blocks;  // consecutive jobs take one block of rows through every tile pair
    const int64_t chunk = m > ROWS_PER_PASS ? CHUNK_GROUPS : groups;  // groups per panel
    uint16_t *xa = aligned_alloc(64, slabs * groups * A_WORDS * sizeof(uint16_t));
    if (!xa) return -2;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && jobs > 1)
    {
#pragma omp for schedule(static)
        for (int64_t s = 0; s < slabs; s++) pack_slab(x, x_stride, m, groups, s, xa);
        amx_configure_tiles();
        // Two tiles' B tiles for a chunk of groups (or one group's), and a block's partial sums.
        uint16_t *weights = aligned_alloc(64, 2 * chunk * A_WORDS * sizeof(uint16_t));
        float *partial = aligned_alloc(64, (ROW_BLOCK + ROWS_PER_PASS) / TILE * 2 * C_FLOATS * sizeof(float));
        if (!weights || !partial) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < jobs; j++) {
            if (!weights || !partial) continue;
            const int64_t t = j % pairs * 2, r0 = j / pairs * ROW_BLOCK;
            const int count = tiles - t < 2 ? 1 : 2;
            const int64_t rows = m - r0 < ROW_BLOCK ? m - r0 : ROW_BLOCK;
            const uint8_t *tile = packed + t * tile_bytes;
            uint16_t *o = out + r0 * n_out + t * TILE;
            if (rows <= ROWS_PER_PASS) {  // one pass: each group's weights dequantized as it comes
                const int n = (int)rows, a_rows = n <= 16 ? 16 : 32;
#define PASS_REST NULL, 0, weights, half, partial, o, n_out, n
                PASS_CASES(xa + r0 / TILE * groups * A_WORDS, groups, 0, groups, split, tile, tile_bytes)
#undef PASS_REST
                continue;
            }
            // Chunks of groups: their weights dequantized once for all the block's rows, and
            // small enough to stay in L1 while the rows pass.
            for (int64_t g0 = 0; g0 < groups; g0 += chunk) {
                const int64_t g1 = g0 + chunk < groups ? g0 + chunk : groups;
                for (int64_t g = g0; g < g1; g++) {
                    weights_tile(tile, g, half, split, weights + (g - g0) * A_WORDS);
                    if (count == 2)
                        weights_tile(tile + tile_bytes, g, half, split, weights + (chunk + g - g0) * A_WORDS);
                }
                for (int64_t i = 0; i < rows; i += ROWS_PER_PASS) {
                    const int n = rows - i < ROWS_PER_PASS ? (int)(rows - i) : ROWS_PER_PASS;
                    const int a_rows = n <= 16 ? 16 : 32;
                    float *sums = partial + i / TILE * 2 * C_FLOATS;
#define PASS_REST weights, chunk * A_WORDS, NULL, half, sums, o + i * n_out, n_out, n
                    PASS_CASES(xa + (r0 + i) / TILE * groups * A_WORDS, groups, g0, g1, split, tile, tile_bytes)
#undef PASS_REST
                }
            }
        }
        free(weights);
        free(partial);
        _tile_release();
    }
    free(xa);
    return failed ? -2 : 0;
}
#else
int amx_supported(void) { return 0; }

void amx_enable(int on) { (void)on; }

void amx_configure_tiles(void) {}

int int4_linear_amx(const uint16_t *x, int64_t x_stride, int64_t m, int64_t x_cols, const uint8_t *packed,
                    int half, int64_t n_out, int64_t w_cols, uint16_t *out, int num_threads) {
    (void)x, (void)x_stride, (void)m, (void)x_cols, (void)packed, (void)half, (void)n_out, (void)w_cols, (void)out;
    (void)num_threads;
    return -5;
}
#endif
