// Weight-only 4-bit matrix products for the CPU: out = x @ W^T with W in groups of 32 weights
// along K, w = scale * code + offset (GGUF's Q4_0/Q4_1/Q4_K, and Q8_0 as two 4-bit halves,
// joined again into the 8-bit code: pagedkv/runtime/models/quant.py, where offset = zero - 8 * scale;
// cpu_int4.h). Activations and arithmetic in float32.
//
// Every output is the same float32 sums over k (four, by k mod 4, each in increasing k, then
// added pairwise), whatever the number of rows and the tiling: a row's result does not depend
// on its batch, so preemption, which changes batches, stays invisible in the outputs. A batch
// of up to ROW_TILE rows decodes the codes as it goes; larger ones dequantize four tiles (64
// output rows) into a float32 buffer (K * 256 bytes, in L2) and run blocks of up to ROW_BLOCK
// rows against it (from GROUPED_ROWS rows; one tile at a time below): the 4-bit decoding is
// shared by the rows, each broadcast activation feeds four FMAs, and batches run at the pace of
// float32 FMAs (2,900 rows through SmolLM2's matrices: 5.0 s to 4.3 with groups of four tiles,
// 1 thread; 2.6 to 2.3 with 2).
//
// Packed layout: pagedkv/kernels/cpu/cpu_int4.h.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_api.h"
#include "cpu_int4.h"

#define ROW_TILE 6  // rows of x per pass over the weights: 24 accumulators
#define TILE_GROUP 4  // tiles multiplied together from GROUPED_ROWS rows
#define ROW_BLOCK 120  // rows of x per job with tile groups (a multiple of ROW_TILE)
#define GROUPED_ROWS 1024  // the fewest rows that take tile groups
#define PREFETCH_BYTES 3072          // how far ahead a pass of few rows asks for the weights


// The weights of one tile (16 rows) as float32 vectors: buf[k] = the rows' w[k], k < x_cols.
static inline __attribute__((always_inline)) void dequantize(const uint8_t *tile, int64_t x_cols, int64_t split,
                                                             vfloat *buf, const int half) {
    for (int64_t k = 0; k < x_cols; k += 4) {
        vfloat scale, offset;
        group_scales(tile, k, split, half, &scale, &offset);
        column_weights(tile, k, split, half, scale, offset, buf + k);
    }
}

// out[i][t * 16 .. t * 16 + 15] = sum over k of x[i][k] * buf[t * x_cols + k], for
// `rows` rows and `tiles` tiles (constants after inlining, so that the accumulators live in
// registers). Each sum is split into four by k mod 4, added up at the end, (s0 + s1) + (s2 +
// s3): independent chains of FMAs for any number of rows, in an order that does not depend on
// it. One pass per k mod 4 keeps rows * tiles accumulators live, so each broadcast x feeds
// `tiles` FMAs: with 6 rows and 4 tiles, 10 loads for 24 FMAs where one tile took 7 for 6.
static inline __attribute__((always_inline)) void multiply_rows(const float *x, int64_t x_stride, int64_t x_cols,
                                                                const vfloat *buf, float *out,
                                                                int64_t out_stride, const int rows,
                                                                const int tiles) {
    if (tiles == 1) {  // all four sums at once: 4 * rows chains, where one pass would have `rows`
        vfloat acc[ROW_TILE][4];
        for (int i = 0; i < rows; i++)
            for (int p = 0; p < 4; p++) acc[i][p] = (vfloat){0};
        for (int64_t k = 0; k < x_cols; k += 4) {
#pragma GCC unroll 4
            for (int p = 0; p < 4; p++) {
                const vfloat w = buf[k + p];
#pragma GCC unroll 6
                for (int i = 0; i < rows; i++) acc[i][p] += x[i * x_stride + k + p] * w;
            }
        }
        for (int i = 0; i < rows; i++) {
            const vfloat sum = (acc[i][0] + acc[i][1]) + (acc[i][2] + acc[i][3]);
            memcpy(out + i * out_stride, &sum, sizeof sum);
        }
        return;
    }
    vfloat part[4][ROW_TILE][TILE_GROUP];
    for (int p = 0; p < 4; p++) {
        vfloat acc[ROW_TILE][TILE_GROUP];
        for (int i = 0; i < rows; i++)
            for (int t = 0; t < tiles; t++) acc[i][t] = (vfloat){0};
        for (int64_t k = p; k < x_cols; k += 4) {
            vfloat w[TILE_GROUP];
            for (int t = 0; t < tiles; t++) w[t] = buf[t * x_cols + k];
#pragma GCC unroll 6
            for (int i = 0; i < rows; i++) {
                const float xi = x[i * x_stride + k];
                for (int t = 0; t < tiles; t++) acc[i][t] += xi * w[t];
            }
        }
        for (int i = 0; i < rows; i++)
            for (int t = 0; t < tiles; t++) part[p][i][t] = acc[i][t];
    }
    for (int i = 0; i < rows; i++)
        for (int t = 0; t < tiles; t++) {
            const vfloat sum = (part[0][i][t] + part[1][i][t]) + (part[2][i][t] + part[3][i][t]);
            memcpy(out + i * out_stride + t * TILE, &sum, sizeof sum);
        }
}

// The same sums for at most ROW_TILE rows, straight from the codes: each weight vector is
// decoded once and used by every row, without the buffer.
static inline __attribute__((always_inline)) void multiply_codes_rows(const float *x, int64_t x_stride,
                                                                      int64_t x_cols, int64_t split,
                                                                      const uint8_t *tile, float *out,
                                                                      int64_t out_stride, const int rows,
                                                                      const int half) {
    vfloat acc[ROW_TILE][4];
    for (int i = 0; i < rows; i++)
        for (int p = 0; p < 4; p++) acc[i][p] = (vfloat){0};
    for (int64_t k = 0; k < x_cols; k += 4) {
        if (k % GROUP == 0)  // the weights PREFETCH_BYTES ahead, as many cache lines as a group has
            for (int line = 0; line < group_bytes(half); line += 64) {
                __builtin_prefetch(tile + k / GROUP * group_bytes(half) + PREFETCH_BYTES + line);
                if (split) __builtin_prefetch(tile + (k + split) / GROUP * group_bytes(half) + PREFETCH_BYTES + line);
            }
        vfloat scale, offset, w[4];
        group_scales(tile, k, split, half, &scale, &offset);
        column_weights(tile, k, split, half, scale, offset, w);
#pragma GCC unroll 4
        for (int p = 0; p < 4; p++)
#pragma GCC unroll 6
            for (int i = 0; i < rows; i++) acc[i][p] += x[i * x_stride + k + p] * w[p];
    }
    for (int i = 0; i < rows; i++) {
        const vfloat sum = (acc[i][0] + acc[i][1]) + (acc[i][2] + acc[i][3]);
        memcpy(out + i * out_stride, &sum, sizeof sum);
    }
}

static inline __attribute__((always_inline)) void multiply_codes(const float *x, int64_t x_stride, int64_t x_cols,
                                                                 int64_t split, const uint8_t *tile, float *out,
                                                                 int64_t out_stride, int rows, const int half) {
    switch (rows) {
        case 1: multiply_codes_rows(x, x_stride, x_cols, split, tile, out, out_stride, 1, half); break;
        case 2: multiply_codes_rows(x, x_stride, x_cols, split, tile, out, out_stride, 2, half); break;
        case 3: multiply_codes_rows(x, x_stride, x_cols, split, tile, out, out_stride, 3, half); break;
        case 4: multiply_codes_rows(x, x_stride, x_cols, split, tile, out, out_stride, 4, half); break;
        case 5: multiply_codes_rows(x, x_stride, x_cols, split, tile, out, out_stride, 5, half); break;
        default: multiply_codes_rows(x, x_stride, x_cols, split, tile, out, out_stride, 6, half); break;
    }
}

#define ROWS_CASE(r, nt) \
    case r: multiply_rows(xi, x_stride, x_cols, buf, oi, out_stride, r, nt); break;
#define TILES_CASE(nt)                                                               \
    case nt:                                                                         \
        switch (rows - i < ROW_TILE ? rows - i : ROW_TILE) {                         \
            ROWS_CASE(1, nt) ROWS_CASE(2, nt) ROWS_CASE(3, nt) ROWS_CASE(4, nt) ROWS_CASE(5, nt) \
            default: multiply_rows(xi, x_stride, x_cols, buf, oi, out_stride, 6, nt);          \
        }                                                                            \
        break;

// Every row of x against `tiles` (1 .. TILE_GROUP) dequantized tiles, ROW_TILE rows at a time.
static void multiply(const float *x, int64_t x_stride, int64_t x_cols, const vfloat *buf,
                     float *out, int64_t out_stride, int64_t rows, int tiles) {
    for (int64_t i = 0; i < rows; i += ROW_TILE) {
        const float *xi = x + i * x_stride;
        float *oi = out + i * out_stride;
        switch (tiles) { TILES_CASE(1) TILES_CASE(2) TILES_CASE(3) TILES_CASE(4) }
    }
}

// The outputs of `tiles` consecutive tiles for m rows: from the codes, tile by tile (a batch of
// few rows); else through `buf`, the tiles dequantized once for the m rows. Both give the same
// bits: the same weights, the same sums in the same order.
static inline __attribute__((always_inline)) void tile_outputs(const float *x, int64_t x_stride, int64_t m,
                                                               int64_t x_cols, int64_t split, const uint8_t *tile,
                                                               int64_t tile_bytes, int tiles, float *out,
                                                               int64_t out_stride, vfloat *buf, const int half) {
    if (!buf) {
        for (int t = 0; t < tiles; t++)
            multiply_codes(x, x_stride, x_cols, split, tile + t * tile_bytes, out + t * TILE, out_stride, (int)m,
                           half);
    } else {
        for (int t = 0; t < tiles; t++) dequantize(tile + t * tile_bytes, x_cols, split, buf + t * x_cols, half);
        multiply(x, x_stride, x_cols, buf, out, out_stride, m, tiles);
    }
}

// x: float32 [m, x_cols] (rows x_stride apart); W: [n_out, w_cols] packed (cpu_int4.h), w_cols
// = x_cols, or 2 * x_cols for Q8_0's split codes (columns x_cols.. hold the low halves); out:
// float32 [m, n_out], contiguous. n_out a multiple of 16, x_cols of 32.
int int4_linear(const float *x, int64_t x_stride, int64_t m, int64_t x_cols, const uint8_t *packed, int half,
                int64_t n_out, int64_t w_cols, float *out, int num_threads) {
    if (vnni_supported())  // integer products where the CPU has them (cpu_vnni.c)
        return int4_linear_vnni(x, x_stride, m, x_cols, packed, half, n_out, w_cols, out, num_threads);
    const int64_t tiles = n_out / TILE, tile_bytes = w_cols / GROUP * group_bytes(half);
    const int64_t split = w_cols == x_cols ? 0 : x_cols;
    // Jobs: with tile groups, a group of TILE_GROUP tiles against a block of up to ROW_BLOCK
    // rows (rows that stay in L2 while every tile group of the matrix passes); else one tile
    // against all the rows.
    const int buffered = m > ROW_TILE;
    // Tile groups from GROUPED_ROWS rows (long prompts, whose rows outgrow L2): 1.2x on 2,900
    // rows of SmolLM2's matrices; at 600 rows they were 5% slower, at 7 rows 25% (1 thread),
    // and on 2 threads fewer, larger jobs share the work out less evenly.
    const int grouped = m >= GROUPED_ROWS;
    const int group = grouped ? TILE_GROUP : 1;
    const int64_t groups = (tiles + group - 1) / group, blocks = grouped ? (m + ROW_BLOCK - 1) / ROW_BLOCK : 1;
    // Blocks of about even size, in whole ROW_TILEs; consecutive jobs take one block through
    // every tile group, so that its rows stay in L2.
    const int64_t even = (m + blocks - 1) / blocks, block = (even + ROW_TILE - 1) / ROW_TILE * ROW_TILE;
    const int64_t jobs = groups * blocks;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && jobs > 1)
    {
        vfloat *buf = buffered ? aligned_alloc(64, sizeof(vfloat) * x_cols * TILE_GROUP) : NULL;
        if (buffered && !buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < jobs; j++) {
            if (buffered && !buf) continue;
            const int64_t t = j % groups * group, r = j / groups * block;
            const int count = tiles - t < group ? (int)(tiles - t) : group;
            const int64_t rows = m - r < block ? m - r : block;
            if (rows <= 0) continue;  // past the last row, where rounding to ROW_TILEs covers m early
            const float *xr = x + r * x_stride;
            float *o = out + r * n_out + t * TILE;
            const uint8_t *tile = packed + t * tile_bytes;
            if (half) tile_outputs(xr, x_stride, rows, x_cols, split, tile, tile_bytes, count, o, n_out, buf, 1);
            else tile_outputs(xr, x_stride, rows, x_cols, split, tile, tile_bytes, count, o, n_out, buf, 0);
        }
        free(buf);
    }
    return failed ? -2 : 0;
}
