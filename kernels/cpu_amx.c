// Weight-only 4-bit matrix products with bfloat16 activations on AMX: out = x @ W^T, x and out
// bfloat16, W packed as kernels/cpu_int4.h lays it out. Each weight is dequantized in float32
// (scale * code + offset, as cpu_int4.c; Q8_0's two halves added) and rounded to bfloat16, the
// weight a bfloat16 model dequantized from the same file holds; TDPBF16PS adds the exact products to float32 sums;
// each output is rounded once to bfloat16.
//
// Why: with float32 arithmetic a batch (a prompt, a decode step of many sequences) runs at the
// pace of float32 FMAs, and a bfloat16 model's activations were converted to float32 for it.
// One AMX tile product is 8,192 multiply-adds.
//
// Every output is the same sum, over groups of 32 columns in increasing order, whatever the
// number of rows, the blocking and the threads: a row's result does not depend on its batch, so
// preemption stays invisible in the outputs. (This kernel serves a bfloat16 model's 4-bit
// layers at every size for that reason; VDPBF16PS or a float32 path would round differently.)
//
// Tiles: A = 16 rows of x by 32 columns; B = one tile's group of weights, 16 column pairs by 16
// output rows (VNNI: each dword holds a row's weights for columns 2p and 2p + 1), which is the
// order the packed codes already have; C = 16 rows of x by 16 outputs, float32. Up to 2 x 2
// products per step: tiles 0-1 A, 2-3 B, 4-7 C.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_int4.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023  // Linux: ask for a state component (AMX's tile data, 18)
#define XFEATURE_XTILEDATA 18
#define ROWS_PER_PASS 32     // rows of x per pass over a group's weights: two A tiles
#define PANEL_FROM_ROWS 33   // blocks of more rows dequantize their tiles' weights once, into a buffer
#define ROW_BLOCK 256        // rows of x per job: their A tiles stay in L2 while the weights pass
#define PREFETCH_BYTES 3072  // how far ahead a pass of few rows asks for the weights

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

// Whether the kernel may run: the process's permission for AMX's tile state, asked once.
int amx_int4_supported(void) {
    static int state;  // 0: not asked; 1: granted; -1: refused (an old kernel, a VM without AMX)
    if (!state) state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    return state == 1;
}

static void configure_tiles(void) {
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.colsb[t] = 64, c.rows[t] = 16;
    _tile_loadconfig(&c);
}

// A group's scales and offsets, and its codes.
typedef struct {
    __m512 scale, offset;
    const uint8_t *codes;
} Group;

static inline __attribute__((always_inline)) Group group_at(const uint8_t *tile, int64_t g, const int half) {
    const int64_t k = g * GROUP;
    return (Group){(__m512)group_vector(tile, k, 0, half), (__m512)group_vector(tile, k, 1, half),
                   pair_codes(tile, k, half)};
}

// Column pair p of a group as float32 vectors over the tile's 16 rows: columns 2p (low) and
// 2p + 1 (high).
static inline __attribute__((always_inline)) void pair_weights(const Group *g, int p, __m512 *low, __m512 *high) {
    const __m512i both = (__m512i)widen(g->codes + p * TILE);
    *low = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(both, _mm512_set1_epi32(15))), g->scale, g->offset);
    *high = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(both, 4)), g->scale, g->offset);
}

// Group g of a tile's weights as a B tile (16 rows of 64 bytes). With `split` (Q8_0's codes as
// two 4-bit halves, the low halves `split` groups on), the halves are added in float32 first,
// exactly (a float16 scale times an 8-bit code), so the weight rounded is the file's d * q.
static inline __attribute__((always_inline)) void weights_tile(const uint8_t *tile, int64_t g, const int half,
                                                               int64_t split, uint16_t *dst) {
    // Rounded to bfloat16, each row's column pair lands in one dword, lower column first.
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    // Read once: the stores below may alias the codes' bytes as far as the compiler knows.
    const Group first = group_at(tile, g, half), second = group_at(tile, g + split, half);
    for (int p = 0; p < GROUP / 2; p++) {
        __m512 low, high;
        pair_weights(&first, p, &low, &high);
        if (split) {
            __m512 low2, high2;
            pair_weights(&second, p, &low2, &high2);
            low = _mm512_add_ps(low, low2);
            high = _mm512_add_ps(high, high2);
        }
        const __m512i pairs = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(high, low));
        _mm512_store_si512(dst + p * 32, pairs);
    }
}

// C tile `c` (16 x 16 float32) to `rows` rows of out, rounded to bfloat16.
#define STORE_C(c, out, out_stride, rows)                                                      \
    do {                                                                                         \
        float sums[TILE * TILE] __attribute__((aligned(64)));                                    \
        _tile_stored(c, sums, TILE * 4);                                                         \
        for (int r_ = 0; r_ < (rows); r_++)                                                      \
            _mm256_storeu_si256((__m256i *)((out) + r_ * (out_stride)),                          \
                                (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(sums + r_ * TILE))); \
    } while (0)

// Up to ROWS_PER_PASS rows of x (a_rows: 16 or 32; x padded to them) against one or two tiles
// (`tiles`), all groups. Weights from `panel` (per tile, per group, a B tile), or, where panel
// is NULL, dequantized group by group into `scratch`.
static inline __attribute__((always_inline)) void pass(const uint16_t *x, int64_t x_stride, int64_t groups,
                                                       int64_t split, const uint8_t *tile, int64_t tile_bytes,
                                                       const int tiles, const int a_rows, const uint16_t *panel,
                                                       uint16_t *scratch, int half, uint16_t *out,
                                                       int64_t out_stride, int rows) {
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    const int64_t x_bytes = x_stride * 2, b_words = TILE * GROUP;
    for (int64_t g = 0; g < groups; g++) {
        const uint16_t *b0, *b1;
        if (panel) {
            b0 = panel + g * b_words;
            b1 = panel + (groups + g) * b_words;
        } else {
            for (int line = 0; line < group_bytes(half); line += 64)
                __builtin_prefetch(tile + g * group_bytes(half) + PREFETCH_BYTES + line);
            weights_tile(tile, g, half, split, scratch);
            if (tiles == 2) weights_tile(tile + tile_bytes, g, half, split, scratch + b_words);
            b0 = scratch;
            b1 = scratch + b_words;
        }
        const uint16_t *xg = x + g * GROUP;
        _tile_loadd(0, xg, x_bytes);
        _tile_loadd(2, b0, 64);
        _tile_dpbf16ps(4, 0, 2);
        if (tiles == 2) {
            _tile_loadd(3, b1, 64);
            _tile_dpbf16ps(5, 0, 3);
        }
        if (a_rows == 32) {
            _tile_loadd(1, xg + 16 * x_stride, x_bytes);
            _tile_dpbf16ps(6, 1, 2);
            if (tiles == 2) _tile_dpbf16ps(7, 1, 3);
        }
    }
    const int upper = rows < 16 ? rows : 16, lower = rows - upper;
    STORE_C(4, out, out_stride, upper);
    if (tiles == 2) STORE_C(5, out + TILE, out_stride, upper);
    if (a_rows == 32) {
        STORE_C(6, out + 16 * out_stride, out_stride, lower);
        if (tiles == 2) STORE_C(7, out + 16 * out_stride + TILE, out_stride, lower);
    }
}

// x: bfloat16 [m, x_cols], rows x_stride apart; W: [n_out, w_cols] packed (cpu_int4.h), w_cols
// = x_cols, or 2 * x_cols for Q8_0's split codes (columns x_cols.. hold the low halves); out:
// bfloat16 [m, n_out], contiguous. n_out a multiple of 16, x_cols of 32. Returns 0, -2 (out of
// memory) or -5 (no AMX here).
int int4_linear_amx(const uint16_t *x, int64_t x_stride, int64_t m, int64_t x_cols, const uint8_t *packed,
                    int half, int64_t n_out, int64_t w_cols, uint16_t *out, int num_threads) {
    if (!amx_int4_supported()) return -5;
    // Groups of x's columns; Q8_0's split codes have twice as many, `split` apart.
    const int64_t tiles = n_out / TILE, groups = x_cols / GROUP, tile_bytes = w_cols / GROUP * group_bytes(half);
    const int64_t split = w_cols == x_cols ? 0 : groups;
    const int64_t pairs = (tiles + 1) / 2, blocks = (m + ROW_BLOCK - 1) / ROW_BLOCK;
    const int64_t jobs = pairs * blocks;  // consecutive jobs take one block of rows through every tile pair
    const int64_t b_words = TILE * GROUP;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && jobs > 1)
    {
        configure_tiles();
        // Weights (two tiles' B tiles: a panel, or one group's), and the last rows of a block padded to 32.
        uint16_t *weights = aligned_alloc(64, 2 * groups * b_words * sizeof(uint16_t));
        uint16_t *padded = aligned_alloc(64, ROWS_PER_PASS * x_cols * sizeof(uint16_t));
        if (!weights || !padded) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < jobs; j++) {
            if (!weights || !padded) continue;
            const int64_t t = j % pairs * 2, r0 = j / pairs * ROW_BLOCK;
            const int count = tiles - t < 2 ? 1 : 2;
            const int64_t rows = m - r0 < ROW_BLOCK ? m - r0 : ROW_BLOCK;
            const uint8_t *tile = packed + t * tile_bytes;
            const uint16_t *panel = NULL;
            if (rows >= PANEL_FROM_ROWS) {
                for (int64_t g = 0; g < groups; g++) {
                    weights_tile(tile, g, half, split, weights + g * b_words);
                    if (count == 2) weights_tile(tile + tile_bytes, g, half, split, weights + (groups + g) * b_words);
                }
                panel = weights;
            }
            for (int64_t i = 0; i < rows; i += ROWS_PER_PASS) {
                const int n = rows - i < ROWS_PER_PASS ? (int)(rows - i) : ROWS_PER_PASS;
                const uint16_t *xi = x + (r0 + i) * x_stride;
                int64_t stride = x_stride;
                if (n < ROWS_PER_PASS) {  // the A tiles read whole 16-row blocks: the last rows padded with zeros
                    const int a = n <= 16 ? 16 : 32;
                    for (int r = 0; r < a; r++) {
                        if (r < n) memcpy(padded + r * x_cols, xi + r * x_stride, x_cols * sizeof(uint16_t));
                        else memset(padded + r * x_cols, 0, x_cols * sizeof(uint16_t));
                    }
                    xi = padded;
                    stride = x_cols;
                }
                uint16_t *o = out + (r0 + i) * n_out + t * TILE;
                const int a_rows = n <= 16 ? 16 : 32;
                if (count == 2 && a_rows == 32)
                    pass(xi, stride, groups, split, tile, tile_bytes, 2, 32, panel, weights, half, o, n_out, n);
                else if (count == 2)
                    pass(xi, stride, groups, split, tile, tile_bytes, 2, 16, panel, weights, half, o, n_out, n);
                else if (a_rows == 32)
                    pass(xi, stride, groups, split, tile, tile_bytes, 1, 32, panel, weights, half, o, n_out, n);
                else
                    pass(xi, stride, groups, split, tile, tile_bytes, 1, 16, panel, weights, half, o, n_out, n);
            }
        }
        free(weights);
        free(padded);
        _tile_release();
    }
    return failed ? -2 : 0;
}
#else
int amx_int4_supported(void) { return 0; }

int int4_linear_amx(const uint16_t *x, int64_t x_stride, int64_t m, int64_t x_cols, const uint8_t *packed,
                    int half, int64_t n_out, int64_t w_cols, uint16_t *out, int num_threads) {
    (void)x, (void)x_stride, (void)m, (void)x_cols, (void)packed, (void)half, (void)n_out, (void)w_cols, (void)out;
    (void)num_threads;
    return -5;
}
#endif
