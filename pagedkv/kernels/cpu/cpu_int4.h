// The packed 4-bit layout shared by cpu_int4.c and cpu_vnni.c (float32 activations), cpu_amx.c
// (bfloat16 activations on AMX) and cpu_bf16.c (bfloat16 activations, AVX512-BF16): per tile of
// 16 output rows, per group of 32 columns, the codes of 16 column pairs (byte r of pair p holds
// row r's codes for columns 2p, low nibble, and 2p + 1, high nibble), then the 16 rows' scales
// and offsets (w = scale * code + offset), float16 (`half`) or float32. Packed by
// pagedkv/kernels/cpu/ops.pack_int4.
#pragma once
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define TILE 16  // output rows per tile: one vector
#define GROUP 32
#define CODE_BYTES (GROUP / 2 * TILE)  // 256: a group's codes in a tile
typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));

// A tile's group: its codes, then 16 scales and 16 offsets, float16 (`half`) or float32.
static inline int64_t group_bytes(const int half) { return CODE_BYTES + 2 * TILE * (half ? 2 : 4); }

// Column k's codes in a tile.
static inline const uint8_t *pair_codes(const uint8_t *tile, int64_t k, const int half) {
    return tile + k / GROUP * group_bytes(half) + k % GROUP / 2 * TILE;
}

// The scales (which = 0) or offsets (1) of column k's group.
static inline __attribute__((always_inline)) vfloat group_vector(const uint8_t *tile, int64_t k, int which,
                                                                 const int half) {
    const uint8_t *p = tile + k / GROUP * group_bytes(half) + CODE_BYTES + which * TILE * (half ? 2 : 4);
    vfloat v;
    if (!half) {
        memcpy(&v, p, sizeof v);
        return v;
    }
#ifdef __AVX512F__
    return (vfloat)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#else
    _Float16 h[TILE];
    memcpy(h, p, sizeof h);
    for (int i = 0; i < TILE; i++) v[i] = (float)h[i];
    return v;
#endif
}

// 16 bytes as 16 int32 lanes (GCC lowers __builtin_convertvector of bytes to scalar inserts).
static inline vint widen(const uint8_t *p) {
#ifdef __AVX512F__
    return (vint)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
#else
    vint v;
    for (int i = 0; i < TILE; i++) v[i] = p[i];
    return v;
#endif
}

// The scale and offset vectors of column k's group, as `column_weights` takes them.
static inline __attribute__((always_inline)) void group_scales(const uint8_t *tile, int64_t k, int64_t split,
                                                               const int half, vfloat *scale, vfloat *offset) {
    *scale = group_vector(tile, k + split, 0, half);
    *offset = group_vector(tile, k + split, 1, half);
    if (split) *offset += group_vector(tile, k, 1, half);
}

// Columns k .. k + 3 (k a multiple of 4) of a tile's 16 rows as float32 vectors, scale * code +
// offset (one multiply-add). With `split`, Q8_0's codes as two 4-bit halves (the high halves in
// these columns, the low halves `split` columns on, whose scale is a sixteenth of the high
// halves': pagedkv/runtime/models/quant.py): the 8-bit code 16 * high + low times the low halves' scale
// plus both offsets, that is the file's d * q exactly. scale and offset: `group_scales`.
static inline __attribute__((always_inline)) void column_weights(const uint8_t *tile, int64_t k, int64_t split,
                                                                 const int half, vfloat scale, vfloat offset,
                                                                 vfloat w[4]) {
    const vint first = widen(pair_codes(tile, k, half)), second = widen(pair_codes(tile, k, half) + TILE);
    vint codes[4] = {first & 15, first >> 4, second & 15, second >> 4};  // columns k, k + 1 | k + 2, k + 3
    if (split) {
        const uint8_t *low = pair_codes(tile, k + split, half);
        const vint low1 = widen(low), low2 = widen(low + TILE);
        codes[0] = codes[0] << 4 | (low1 & 15);
        codes[1] = (first & 0xF0) | low1 >> 4;
        codes[2] = codes[2] << 4 | (low2 & 15);
        codes[3] = (second & 0xF0) | low2 >> 4;
    }
    for (int c = 0; c < 4; c++) w[c] = __builtin_convertvector(codes[c], vfloat) * scale + offset;
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// Group g of a tile's weights rounded to bfloat16, as 16 vectors of 64 bytes: vector p holds the
// 16 rows' weights for columns 2p and 2p + 1, a row's pair in one dword (an AMX B tile, and
// VDPBF16PS's operand with the tile's rows in its lanes); float32 weights as column_weights
// gives them (Q8_0's `split` groups on: the 8-bit code). cpu_amx.c and cpu_bf16.c.
static inline __attribute__((always_inline)) void weights_tile(const uint8_t *tile, int64_t g, const int half,
                                                               int64_t split, uint16_t *dst) {
    // Rounded to bfloat16, each row's column pair lands in one dword, lower column first.
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    vfloat scale, offset;  // read once: as far as the compiler knows, the stores below may alias them
    group_scales(tile, g * GROUP, split * GROUP, half, &scale, &offset);
    for (int k = 0; k < GROUP; k += 4) {
        vfloat w[4];
        column_weights(tile, g * GROUP + k, split * GROUP, half, scale, offset, w);
        for (int p = 0; p < 2; p++) {
            const __m512bh both = _mm512_cvtne2ps_pbh((__m512)w[2 * p + 1], (__m512)w[2 * p]);
            const __m512i pairs = _mm512_permutexvar_epi16(interleave, (__m512i)both);
            _mm512_store_si512(dst + (k / 2 + p) * 32, pairs);
        }
    }
}
#endif
