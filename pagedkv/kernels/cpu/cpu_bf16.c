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
