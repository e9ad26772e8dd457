// bfloat16 matrix products for few rows (single-stream and small-batch decode):
// out = x @ W^T (+ bias), x [M, K] and W [N, K] bfloat16, sums in float32, out rounded once to
// bfloat16. AVX512-BF16's VDPBF16PS adds pairs of exact bfloat16 products to float32 sums.
//
// oneDNN's AMX GEMM, which the model uses for batches, streams W at about 8 GB/s for one row on
// a 2-core Xeon, a third below what the memory gives; these loops stream W once for up to
// MAX_ROWS rows at the memory's pace. Every output is the same sum in the same order whatever
// M, so a row's result does not depend on the other rows of its batch.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "cpu_api.h"
#include "cpu_bfloat16.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_ROWS 4
#define W_ROWS 4          // rows of W per step: W_ROWS * MAX_ROWS accumulators
#define PREFETCH_ROWS 16  // how far ahead the rows of W are asked for

int bf16_linear_supported(void) { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16"); }

// Rows n0 .. n1-1 of W against the M rows of x. `M` is a constant after inlining.
__attribute__((target("avx512f,avx512bf16"), always_inline)) static inline void
rows_of_w(const uint16_t *x, int64_t x_stride, const int M, int64_t k, const uint16_t *w, int64_t n0, int64_t n1,
          const uint16_t *bias, uint16_t *out, int64_t out_stride) {
    for (int64_t n = n0; n < n1; n += W_ROWS) {
        const int rows = n1 - n < W_ROWS ? (int)(n1 - n) : W_ROWS;
        __m512 acc[MAX_ROWS][W_ROWS];
        for (int m = 0; m < M; m++)
            for (int j = 0; j < W_ROWS; j++) acc[m][j] = _mm512_setzero_ps();
        for (int j = 0; j < W_ROWS; j++)
            if (n + PREFETCH_ROWS + j < n1)
                for (int64_t b = 0; b < k * 2; b += 64)
                    _mm_prefetch((const char *)(w + (n + PREFETCH_ROWS + j) * k) + b, _MM_HINT_T0);
        for (int64_t c = 0; c < k; c += 32) {
            __m512bh wv[W_ROWS];
            for (int j = 0; j < W_ROWS; j++)
                wv[j] = (__m512bh)_mm512_loadu_si512(w + (n + (j < rows ? j : 0)) * k + c);
            for (int m = 0; m < M; m++) {
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * x_stride + c);
                for (int j = 0; j < W_ROWS; j++) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xv, wv[j]);
            }
        }
        for (int m = 0; m < M; m++)
            for (int j = 0; j < rows; j++) {
                const float sum = _mm512_reduce_add_ps(acc[m][j]) + (bias ? bf16_to_float(bias[n + j]) : 0.0f);
                out[m * out_stride + n + j] = float_to_bf16(sum);
            }
    }
}

#define ROWS_CASE(m) \
    case m: rows_of_w(x, x_stride, m, k, w, n0, n1, bias, out, out_stride); break;

__attribute__((target("avx512f,avx512bf16"))) static void part(const uint16_t *x, int64_t x_stride, int rows, int64_t k,
                                                              const uint16_t *w, int64_t n0, int64_t n1,
                                                              const uint16_t *bias, uint16_t *out, int64_t out_stride) {
    switch (rows) { ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) }
}

// x: bfloat16 [rows, k], rows `x_stride` elements apart; w: bfloat16 [n, k], contiguous; bias:
// bfloat16 [n] or NULL; out: bfloat16 [rows, n], contiguous. Returns 0, or -4 (rows outside
// 1 .. MAX_ROWS, k not a multiple of 32, or a CPU without AVX512-BF16).
int bf16_linear(const uint16_t *x, int64_t x_stride, int rows, int64_t k, const uint16_t *w, int64_t n,
                const uint16_t *bias, uint16_t *out, int num_threads) {
    if (rows < 1 || rows > MAX_ROWS || k % 32 || !bf16_linear_supported()) return -4;
    // Threads take contiguous ranges of W's rows, in whole steps.
    const int64_t steps = (n + W_ROWS - 1) / W_ROWS;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && steps > 64)
    {
        int t = 0, count = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        count = omp_get_num_threads();
#endif
        const int64_t n0 = steps * t / count * W_ROWS, n1 = steps * (t + 1) / count * W_ROWS;
        part(x, x_stride, rows, k, w, n0, n1 < n ? n1 : n, bias, out, n);
    }
    return 0;
}

// Weight-only 4-bit matrix products with bfloat16 activations where AMX is missing: out = x @
// W^T, x and out bfloat16, W packed as pagedkv/kernels/cpu/cpu_int4.h lays it out. The weights are
// those cpu_amx.c multiplies (dequantized in float32, Q8_0's halves joined, rounded to bfloat16:
// `weights_tile`), VDPBF16PS adds their exact products to float32 sums, one per output, and each
// output is rounded once to bfloat16.
//
// Every output is the same sum whatever the batch: over groups of 32 columns in increasing order,
// within a group over its 16 column pairs in increasing order, one VDPBF16PS each (the pair's two
// products added to the sum). A row's result does not depend on the other rows, so preemption
// stays invisible in the outputs. (It is another order than AMX's tile products: a CPU with AMX
// and one without give different last bits, each the same for every batch.)
//
// Blocking: a job is a block of rows (their column pairs packed, row by row within each pair, so
// that every broadcast is a constant offset) against two tiles (32 outputs), whose weights are
// dequantized once per job into a panel (2 KB a group) that stays in L2 while the block's rows
// pass; 8 rows by 2 tiles at a time, 16 sums in registers, each row's pair broadcast from memory
// straight into VDPBF16PS. Fewer rows (small decode batches, a block's tail) take the same sums
// in C. Where dequantizing is the work (a single row), it runs at the pace of cpu_amx.c's single
// row, about half the float32 integer kernel's.
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <stdlib.h>

#include "cpu_int4.h"

#define PAIR_ROWS 8                   // rows per register block
#define PAIR_PANEL (512 * 1024)       // a block of rows' packed pairs, kept in L2 while the tiles pass
#define GROUP_WORDS (TILE * GROUP)    // a tile's group of bfloat16 weights: 16 pairs of 16 rows
#define SLAB_DWORDS (GROUP / 2 * PAIR_ROWS)  // a group's pairs of PAIR_ROWS rows

int int4_bf16_supported(void) { return 1; }

// Rows r0 .. r0 + padded - 1 of x (those from `rows` on as zeros) as pairs: [slab of PAIR_ROWS
// rows][group][pair p][row], one dword each.
static void pack_pairs(const uint16_t *x, int64_t x_stride, int64_t rows, int64_t padded, int64_t groups,
                       uint32_t *dst) {
    for (int64_t r = 0; r < padded; r++)
        for (int64_t g = 0; g < groups; g++) {
            uint32_t *d = dst + (r / PAIR_ROWS * groups + g) * SLAB_DWORDS + r % PAIR_ROWS;
            for (int p = 0; p < GROUP / 2; p++) {
                uint32_t pair = 0;
                if (r < rows) memcpy(&pair, x + r * x_stride + g * GROUP + 2 * p, 4);
                d[p * PAIR_ROWS] = pair;
            }
        }
}

// PAIR_ROWS rows (`xp`: their slab) by two tiles (`w`: the panel, 2 * GROUP_WORDS a group, the
// second tile's after the first's) over `groups` groups: sums[16]: rows 0-7 of tile 0, then of
// tile 1. GCC keeps neither the broadcasts in the instructions nor the 16 sums in registers: the
// loop is written out.
#define BD(p, i, acc, w) "vdpbf16ps " #p "*32+" #i "*4(%[x])%{1to16%}, %%zmm" #w ", %%zmm" #acc "\n\t"
#define PSTEP(p)                                                                                      \
    "vmovdqa64 " #p "*64(%[w]), %%zmm16\n\tvmovdqa64 1024+" #p "*64(%[w]), %%zmm17\n\t"                \
    BD(p, 0, 0, 16) BD(p, 0, 8, 17) BD(p, 1, 1, 16) BD(p, 1, 9, 17) BD(p, 2, 2, 16) BD(p, 2, 10, 17) \
    BD(p, 3, 3, 16) BD(p, 3, 11, 17) BD(p, 4, 4, 16) BD(p, 4, 12, 17) BD(p, 5, 5, 16) BD(p, 5, 13, 17) \
    BD(p, 6, 6, 16) BD(p, 6, 14, 17) BD(p, 7, 7, 16) BD(p, 7, 15, 17)
#define ZERO(a, b, c, d) "vpxord %%zmm" #a ", %%zmm" #a ", %%zmm" #a "\n\tvpxord %%zmm" #b ", %%zmm" #b ", %%zmm" #b \
    "\n\tvpxord %%zmm" #c ", %%zmm" #c ", %%zmm" #c "\n\tvpxord %%zmm" #d ", %%zmm" #d ", %%zmm" #d "\n\t"
#define STORE(a) "vmovups %%zmm" #a ", " #a "*64(%[s])\n\t"

static void pair_block8(const uint32_t *xp, const uint16_t *w, int64_t groups, float *sums) {
    __asm__ volatile(ZERO(0, 1, 2, 3) ZERO(4, 5, 6, 7) ZERO(8, 9, 10, 11) ZERO(12, 13, 14, 15)
                     "1:\n\t"
                     PSTEP(0) PSTEP(1) PSTEP(2) PSTEP(3) PSTEP(4) PSTEP(5) PSTEP(6) PSTEP(7)
                     PSTEP(8) PSTEP(9) PSTEP(10) PSTEP(11) PSTEP(12) PSTEP(13) PSTEP(14) PSTEP(15)
                     "add $2048, %[w]\n\tadd $512, %[x]\n\tdec %[n]\n\tjnz 1b\n\t"
                     STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5) STORE(6) STORE(7)
                     STORE(8) STORE(9) STORE(10) STORE(11) STORE(12) STORE(13) STORE(14) STORE(15)
                     : [x] "+r"(xp), [w] "+r"(w), [n] "+r"(groups)
                     : [s] "r"(sums)
                     : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
                       "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17");
}
#undef BD
#undef PSTEP
#undef ZERO
#undef STORE

// The same sums for `rows` (< PAIR_ROWS) rows of a slab: the same instructions in the same order
// for each sum.
static inline __attribute__((always_inline)) void pair_block(const uint32_t *xp, const uint16_t *w, int64_t groups,
                                                             float *sums, const int rows) {
    __m512 acc[PAIR_ROWS][2];
    for (int i = 0; i < rows; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++, xp += SLAB_DWORDS, w += 2 * GROUP_WORDS)
        for (int p = 0; p < GROUP / 2; p++) {
            const __m512bh w0 = (__m512bh)_mm512_load_si512(w + p * 32);
            const __m512bh w1 = (__m512bh)_mm512_load_si512(w + GROUP_WORDS + p * 32);
            for (int i = 0; i < rows; i++) {
                const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)xp[p * PAIR_ROWS + i]);
                acc[i][0] = _mm512_dpbf16_ps(acc[i][0], w0, xv);
                acc[i][1] = _mm512_dpbf16_ps(acc[i][1], w1, xv);
            }
        }
    for (int i = 0; i < rows; i++) {
        _mm512_storeu_ps(sums + i * TILE, acc[i][0]);
        _mm512_storeu_ps(sums + (PAIR_ROWS + i) * TILE, acc[i][1]);
    }
}

// `rows` rows of a block (packed by pack_pairs from a multiple of PAIR_ROWS) against a panel of
// `count` (1 or 2) tiles: out's rows, rounded to bfloat16.
static void pair_rows(const uint32_t *xp, const uint16_t *panel, int64_t groups, int64_t rows, int count,
                      uint16_t *out, int64_t out_stride) {
    float sums[2 * PAIR_ROWS * TILE] __attribute__((aligned(64)));
    for (int64_t r = 0; r < rows; r += PAIR_ROWS) {
        const int n = rows - r < PAIR_ROWS ? (int)(rows - r) : PAIR_ROWS;
        const uint32_t *slab = xp + r / PAIR_ROWS * groups * SLAB_DWORDS;
        switch (n) {
            case 1: pair_block(slab, panel, groups, sums, 1); break;
            case 2: pair_block(slab, panel, groups, sums, 2); break;
            case 3: pair_block(slab, panel, groups, sums, 3); break;
            case 4: pair_block(slab, panel, groups, sums, 4); break;
            case 5: pair_block(slab, panel, groups, sums, 5); break;
            case 6: pair_block(slab, panel, groups, sums, 6); break;
            case 7: pair_block(slab, panel, groups, sums, 7); break;
            default: pair_block8(slab, panel, groups, sums); break;
        }
        for (int i = 0; i < n; i++)
            for (int t = 0; t < count; t++)
                _mm256_storeu_si256((__m256i *)(out + (r + i) * out_stride + t * TILE),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(sums + (t * PAIR_ROWS + i) * TILE)));
    }
}

// x: bfloat16 [m, x_cols], rows x_stride apart; W: [n_out, w_cols] packed (cpu_int4.h), w_cols =
// x_cols, or 2 * x_cols for Q8_0's split codes; out: bfloat16 [m, n_out], contiguous. n_out a
// multiple of 16, x_cols of 32. Returns 0 or -2 (out of memory).
int int4_linear_bf16(const uint16_t *x, int64_t x_stride, int64_t m, int64_t x_cols, const uint8_t *packed,
                     int half, int64_t n_out, int64_t w_cols, uint16_t *out, int num_threads) {
    if (m <= 0) return 0;
    const int64_t tiles = n_out / TILE, groups = x_cols / GROUP, tile_bytes = w_cols / GROUP * group_bytes(half);
    const int64_t split = w_cols == x_cols ? 0 : groups;  // Q8_0's low halves, `split` groups on
    const int64_t pairs = (tiles + 1) / 2, padded = (m + PAIR_ROWS - 1) / PAIR_ROWS * PAIR_ROWS;
    int64_t block = PAIR_PANEL / (x_cols * 2) / PAIR_ROWS * PAIR_ROWS;  // rows per job
    if (block < PAIR_ROWS) block = PAIR_ROWS;
    const int64_t jobs = (m + block - 1) / block * pairs;  // consecutive jobs: one block through the tiles
    uint32_t *xp = aligned_alloc(64, padded * groups * GROUP * 2);
    if (!xp) return -2;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
#pragma omp for schedule(static)
        for (int64_t s = 0; s < padded / PAIR_ROWS; s++)
            pack_pairs(x + s * PAIR_ROWS * x_stride, x_stride, m - s * PAIR_ROWS < PAIR_ROWS ? m - s * PAIR_ROWS
                       : PAIR_ROWS, PAIR_ROWS, groups, xp + s * groups * SLAB_DWORDS);
        uint16_t *panel = aligned_alloc(64, groups * 2 * GROUP_WORDS * sizeof(uint16_t));
        if (!panel) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < jobs; j++) {
            if (!panel) continue;
            const int64_t r0 = j / pairs * block, t = j % pairs * 2;
            const int64_t rows = m - r0 < block ? m - r0 : block;
            const int count = tiles - t < 2 ? 1 : 2;
            for (int64_t g = 0; g < groups; g++)
                for (int c = 0; c < 2; c++) {
                    uint16_t *dst = panel + (g * 2 + c) * GROUP_WORDS;
                    if (c < count) weights_tile(packed + (t + c) * tile_bytes, g, half, split, dst);
                    else memset(dst, 0, GROUP_WORDS * sizeof(uint16_t));
                }
            pair_rows(xp + r0 / PAIR_ROWS * groups * SLAB_DWORDS, panel, groups, rows, count, out + r0 * n_out + t * TILE,
                      n_out);
        }
        free(panel);
    }
    free(xp);
    return failed ? -2 : 0;
}
#else
int int4_bf16_supported(void) { return 0; }

int int4_linear_bf16(const uint16_t *x, int64_t x_stride, int64_t m, int64_t x_cols, const uint8_t *packed,
                     int half, int64_t n_out, int64_t w_cols, uint16_t *out, int num_threads) {
    (void)x, (void)x_stride, (void)m, (void)x_cols, (void)packed, (void)half, (void)n_out, (void)w_cols, (void)out;
    (void)num_threads;
    return -5;
}
#endif
