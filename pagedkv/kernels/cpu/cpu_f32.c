// float32 matrix products: out = x @ W^T (+ bias), x [M, K] and W [N, K] float32, plain
// row-major weights, for any M.
//
// Each output is one sum in one order whatever M: lane l of a 16-lane accumulator sums
// x[k] * w[k] over k = l, l + 16, l + 32, ... in increasing k by FMAs (the last partial vector
// with its missing lanes as zeros), then the 16 lanes are added in a fixed tree, then the bias.
// So a row's result does not depend on the other rows of its batch (nor on the thread count),
// and the model's Python loop and pagedkv/kernels/cpu/cpu_decode.c, which both call this, give
// the same bits. That is what keeps a float32 model's outputs the same under preemption,
// chunked prefill and prefix hits, which change the rows a position is computed with: oneDNN's
// and the BLAS's GEMMs change kernels, and their last bits, with the number of rows.
//
// Why this speed: a decode step of few rows streams every weight once, so it is bound by the
// memory. The BLAS sgemm that F.linear calls (MKL) streams it at that pace on Intel CPUs, but
// takes a slow path on AMD ones: SmolLM2-135M's float32 matrices (538 MB) took 45 ms a token
// on one core of an AMD EPYC (Zen 4), about 12 GB/s. Up to MAX_ROWS rows, these loops read W
// front to back, one row at a time for up to 4 rows of x (two rows at a time from 5, so that
// each load of x feeds two FMAs), and from 3 rows ask for the weights 12 KB ahead into L2:
// with more work per cache line, fewer lines are in flight than the hardware's prefetcher
// needs. Measured on that EPYC, one core, the model's matrices in huge pages: about 18 ms at 1
// and 2 rows (30 GB/s), 19-23 ms at 3 and 4, 30 ms at 8. More rows (prompts, large batches)
// are a GEMM bound by the FMAs: blocks of rows whose x stays in L2, and for each a band of W's
// rows kept in L1 while the block's rows pass 4 at a time against 4 of W's (16 sums in
// registers, each load feeding 4 FMAs), the 16 sums added up together (`block_4x4`).
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "cpu_api.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_ROWS 8  // the most rows of x the streaming loops take (F32_LINEAR_ROWS in ops.py)
#define PREFETCH_BYTES 12288  // how far ahead in W the weights are asked for, from 3 rows
#define BLOCK_X_BYTES (256 * 1024)  // more rows: a block of rows of x, kept in L2
#define BAND_W_BYTES (24 * 1024)    // and a band of W's rows, kept in L1 while the block passes

int f32_linear_supported(void) { return __builtin_cpu_supports("avx512f") != 0; }

// The M x J sums of M rows of x against the J rows wr[] of W (M and J constants after
// inlining): lane l of acc[m][j] sums x[k] * w[k] over k = l, l + 16, ... in increasing k, the
// last partial vector's missing lanes as zeros. `ahead`: W's rows 12 KB on are asked for too.
// W's loads, and x's in the GEMM's blocks, go into registers (GCC would fold each into every FMA).
__attribute__((target("avx512f"), always_inline)) static inline void
dot_sums(const float *x, int64_t x_stride, const int M, const int J, const int ahead, int64_t k,
         const float *const *wr, __m512 acc[MAX_ROWS][4]) {
    const int64_t whole = k / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (k - whole)) - 1);
    for (int m = 0; m < M; m++)
        for (int j = 0; j < J; j++) acc[m][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < whole; c += 16) {
        __m512 wv[4], xv[MAX_ROWS];
        for (int j = 0; j < J; j++) {
            wv[j] = _mm512_loadu_ps(wr[j] + c);
            __asm__("" : "+v"(wv[j]));
            if (ahead) _mm_prefetch((const char *)(wr[j] + c) + PREFETCH_BYTES, _MM_HINT_T1);
        }
        for (int m = 0; m < M; m++) {
            xv[m] = _mm512_loadu_ps(x + m * x_stride + c);
            if (J > 2) __asm__("" : "+v"(xv[m]));  // the GEMM's 4 uses; 2 folded cost nothing (measured)
        }
        for (int m = 0; m < M; m++)
            for (int j = 0; j < J; j++) acc[m][j] = _mm512_fmadd_ps(xv[m], wv[j], acc[m][j]);
    }
    if (tail) {
        __m512 wv[4];
        for (int j = 0; j < J; j++) wv[j] = _mm512_maskz_loadu_ps(tail, wr[j] + whole);
        for (int m = 0; m < M; m++) {
            const __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * x_stride + whole);
            for (int j = 0; j < J; j++) acc[m][j] = _mm512_fmadd_ps(xv, wv[j], acc[m][j]);
        }
    }
}

// Rows n0 .. n1-1 of W against the M rows of x, J rows of W at a time, each output's 16 lanes
// added by `_mm512_reduce_add_ps`'s tree, then the bias.
__attribute__((target("avx512f"), always_inline)) static inline void
rows_of_w(const float *x, int64_t x_stride, const int M, const int J, const int ahead, int64_t k, const float *w,
          int64_t n0, int64_t n1, const float *bias, float *out, int64_t out_stride) {
    for (int64_t n = n0; n < n1; n += J) {
        const int rows = n1 - n < J ? (int)(n1 - n) : J;
        const float *wr[4];
        for (int j = 0; j < J; j++) wr[j] = w + (n + (j < rows ? j : 0)) * k;
        __m512 acc[MAX_ROWS][4];
        dot_sums(x, x_stride, M, J, ahead, k, wr, acc);
        for (int m = 0; m < M; m++)
            for (int j = 0; j < rows; j++)
                out[m * out_stride + n + j] = _mm512_reduce_add_ps(acc[m][j]) + (bias ? bias[n + j] : 0.0f);
    }
}

#define ROWS_CASE(m, j, ahead) \
    case m: rows_of_w(x, x_stride, m, j, ahead, k, w, n0, n1, bias, out, out_stride); break;

__attribute__((target("avx512f"))) static void part(const float *x, int64_t x_stride, int rows, int64_t k,
                                                   const float *w, int64_t n0, int64_t n1, const float *bias,
                                                   float *out, int64_t out_stride) {
    switch (rows) {
        ROWS_CASE(1, 1, 0) ROWS_CASE(2, 1, 0) ROWS_CASE(3, 1, 1) ROWS_CASE(4, 1, 1)
        ROWS_CASE(5, 2, 1) ROWS_CASE(6, 2, 1) ROWS_CASE(7, 2, 1) ROWS_CASE(8, 2, 1)
    }
}

// The GEMM's register block: 4 rows of x against W's rows n .. n + 3, 16 sums in registers,
// then added up by the tree `_mm512_reduce_add_ps` follows (lane i with i + 8, then i with
// i + 4, with i + 2, with i + 1: the bits of the loops above), all 16 at once by shuffles
// instead of 16 times over. `ahead`: the band's first block of rows, which brings W's rows in
// from memory, asks for the rows after them too.
__attribute__((target("avx512f"), always_inline)) static inline void
block_4x4(const float *x, int64_t x_stride, int64_t k, const float *w, int64_t n, const float *bias, float *out,
          int64_t out_stride, const int ahead) {
    const float *wr[4] = {w + n * k, w + (n + 1) * k, w + (n + 2) * k, w + (n + 3) * k};
    __m512 acc[MAX_ROWS][4], a[16];
    dot_sums(x, x_stride, 4, 4, ahead, k, wr, acc);
    for (int m = 0; m < 4; m++)
        for (int j = 0; j < 4; j++) a[4 * j + m] = acc[m][j];  // a[4 j + m]: the order the tree leaves rows in
    __m512 halves[8], quarters[4], pairs[2];
    for (int q = 0; q < 8; q++)  // lanes i and i + 8 of two sums
        halves[q] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * q], a[2 * q + 1], 0x44),
                                  _mm512_shuffle_f32x4(a[2 * q], a[2 * q + 1], 0xEE));
    for (int r = 0; r < 4; r++)  // then i and i + 4: one sum a 128-bit lane
        quarters[r] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[2 * r], halves[2 * r + 1], 0x88),
                                    _mm512_shuffle_f32x4(halves[2 * r], halves[2 * r + 1], 0xDD));
    for (int t = 0; t < 2; t++)  // then i and i + 2
        pairs[t] = _mm512_add_ps(_mm512_shuffle_ps(quarters[2 * t], quarters[2 * t + 1], 0x44),
                                 _mm512_shuffle_ps(quarters[2 * t], quarters[2 * t + 1], 0xEE));
    // then i and i + 1: lane 4 m + j holds row m's output n + j
    const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(pairs[0], pairs[1], 0x88),
                                      _mm512_shuffle_ps(pairs[0], pairs[1], 0xDD));
    float lanes[16] __attribute__((aligned(64)));
    _mm512_store_ps(lanes, sums);
    for (int m = 0; m < 4; m++) {
        __m128 row = _mm_load_ps(lanes + 4 * m);
        if (bias) row = _mm_add_ps(row, _mm_loadu_ps(bias + n));
        _mm_storeu_ps(out + m * out_stride + n, row);
    }
}

// x: float32 [rows, k], rows `x_stride` elements apart; w: float32 [n, k], contiguous; bias:
// float32 [n] or NULL; out: float32 [rows, n], contiguous. Returns 0, or -4 (no rows, or a CPU
// without AVX-512).
int f32_linear(const float *x, int64_t x_stride, int rows, int64_t k, const float *w, int64_t n, const float *bias,
               float *out, int num_threads) {
    if (rows < 1 || k < 1 || !f32_linear_supported()) return -4;
    if (rows <= MAX_ROWS) {
        // Threads take contiguous ranges of W's rows, in steps of 2.
        const int64_t steps = (n + 1) / 2;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && steps > 64)
        {
            int t = 0, count = 1;
#ifdef _OPENMP
            t = omp_get_thread_num();
            count = omp_get_num_threads();
#endif
            const int64_t n0 = steps * t / count * 2, n1 = steps * (t + 1) / count * 2;
            part(x, x_stride, rows, k, w, n0, n1 < n ? n1 : n, bias, out, n);
        }
        return 0;
    }
    // The GEMM: blocks of rows of x; in each, bands of W's rows shared out among the threads,
    // 4 x 4 register blocks, and the loops above for what is left over.
    int64_t block = BLOCK_X_BYTES / (k * 4) / 4 * 4, band = BAND_W_BYTES / (k * 4) / 4 * 4;
    if (block < 4) block = 4;
    if (band < 4) band = 4;
    const int64_t bands = (n + band - 1) / band;
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
        const int64_t r1 = r0 + block < rows ? r0 + block : rows;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1 && bands > 1)
        for (int64_t b = 0; b < bands; b++) {
            const int64_t n0 = b * band, n1 = n0 + band < n ? n0 + band : n, whole = n0 + (n1 - n0) / 4 * 4;
            int64_t r = r0;
            for (; r + 4 <= r1; r += 4) {
                for (int64_t j = n0; j < whole; j += 4) {
                    if (r == r0) block_4x4(x + r * x_stride, x_stride, k, w, j, bias, out + r * n, n, 1);
                    else block_4x4(x + r * x_stride, x_stride, k, w, j, bias, out + r * n, n, 0);
                }
                if (whole < n1) part(x + r * x_stride, x_stride, 4, k, w, whole, n1, bias, out + r * n, n);
            }
            if (r < r1) part(x + r * x_stride, x_stride, (int)(r1 - r), k, w, n0, n1, bias, out + r * n, n);
        }
    }
    return 0;
}
