// float32 matrix products for few rows (single-stream and small-batch decode of a float32
// model): out = x @ W^T (+ bias), x [M, K] and W [N, K] float32, plain row-major weights.
//
// Each output is one sum in one order whatever M: lane l of a 16-lane accumulator sums
// x[k] * w[k] over k = l, l + 16, l + 32, ... in increasing k by FMAs (the last partial vector
// with its missing lanes as zeros), then the 16 lanes are added in a fixed tree, then the bias.
// So a row's result does not depend on the other rows of its batch, and the model's Python
// loop and pagedkv/kernels/cpu/cpu_decode.c, which both call this, give the same bits.
//
// Why: a decode step of few rows streams every weight once, so it is bound by the memory. The
// BLAS sgemm that F.linear calls (MKL) streams it at that pace on Intel CPUs, but takes a slow
// path on AMD ones: SmolLM2-135M's float32 matrices (538 MB) took 45 ms a token on one core of
// an AMD EPYC (Zen 4), about 12 GB/s. These loops read W front to back, one row at a time for
// up to 4 rows of x (two rows at a time from 5, so that each load of x feeds two FMAs), and
// from 3 rows ask for the weights 12 KB ahead into L2: with more work per cache line, fewer
// lines are in flight than the hardware's prefetcher needs. Measured on that EPYC, one core,
// the model's matrices in huge pages: about 18 ms at 1 and 2 rows (30 GB/s), 19-23 ms at 3
// and 4, 30 ms at 8 (a machine shared with other work: medians vary by 10-20%).
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "cpu_api.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_ROWS 8  // the most rows of x a call takes (F32_LINEAR_ROWS in ops.py)
#define PREFETCH_BYTES 12288  // how far ahead in W the weights are asked for, from 3 rows

int f32_linear_supported(void) { return __builtin_cpu_supports("avx512f") != 0; }

// Rows n0 .. n1-1 of W against the M rows of x, J rows of W at a time (M and J constants after
// inlining: M * J accumulators), prefetching where `ahead`.
__attribute__((target("avx512f"), always_inline)) static inline void
rows_of_w(const float *x, int64_t x_stride, const int M, const int J, const int ahead, int64_t k, const float *w,
          int64_t n0, int64_t n1, const float *bias, float *out, int64_t out_stride) {
    const int64_t whole = k / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (k - whole)) - 1);
    for (int64_t n = n0; n < n1; n += J) {
        const int rows = n1 - n < J ? (int)(n1 - n) : J;
        const float *wr[4];
        for (int j = 0; j < J; j++) wr[j] = w + (n + (j < rows ? j : 0)) * k;
        __m512 acc[MAX_ROWS][4];
        for (int m = 0; m < M; m++)
            for (int j = 0; j < J; j++) acc[m][j] = _mm512_setzero_ps();
        for (int64_t c = 0; c < whole; c += 16) {
            __m512 wv[4];
            for (int j = 0; j < J; j++) wv[j] = _mm512_loadu_ps(wr[j] + c);
            if (ahead)
                for (int j = 0; j < J; j++) _mm_prefetch((const char *)(wr[j] + c) + PREFETCH_BYTES, _MM_HINT_T1);
            for (int m = 0; m < M; m++) {
                const __m512 xv = _mm512_loadu_ps(x + m * x_stride + c);
                for (int j = 0; j < J; j++) acc[m][j] = _mm512_fmadd_ps(xv, wv[j], acc[m][j]);
            }
        }
        if (tail) {
            __m512 wv[4];
            for (int j = 0; j < J; j++) wv[j] = _mm512_maskz_loadu_ps(tail, wr[j] + whole);
            for (int m = 0; m < M; m++) {
                const __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * x_stride + whole);
                for (int j = 0; j < J; j++) acc[m][j] = _mm512_fmadd_ps(xv, wv[j], acc[m][j]);
            }
        }
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

// x: float32 [rows, k], rows `x_stride` elements apart; w: float32 [n, k], contiguous; bias:
// float32 [n] or NULL; out: float32 [rows, n], contiguous. Returns 0, or -4 (rows outside
// 1 .. MAX_ROWS, or a CPU without AVX-512).
int f32_linear(const float *x, int64_t x_stride, int rows, int64_t k, const float *w, int64_t n, const float *bias,
               float *out, int num_threads) {
    if (rows < 1 || rows > MAX_ROWS || k < 1 || !f32_linear_supported()) return -4;
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
