// GGUF's Q6_K matrices as the file stores them, multiplied by float32 rows.
//
// Q6_K (llama.cpp's k-quants) holds 256 weights in 210 bytes: 128 bytes of low 4-bit halves
// (ql), 64 bytes of high 2-bit parts (qh), 16 signed 8-bit scales (one per 16 weights) and a
// float16 super-block scale d: w = (d * scale) * (q - 32), q in 0..63. Sixteen weights share a
// scale, so the group-of-32 layout of cpu_int4.c cannot hold it; this kernel reads the blocks
// in place instead. Each block is decoded into float32 exactly as the gguf package and
// llama.cpp decode it (the product d * scale first, exact in float32, then times q - 32), once
// per call for every row of x, and each output is one fixed sum of 16 lanes of FMAs over its
// blocks and a tree over the lanes: a row's result does not depend on the other rows, the
// batch or the thread count.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_api.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define Q6K_WEIGHTS 256
#define Q6K_BYTES 210
#define LANES 16
typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));

static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
    uint32_t bits;
    if (exponent == 0x1Fu) {
        bits = sign | 0x7F800000u | (mantissa << 13);
    } else if (exponent) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa) {  // subnormal: normalise
        int e = -1;
        uint32_t m = mantissa;
        do { e++; m <<= 1; } while (!(m & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3FFu) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

// The 256 weights of one block, in order, as llama.cpp's dequantize_row_q6_K computes them.
static inline void decode_block(const uint8_t *block, float *w) {
    const uint8_t *ql = block, *qh = block + 128;
    const int8_t *scales = (const int8_t *)(block + 192);
    uint16_t d_bits;
    memcpy(&d_bits, block + 208, sizeof d_bits);
    const float d = half_to_float(d_bits);
    for (int half = 0; half < 2; half++) {
        const uint8_t *l = ql + 64 * half, *h = qh + 32 * half;
        const int8_t *sc = scales + 8 * half;
        float *y = w + 128 * half;
        for (int i = 0; i < 32; i++) {
            const int s = i / 16;
            const int q1 = (int)((l[i] & 0xF) | (((h[i] >> 0) & 3) << 4)) - 32;
            const int q2 = (int)((l[i + 32] & 0xF) | (((h[i] >> 2) & 3) << 4)) - 32;
            const int q3 = (int)((l[i] >> 4) | (((h[i] >> 4) & 3) << 4)) - 32;
            const int q4 = (int)((l[i + 32] >> 4) | (((h[i] >> 6) & 3) << 4)) - 32;
            y[i] = d * (float)sc[s] * (float)q1;
            y[i + 32] = d * (float)sc[s + 2] * (float)q2;
            y[i + 64] = d * (float)sc[s + 4] * (float)q3;
            y[i + 96] = d * (float)sc[s + 6] * (float)q4;
        }
    }
}

// The float32 weights [n, k] of a Q6_K matrix (k a multiple of 256): what the gguf package's
// dequantize gives, for tests.
int q6k_dequantize(const uint8_t *blocks, int64_t n, int64_t k, float *out) {
    if (k % Q6K_WEIGHTS) return -4;
    const int64_t per_row = k / Q6K_WEIGHTS;
    for (int64_t r = 0; r < n; r++)
        for (int64_t b = 0; b < per_row; b++)
            decode_block(blocks + (r * per_row + b) * Q6K_BYTES, out + r * k + b * Q6K_WEIGHTS);
    return 0;
}

static inline float sum_lanes(vfloat a) {
    a += __builtin_shuffle(a, (vint){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    a += __builtin_shuffle(a, (vint){4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
    a += __builtin_shuffle(a, (vint){2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
    a += __builtin_shuffle(a, (vint){1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0});
    return a[0];
}

typedef uint8_t vbyte __attribute__((vector_size(32)));
typedef uint8_t vbyte16 __attribute__((vector_size(16)));
typedef int32_t vint16 __attribute__((vector_size(64)));

// The 256 weights of a block as 16 vectors, vector g the 16 weights of scale g: decode_block's
// values (the same two float32 products), from whole-vector operations on the packed bytes
// (shifts by one amount per vector: x86 has no byte shifts by lane).
static inline __attribute__((always_inline)) void decode_block_vec(const uint8_t *block, vfloat *w) {
    uint16_t d_bits;
    memcpy(&d_bits, block + 208, sizeof d_bits);
    const float d = half_to_float(d_bits);
    const int8_t *scales = (const int8_t *)(block + 192);
    for (int half = 0; half < 2; half++) {
        vbyte l0, l1, h;  // ql[0..31], ql[32..63] and qh[0..31] of the half
        memcpy(&l0, block + 64 * half, 32);
        memcpy(&l1, block + 64 * half + 32, 32);
        memcpy(&h, block + 128 + 32 * half, 32);
        vbyte q[4];
        q[0] = (l0 & 0xF) | ((h & 3) << 4);          // weights i
        q[1] = (l1 & 0xF) | (((h >> 2) & 3) << 4);   // i + 32
        q[2] = (l0 >> 4) | (((h >> 4) & 3) << 4);    // i + 64
        q[3] = (l1 >> 4) | ((h >> 6) << 4);          // i + 96
        for (int g = 0; g < 8; g++) {
            vfloat qf;
#ifdef __AVX512F__  // (GCC widens a byte vector lane by lane otherwise)
            const __m128i part = _mm_loadu_si128((const __m128i *)((const uint8_t *)&q[g / 2] + 16 * (g % 2)));
            qf = (vfloat)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(part));
#else
            vbyte16 part;
            memcpy(&part, (const uint8_t *)&q[g / 2] + 16 * (g % 2), 16);
            qf = __builtin_convertvector(__builtin_convertvector(part, vint16), vfloat);
#endif
            qf -= 32.0f;
            w[8 * half + g] = (d * (float)scales[8 * half + g]) * qf;
        }
    }
}

#define ROWS_AT_ONCE 8  // rows of x that share each decoded block

// Output j of R rows r0.. of x: the accumulators stay in registers over all of W's row j.
static inline __attribute__((always_inline)) void dot_rows(const float *x, int64_t x_stride, int64_t r0, const int R,
                                                          const uint8_t *row, int64_t per_row, int64_t n, int64_t j,
                                                          float *out) {
    vfloat a[ROWS_AT_ONCE], w[Q6K_WEIGHTS / LANES];
    for (int r = 0; r < R; r++) a[r] = (vfloat){0};
    for (int64_t b = 0; b < per_row; b++) {
        const uint8_t *block = row + b * Q6K_BYTES;
        __builtin_prefetch(block + 4 * Q6K_BYTES), __builtin_prefetch(block + 4 * Q6K_BYTES + 64);
        __builtin_prefetch(block + 4 * Q6K_BYTES + 128), __builtin_prefetch(block + 4 * Q6K_BYTES + 192);
        decode_block_vec(block, w);
        for (int v = 0; v < Q6K_WEIGHTS / LANES; v++)
            for (int r = 0; r < R; r++) {
                vfloat xv;
                memcpy(&xv, x + (r0 + r) * x_stride + b * Q6K_WEIGHTS + v * LANES, sizeof xv);
                a[r] += w[v] * xv;
            }
    }
    for (int r = 0; r < R; r++) out[(r0 + r) * n + j] = sum_lanes(a[r]);
}

// out[m, n] = x[m, k] @ W^T for W the Q6_K matrix `blocks` ([n, k] in rows of k / 256 blocks).
// x: float32 rows `x_stride` apart; out: contiguous. Each output is the same sum, in the same
// order (16 lanes over the blocks, then a tree), whichever group of rows computes it. Returns
// 0, or -4 for k not a multiple of 256.
int q6k_linear(const float *x, int64_t x_stride, int64_t m, int64_t k, const uint8_t *blocks, int64_t n,
               float *out, int num_threads) {
    if (k % Q6K_WEIGHTS) return -4;
    const int64_t per_row = k / Q6K_WEIGHTS;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1 && n * m > 64)
    for (int64_t j = 0; j < n; j++) {
        const uint8_t *row = blocks + j * per_row * Q6K_BYTES;
        for (int64_t r0 = 0; r0 < m; r0 += ROWS_AT_ONCE) {
            const int64_t count = m - r0 < ROWS_AT_ONCE ? m - r0 : ROWS_AT_ONCE;
            switch (count) {
#define Q6K_ROWS(R) case R: dot_rows(x, x_stride, r0, R, row, per_row, n, j, out); break;
                Q6K_ROWS(1) Q6K_ROWS(2) Q6K_ROWS(3) Q6K_ROWS(4) Q6K_ROWS(5) Q6K_ROWS(6) Q6K_ROWS(7) Q6K_ROWS(8)
#undef Q6K_ROWS
            }
        }
    }
    return 0;
}
