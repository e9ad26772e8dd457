// Float32 rows through 8-bit weight codes (GGUF's Q8_0, and Q5_0 as Q8_0's codes) in exact
// integer sums: out = x @ W^T, w = d * q, q in -128..127, one float16 d per 32 weights of a row.
//
// Layout (pagedkv/kernels/cpu/ops.pack_q8): per tile of 16 output rows, the codes of each group
// of 32 columns in turn, 512 bytes a group (vector kk holds output n's q + 128 for columns 4kk ..
// 4kk + 3 in bytes 4n .. 4n + 3: VPDPBUSD's unsigned operand as it is loaded), then the groups'
// scales, 16 float16 a group. 34 bytes per 32 weights, as the file stores them.
//
// Each row's group of 32 activations becomes signed bytes (cpu_digits.h): a = x * 127 / max |x|
// rounded, as cpu_vnni.c's (and llama.cpp's for the same files). Then
//   sum(a * q) = sum(a * (q + 128)) - 128 * sum(a),
// exact in int32, one VPDPBUSD per 64 products, and each group adds (d * x's scale) * sum to its
// 16 outputs with one FMA, groups in increasing order: a row's result is the same whatever the
// other rows, their number or the threads. (14 bits in two bytes before: twice the products.)
//
// Why: cpu_vnni.c takes 8-bit codes as two 4-bit halves: twice the products and the nibbles to
// unpack (with its activations in three bytes, six VPDPBUSD per 64 products; one row was then
// bound by instructions: Gemma 3 270M's tied lm_head, 262,144 x 640 in Q8_0, 11.4 ms, 15.7 GB/s
// of one core's 26-31). Here the codes go into the products as loaded. Where AMX is there, the
// models keep the halves instead (cpu_vnni.c's tile products outrun these from a few rows).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_api.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include "cpu_digits.h"

#define TILE 16
#define GROUP 32
#define CODES 512            // a group's codes in a tile
#define DIGITS 32            // a group's activations in a row, a signed byte each
#define ACTIVATION_BITS 7    // a in -127 .. 127, each group's largest +-127
#define MICRO_ROWS 8         // rows per pass over a tile's codes: 8 integer sums in registers
#define PANEL_BYTES (256 * 1024)  // a panel of rows' digits, kept in L2 while every tile passes
// One row streams the codes from memory: prefetched into L2 this far ahead (Zen 4, one thread,
// Gemma 3 270M's lm_head: 2 KB ahead 13.8 ms, 16 KB 9.1, 32 KB 8.3-8.7, 64 KB 8.6-8.8).
#define PREFETCH_BYTES (32 * 1024)

int q8_linear_supported(void) { return 1; }

// A row's digits, group after group, and its groups' constants.
static void row_digits(const float *x, int64_t groups, int8_t *dst, RowGroup *info) {
    for (int64_t g = 0; g < groups; g++) {
        __m512i a[2];
        integers(x + g * GROUP, a, info + g, ACTIVATION_BITS, 1);
        for (int i = 0; i < 2; i++) store_bytes(dst + g * DIGITS + i * 16, a[i]);
    }
}

static inline __m512i broadcast4(const int8_t *p) {
    int32_t four;
    memcpy(&four, p, 4);
    return _mm512_set1_epi32(four);
}

// `rows` rows (their digits `xd`, `groups` groups each, and constants) against one tile.
static inline __attribute__((always_inline)) void tile_rows(const int8_t *xd, const RowGroup *info, int64_t groups,
                                                            const uint8_t *tile, float *out, int64_t out_stride,
                                                            const int rows) {
    const uint8_t *scales = tile + groups * CODES;
    __m512 acc[MICRO_ROWS];
    for (int i = 0; i < rows; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *codes = tile + g * CODES;
        for (int line = 0; line < CODES; line += 64) __builtin_prefetch(codes + PREFETCH_BYTES + line, 0, 2);
        __m512i s[MICRO_ROWS];
        for (int i = 0; i < rows; i++) s[i] = _mm512_setzero_si512();
        for (int kk = 0; kk < 8; kk++) {
            const __m512i b = _mm512_loadu_si512(codes + 64 * kk);
            for (int i = 0; i < rows; i++)
                s[i] = _mm512_dpbusd_epi32(s[i], b, broadcast4(xd + (i * groups + g) * DIGITS + 4 * kk));
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + g * TILE * 2)));
        for (int i = 0; i < rows; i++) {
            const RowGroup *ri = info + i * groups + g;
            const __m512i sums = _mm512_sub_epi32(s[i], _mm512_set1_epi32(128 * ri->total));
            acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(ri->scale)), _mm512_cvtepi32_ps(sums), acc[i]);
        }
    }
    for (int i = 0; i < rows; i++) _mm512_storeu_ps(out + i * out_stride, acc[i]);
}

// Rows 0 .. rows - 1 against one tile, MICRO_ROWS at a time.
static void tile_panel(const int8_t *xd, const RowGroup *info, int64_t groups, const uint8_t *tile, int64_t rows,
                       float *out, int64_t out_stride) {
    for (int64_t r = 0; r < rows; r += MICRO_ROWS) {
        const int8_t *x = xd + r * groups * DIGITS;
        const RowGroup *ri = info + r * groups;
        float *o = out + r * out_stride;
        switch (rows - r < MICRO_ROWS ? (int)(rows - r) : MICRO_ROWS) {
            case 1: tile_rows(x, ri, groups, tile, o, out_stride, 1); break;
            case 2: tile_rows(x, ri, groups, tile, o, out_stride, 2); break;
            case 3: tile_rows(x, ri, groups, tile, o, out_stride, 3); break;
            case 4: tile_rows(x, ri, groups, tile, o, out_stride, 4); break;
            case 5: tile_rows(x, ri, groups, tile, o, out_stride, 5); break;
            case 6: tile_rows(x, ri, groups, tile, o, out_stride, 6); break;
            case 7: tile_rows(x, ri, groups, tile, o, out_stride, 7); break;
            default: tile_rows(x, ri, groups, tile, o, out_stride, 8); break;
        }
    }
}

// x: float32 [m, k], rows x_stride apart; packed: [n_out, k] as laid out above; out: float32
// [m, n_out], contiguous. n_out a multiple of 16, k of 32. Returns 0 or -2 (out of memory).
int q8_linear(const float *x, int64_t x_stride, int64_t m, int64_t k, const uint8_t *packed, int64_t n_out,
              float *out, int num_threads) {
    if (m <= 0) return 0;
    const int64_t tiles = n_out / TILE, groups = k / GROUP, tile_bytes = groups * (CODES + TILE * 2);
    int8_t *xd = malloc(m * groups * DIGITS);
    RowGroup *info = malloc(m * groups * sizeof(RowGroup));
    if (!xd || !info) {
        free(xd);
        free(info);
        return -2;
    }
    // Panels of rows whose digits stay in L2 while every tile passes: one job a panel and tile,
    // consecutive jobs one panel through the tiles.
    int64_t panel = PANEL_BYTES / (groups * DIGITS) / MICRO_ROWS * MICRO_ROWS;
    if (panel < MICRO_ROWS) panel = MICRO_ROWS;
    const int64_t jobs = (m + panel - 1) / panel * tiles;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < m; r++)
            row_digits(x + r * x_stride, groups, xd + r * groups * DIGITS, info + r * groups);
#pragma omp for schedule(static)
        for (int64_t j = 0; j < jobs; j++) {
            const int64_t r0 = j / tiles * panel, t = j % tiles;
            tile_panel(xd + r0 * groups * DIGITS, info + r0 * groups, groups, packed + t * tile_bytes,
                       m - r0 < panel ? m - r0 : panel, out + r0 * n_out + t * TILE, n_out);
        }
    }
    free(xd);
    free(info);
    return 0;
}
#else
int q8_linear_supported(void) { return 0; }

int q8_linear(const float *x, int64_t x_stride, int64_t m, int64_t k, const uint8_t *packed, int64_t n_out,
              float *out, int num_threads) {
    (void)x, (void)x_stride, (void)m, (void)k, (void)packed, (void)n_out, (void)out, (void)num_threads;
    return -5;
}
#endif
