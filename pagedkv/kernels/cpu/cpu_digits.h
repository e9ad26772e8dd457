// Float32 activations as integers, for the kernels that multiply them by weight codes in exact
// integer sums (cpu_vnni.c's 4-bit codes, cpu_q8.c's 8-bit ones): each group of 32 activations x
// becomes integers a = x / scale, rounded to nearest, with the group's constants (RowGroup).
#pragma once
#include <stdint.h>
#include <string.h>
#include <immintrin.h>
#include <math.h>

// One row's constants for one group of its activations.
typedef struct {
    float scale;    // x = scale * a, as nearly as a holds it
    float sum;      // scale * sum(a): the group's sum of x
    int32_t total;  // sum(a)
} RowGroup;

// 2^k as a float, from its bits where it is a normal number.
static inline float power_of_two(int k) {
    if (k < -126) return ldexpf(1, k);
    const uint32_t bits = (uint32_t)(k + 127) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// A group's 32 activations as integers a (two vectors) and its RowGroup. With `fill` (a
// constant after inlining), a = x * (2^bits - 1) / max |x| rounded to nearest: the largest is
// +-(2^bits - 1), every level of the integers used. Else a power-of-two scale, a = x * 2^-e
// rounded to nearest with 2^(bits - 1) <= max |a| < 2^bits: each activation keeps bits below
// its group's largest, and scaling x by a power of two moves e only.
static inline __attribute__((always_inline)) void integers(const float *x, __m512i a[2], RowGroup *ri,
                                                           const int bits, const int fill) {
    const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
    const float biggest = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    a[0] = a[1] = _mm512_setzero_si512();
    uint32_t biggest_bits;
    memcpy(&biggest_bits, &biggest, 4);
    const int exponent = (int)(biggest_bits >> 23);  // biggest = 1.f * 2^(exponent - 127)
    // NaNs and infinities (VMAXPS may pass a NaN over): no integer holds them, the outputs become NaN.
    if (_mm512_fpclass_ps_mask(v0, 0x99) | _mm512_fpclass_ps_mask(v1, 0x99)) {
        ri->scale = NAN;
    } else if (exponent == 0) {  // zeros, or subnormals too small to count
        ri->scale = 0;
    } else if (fill) {  // a = x * 2^(127 - exponent) * top / m, m = 1.f: the largest becomes top
        const float top = (float)((1 << bits) - 1), mantissa = biggest * power_of_two(127 - exponent);
        const __m512 down = _mm512_set1_ps(power_of_two(127 - exponent)), up = _mm512_set1_ps(top / mantissa);
        a[0] = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(v0, down), up));  // nearest, ties even
        a[1] = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(v1, down), up));
        ri->scale = mantissa / top * power_of_two(exponent - 127);
    } else {  // a = x * 2^up: 2^(bits - 1) <= max |a| < 2^bits
        int up = 126 + bits - exponent;  // 2^up may overflow a float: two steps
        // A largest within half a unit of 2^bits would round to it: one bit less (the largest
        // then rounds to 2^(bits - 1)).
        if ((biggest_bits & 0x7FFFFF) >= (1u << 23) - (1u << (23 - bits))) up--;
        const __m512 half_up = _mm512_set1_ps(power_of_two(up / 2)), rest = _mm512_set1_ps(power_of_two(up - up / 2));
        a[0] = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(v0, half_up), rest));  // nearest, ties even
        a[1] = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(v1, half_up), rest));
        ri->scale = power_of_two(-up);
    }
    ri->total = _mm512_reduce_add_epi32(_mm512_add_epi32(a[0], a[1]));
    ri->sum = (float)ri->total * ri->scale;
}

// v mod 2^bits as a signed digit, from -offset to 2^bits - 1 - offset.
static inline __m512i digit(__m512i v, int bits, int offset) {
    const __m512i shift = _mm512_set1_epi32(offset);
    return _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, shift), _mm512_set1_epi32((1 << bits) - 1)), shift);
}

static inline void store_bytes(int8_t *dst, __m512i v) { _mm_storeu_si128((__m128i *)dst, _mm512_cvtepi32_epi8(v)); }
