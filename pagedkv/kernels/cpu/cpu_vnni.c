// Weight-only 4-bit matrix products with float32 activations in exact integer arithmetic: out =
// x @ W^T, x and out float32, W packed as pagedkv/kernels/cpu/cpu_int4.h lays it out (GGUF's Q4_0, Q4_1 and
// Q4_K codes; Q8_0's two 4-bit halves stay two matrices over the same activations, where AMX
// is there or a model keeps them: elsewhere cpu_q8.c takes its whole codes).
//
// Each row's group of 32 activations becomes signed bytes: a = x * 127 / max |x| rounded to an
// integer (the largest +-127), as llama.cpp's 8-bit activations for the same files; each
// activation errs by at most half a unit, 1/254 of its group's largest. sum(a * code) over the
// group is then an exact int32, computed
// - by AVX512-VNNI's VPDPBUSD (64 products an instruction): up to 6 rows a pass over the
//   weights decodes the codes as it goes, 4 rows at a time (`vector_rows`); from 7 rows where
//   AMX is missing, register blocks of 8 rows by one tile take the codes decoded once per block
//   of rows (`block_rows`: 8 sums in registers, each broadcast activation fed straight into
//   VPDPBUSD);
// - from 8 rows by AMX where the CPU has it: a = 16 d1 + d0 as two signed bytes in one 64-byte
//   tile row, which TDPBSUD multiplies by 16 times the codes and by the codes (8,192 products an
//   instruction, one a group of 16 rows).
// Then, in float32 and in one order whatever the path, each group adds
// scale * (x's scale) * sum(a * code) + offset * sum(x) to its 16 outputs, groups in increasing
// order (where the offset is -8 times the scale, Q4_0's and Q8_0's high halves, 8 * sum(a) comes
// out of the integer sum instead: nothing cancels in float32). A group holding a NaN or an
// infinity makes its row's outputs NaN; a group of subnormals counts as zeros.
//
// Why: float32 FMAs set the pace of cpu_int4.c, and decoding the 4-bit weights that of a single
// row. Here the codes go into the products as bytes, and AMX's products outrun FMAs. Bytes, not
// the 14 bits in two bytes this kernel took before: where AMX is missing VPDPBUSD sets the pace
// of batches (about 0.8 of its one 512-bit instruction a cycle on Zen 4), and one byte an
// activation halves its instructions. SmolLM2-135M's matrices on one core of an AMD EPYC (Zen 4),
// tools/bench_cpu_kernels: 2.0x cpu_int4.c's speed at 1 and 16 rows, 2.3x at 64, 2.6x at 512
// (two bytes: 1.5-1.6x from 16 rows on). What it costs (tools/bench_accuracy: SmolLM2-135M's
// Q4_1 file on 3,064 tokens of docs/ARCHITECTURE.md against the same weights in float32, with
// cpu_q8.c's lm_head taking the same bytes and a float32 cache): perplexity +0.07%, the likeliest
// token the same at 95.0% of positions (llama.cpp on the same file: +0.04%, 95.2%).
// With AMX (a Xeon, 14-bit activations then): 1.3 times cpu_int4.c's speed at 1 and 16 rows,
// 1.4-1.5 from 32 to 128, 1.15 at 2,900.
// And exact sums make every path give the same bits: a row's result depends neither on its batch
// (preemption stays invisible in the outputs) nor on whether the CPU has AMX.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_api.h"
#include "cpu_int4.h"

#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
#include "cpu_digits.h"

#define VECTOR_ROWS 4     // the most rows the vector path takes per pass over the weights
#define AMX_ROWS 8        // from this many rows, AMX where the CPU has it
#define BLOCKED_ROWS 7    // from this many rows, register blocks (block_rows) where AMX is missing
#define BLOCK_BYTES (1024 * 1024)  // a block of rows' activations, as AMX's parts, kept in L2 while the tiles pass
#define PREFETCH_BYTES (32 * 1024)  // one row streams the codes: asked for this far ahead, into L2 (as cpu_q8.c)
#define ACTIVATION_BITS 7  // a in -127 .. 127, each group's largest +-127: a signed byte
#define DIGIT_BYTES 32     // a group's activations in one row, a byte each


static int vnni_allowed = 1;  // vnni_enable(0) hands float32 rows back to cpu_int4.c, for tests

int vnni_supported(void) { return vnni_allowed; }

void vnni_enable(int on) { vnni_allowed = on; }

// Each group's a as 32 signed bytes (DIGIT_BYTES), groups `group_stride` bytes apart
// (DIGIT_BYTES for the vector path, a row's groups together; SLOT_BYTES for register blocks, a
// block's rows of one group together).
static void byte_digits(const float *x, int64_t groups, int8_t *dst, int64_t group_stride, RowGroup *info) {
    for (int64_t g = 0; g < groups; g++) {
        __m512i a[2];
        integers(x + g * GROUP, a, info + g, ACTIVATION_BITS, 1);
        for (int i = 0; i < 2; i++) store_bytes(dst + g * group_stride + i * 16, a[i]);
    }
}

#define PART_BYTES (TILE * 64)  // AMX: one group of 16 rows, an A tile

// For AMX: a = 16 d1 + d0 (d0 in -8..7, d1 in -8..8): an A tile row's 64 bytes, the 32 d1 then the
// 32 d0. Slab s (16 rows), group g at (s * groups + g) * PART_BYTES, the slab's row r 64 r bytes on.
// (One tile product a group: the 14-bit activations this kernel took before needed two.)
static void tile_digits(const float *x, int64_t groups, int64_t row, int8_t *xq, RowGroup *info) {
    const int64_t slab = row / TILE, r = row % TILE;
    for (int64_t g = 0; g < groups; g++) {
        __m512i a[2];
        integers(x + g * GROUP, a, info + g, ACTIVATION_BITS, 1);
        for (int i = 0; i < 2; i++) {
            const __m512i d0 = digit(a[i], 4, 8), d1 = _mm512_srai_epi32(_mm512_sub_epi32(a[i], d0), 4);
            int8_t *d = xq + (slab * groups + g) * PART_BYTES + r * 64 + i * 16;
            store_bytes(d, d1);
            store_bytes(d + GROUP, d0);
        }
    }
}

// Group g of a tile's codes as VPDPBUSD's B operand: 8 vectors, vector kk holding output n's codes
// for columns 4kk .. 4kk + 3 in bytes 4n .. 4n + 3.
static inline __attribute__((always_inline)) void code_rows(const uint8_t *tile, int64_t g, const int half,
                                                            __m512i rows[8]) {
    // Byte 4n + c of vector 2j + r: the code of column 8j + 4r + c, from pair 4j + 2r + c / 2 (byte
    // (2r + c / 2) * 16 + n of the j-th 64 bytes), the low nibble for even c, else the high.
    __m512i pick[2];
    for (int r = 0; r < 2; r++) {
        uint8_t idx[64];
        for (int n = 0; n < 16; n++)
            for (int c = 0; c < 4; c++) idx[4 * n + c] = (uint8_t)((c & 1) * 64 + (2 * r + c / 2) * 16 + n);
        pick[r] = _mm512_loadu_si512(idx);
    }
    const __m512i nibble = _mm512_set1_epi8(15);
    const uint8_t *codes = tile + g * group_bytes(half);
    for (int j = 0; j < 4; j++) {
        const __m512i z = _mm512_loadu_si512(codes + 64 * j);
        const __m512i even = _mm512_and_si512(z, nibble), odd = _mm512_and_si512(_mm512_srli_epi16(z, 4), nibble);
        for (int r = 0; r < 2; r++) rows[2 * j + r] = _mm512_permutex2var_epi8(even, pick[r], odd);
    }
}

// A tile's group: its scales and offsets, and how the offsets add: z = 8 where they are -8 times
// the scales (Q4_0, Q8_0's high halves), taken out of the integer sums; else 0, and `plain` says
// whether any offset is nonzero.
typedef struct {
    __m512 scale, offset;
    int z, plain;
} GroupScales;

static inline __attribute__((always_inline)) GroupScales scales_of(const uint8_t *tile, int64_t g, const int half) {
    GroupScales s;
    s.scale = (__m512)group_vector(tile, g * GROUP, 0, half);
    s.offset = (__m512)group_vector(tile, g * GROUP, 1, half);
    s.plain = _mm512_cmpneq_ps_mask(s.offset, _mm512_setzero_ps()) != 0;
    const __m512 shifted = _mm512_fmadd_ps(_mm512_set1_ps(8), s.scale, s.offset);
    s.z = _mm512_cmpneq_ps_mask(shifted, _mm512_setzero_ps()) ? 0 : 8;
    return s;
}

// One row's group added to its 16 outputs, in float32 and in this order whichever path computed
// `sums`: sum(a * code) per output, exact (under 2^31 for codes up to 15).
static inline __attribute__((always_inline)) __m512 add_group(__m512 acc, __m512i sums, const RowGroup *ri,
                                                              const GroupScales *gs) {
    if (gs->z) sums = _mm512_sub_epi32(sums, _mm512_set1_epi32(gs->z * ri->total));
    acc = _mm512_fmadd_ps(_mm512_mul_ps(gs->scale, _mm512_set1_ps(ri->scale)), _mm512_cvtepi32_ps(sums), acc);
    return gs->plain && !gs->z ? _mm512_fmadd_ps(gs->offset, _mm512_set1_ps(ri->sum), acc) : acc;
}

// Up to VECTOR_ROWS rows (xv: byte_digits' rows, `groups` groups each) against one tile: w_groups
// groups of codes, Q8_0's high halves and then its low halves (`groups` apart) against the same
// activations.
static inline __attribute__((always_inline)) void vector_rows(const int8_t *xv, const RowGroup *info, int64_t groups,
                                                              int64_t w_groups, const uint8_t *tile, const int half,
                                                              float *out, int64_t out_stride, const int rows) {
    __m512 acc[VECTOR_ROWS];
    for (int i = 0; i < rows; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < w_groups; g++) {
        const int64_t ag = g < groups ? g : g - groups;  // Q8_0's low halves: the same activations
        for (int line = 0; line < group_bytes(half); line += 64)
            __builtin_prefetch(tile + g * group_bytes(half) + PREFETCH_BYTES + line, 0, 2);
        __m512i b[8];
        code_rows(tile, g, half, b);
        const GroupScales gs = scales_of(tile, g, half);
        for (int i = 0; i < rows; i++) {
            const int8_t *a = xv + (i * groups + ag) * DIGIT_BYTES;
            __m512i even = _mm512_setzero_si512(), odd = even;  // two chains: integer sums, exact in any order
            for (int kk = 0; kk < 8; kk += 2) {
                int32_t four[2];
                memcpy(four, a + 4 * kk, 8);
                even = _mm512_dpbusd_epi32(even, b[kk], _mm512_set1_epi32(four[0]));
                odd = _mm512_dpbusd_epi32(odd, b[kk + 1], _mm512_set1_epi32(four[1]));
            }
            acc[i] = add_group(acc[i], _mm512_add_epi32(even, odd), info + i * groups + ag, &gs);
        }
    }
    for (int i = 0; i < rows; i++) _mm512_storeu_ps(out + i * out_stride, acc[i]);
}

// Rows 0 .. m - 1 against one tile, VECTOR_ROWS at a time.
static void vector_tile(const int8_t *xv, const RowGroup *info, int64_t groups, int64_t w_groups, const uint8_t *tile,
                        const int half, int64_t m, float *out, int64_t out_stride) {
    for (int64_t r = 0; r < m; r += VECTOR_ROWS) {
        const int8_t *x = xv + r * groups * DIGIT_BYTES;
        const RowGroup *ri = info + r * groups;
        float *o = out + r * out_stride;
        switch (m - r < VECTOR_ROWS ? (int)(m - r) : VECTOR_ROWS) {
            case 1: vector_rows(x, ri, groups, w_groups, tile, half, o, out_stride, 1); break;
            case 2: vector_rows(x, ri, groups, w_groups, tile, half, o, out_stride, 2); break;
            case 3: vector_rows(x, ri, groups, w_groups, tile, half, o, out_stride, 3); break;
            default: vector_rows(x, ri, groups, w_groups, tile, half, o, out_stride, 4); break;
        }
    }
}

// Batches where AMX is missing: BLOCK_ROWS rows at a time against one tile (register blocking:
// 2 * BLOCK_ROWS integer sums and the tile's codes in registers, each activation's four bytes
// broadcast from memory straight into VPDPBUSD), each tile's codes turned into VPDPBUSD's
// operands and its scales read once per block of rows (`tile_operands`), the block's digits
// kept in L2 while every tile passes. Each group's sums are exact, and `add_group` adds them
// in the order the other paths do, so the bits are theirs.
#define BLOCK_ROWS 8              // rows per micro-kernel: 16 integer sums in registers
#define PANEL_BYTES (512 * 1024)  // a block of rows' digits, kept in L2 while the tiles pass
#define SLOT_BYTES (BLOCK_ROWS * DIGIT_BYTES)  // a group's digits of BLOCK_ROWS rows, row after row

// A tile's codes as code_rows gives them (8 vectors a group) and its groups' scales.
static void tile_operands(const uint8_t *tile, int64_t w_groups, const int half, __m512i *codes, GroupScales *scales) {
    for (int64_t g = 0; g < w_groups; g++) {
        code_rows(tile, g, half, codes + g * 8);
        scales[g] = scales_of(tile, g, half);
    }
}

// One group's integer sums for BLOCK_ROWS rows (`a`: their activations, SLOT_BYTES; `c`: the
// group's 8 code vectors) or 4: s[row] = sum over the group of the activations times the codes.
// GCC does not fold the broadcasts into VPDPBUSD and spills the sums: the loop is written out.
#define ROW(i, kk) "vpdpbusd " #i "*32+" #kk "*4(%[a])%{1to16%}, %[b], %[s" #i "]\n\t"
#define ZERO(i) "vpxord %[s" #i "], %[s" #i "], %[s" #i "]\n\t"
#define CODES(kk) "vmovdqa64 " #kk "*64(%[c]), %[b]\n\t"
#define STEP8(kk) CODES(kk) ROW(0, kk) ROW(1, kk) ROW(2, kk) ROW(3, kk) ROW(4, kk) ROW(5, kk) ROW(6, kk) ROW(7, kk)
#define STEP4(kk) CODES(kk) ROW(0, kk) ROW(1, kk) ROW(2, kk) ROW(3, kk)
#define SUMS(i) [s##i] "=&v"(s[i])

static inline __attribute__((always_inline)) void group_sums8(const int8_t *a, const __m512i *c, __m512i s[8]) {
    __m512i b;
    __asm__(ZERO(0) ZERO(1) ZERO(2) ZERO(3) ZERO(4) ZERO(5) ZERO(6) ZERO(7)
            STEP8(0) STEP8(1) STEP8(2) STEP8(3) STEP8(4) STEP8(5) STEP8(6) STEP8(7)
            : SUMS(0), SUMS(1), SUMS(2), SUMS(3), SUMS(4), SUMS(5), SUMS(6), SUMS(7), [b] "=&v"(b)
            : [a] "r"(a), [c] "r"(c), "m"(*(const int8_t(*)[SLOT_BYTES])a), "m"(*(const __m512i(*)[8])c));
}

static inline __attribute__((always_inline)) void group_sums4(const int8_t *a, const __m512i *c, __m512i s[8]) {
    __m512i b;
    __asm__(ZERO(0) ZERO(1) ZERO(2) ZERO(3)
            STEP4(0) STEP4(1) STEP4(2) STEP4(3) STEP4(4) STEP4(5) STEP4(6) STEP4(7)
            : SUMS(0), SUMS(1), SUMS(2), SUMS(3), [b] "=&v"(b)
            : [a] "r"(a), [c] "r"(c), "m"(*(const int8_t(*)[SLOT_BYTES])a), "m"(*(const __m512i(*)[8])c));
}
#undef ROW
#undef ZERO
#undef CODES
#undef STEP8
#undef STEP4
#undef SUMS

// `rows` rows (at most BLOCK_ROWS) of one block of digits (block_digits' layout) against one
// tile's operands; `wide`: the 8-row sums, else the 4-row ones (rows <= 4).
static inline __attribute__((always_inline)) void block_rows(const int8_t *xb, const RowGroup *info, int64_t groups,
                                                             int64_t w_groups, const __m512i *codes,
                                                             const GroupScales *scales, float *out,
                                                             int64_t out_stride, int rows, const int wide) {
    __m512 acc[BLOCK_ROWS];
    for (int i = 0; i < BLOCK_ROWS; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < w_groups; g++) {
        const int64_t ag = g < groups ? g : g - groups;  // Q8_0's low halves: the same activations
        __m512i s[8];
        if (wide) group_sums8(xb + ag * SLOT_BYTES, codes + g * 8, s);
        else group_sums4(xb + ag * SLOT_BYTES, codes + g * 8, s);
        for (int i = 0; i < (wide ? 8 : 4); i++)  // rows past `rows`: zeros, computed and left
            acc[i] = add_group(acc[i], s[i], info + i * groups + ag, scales + g);
    }
    for (int i = 0; i < rows; i++) _mm512_storeu_ps(out + i * out_stride, acc[i]);
}

// Rows 0 .. rows - 1 of a block of rows (from a multiple of BLOCK_ROWS) against one tile's
// operands, BLOCK_ROWS at a time, a tail of up to 4 rows by the 4-row sums.
static void block_tile(const int8_t *xb, const RowGroup *info, int64_t groups, int64_t w_groups, const __m512i *codes,
                       const GroupScales *scales, int64_t rows, float *out, int64_t out_stride) {
    for (int64_t r = 0; r < rows; r += BLOCK_ROWS) {
        const int n = rows - r < BLOCK_ROWS ? (int)(rows - r) : BLOCK_ROWS;
        const int8_t *x = xb + r * groups * DIGIT_BYTES;
        if (n > 4) block_rows(x, info + r * groups, groups, w_groups, codes, scales, out + r * out_stride, out_stride,
                              n, 1);
        else block_rows(x, info + r * groups, groups, w_groups, codes, scales, out + r * out_stride, out_stride, n,
                        0);
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
// A tile's codes as TDPBSUD's B tiles, 1 KB a group: rows 0-7 the codes times 16 (for the d1),
// rows 8-15 the codes (for the d0). Codes are at most 15: shifting bytes within words carries
// nothing over.
static void code_tiles(const uint8_t *tile, int64_t w_groups, const int half, uint8_t *dst) {
    for (int64_t g = 0; g < w_groups; g++) {
        __m512i c[8];
        code_rows(tile, g, half, c);
        for (int kk = 0; kk < 8; kk++) {
            _mm512_store_si512(dst + g * 1024 + kk * 64, _mm512_slli_epi16(c[kk], 4));
            _mm512_store_si512(dst + g * 1024 + (8 + kk) * 64, c[kk]);
        }
    }
}

// Group g's sums (the C tile stored) added to the slab's rows.
static inline __attribute__((always_inline)) void add_sums(__m512 *acc, int32_t sums[TILE][TILE],
                                                           const uint8_t *tile, int64_t g, const int half,
                                                           const RowGroup *info, int64_t groups, const int rows) {
    const GroupScales gs = scales_of(tile, g, half);
    const RowGroup *ri = info + (g < groups ? g : g - groups);
    for (int i = 0; i < rows; i++) acc[i] = add_group(acc[i], _mm512_load_si512(sums[i]), ri + i * groups, &gs);
}

// One slab's rows (up to 16) against one tile. Tile 0 A, 2 B, 3 C. Each group's
// sums are added up two groups later, while the tile products run on, row by row as the vector
// path adds them.
static inline __attribute__((always_inline)) void amx_slab(const int8_t *xq, const RowGroup *info, int64_t groups,
                                                           int64_t w_groups, const uint8_t *codes, const uint8_t *tile,
                                                           const int half, int64_t slab, const int rows, float *out,
                                                           int64_t out_stride) {
    __m512 acc[TILE];
    int32_t sums[3][TILE][TILE] __attribute__((aligned(64)));
    const RowGroup *slab_info = info + slab * TILE * groups;
    for (int i = 0; i < TILE; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0, turn = 0; g < w_groups; g++, turn = turn == 2 ? 0 : turn + 1) {
        _tile_loadd(2, codes + g * 1024, 64);
        _tile_loadd(0, xq + (slab * groups + (g < groups ? g : g - groups)) * PART_BYTES, 64);
        _tile_zero(3);
        _tile_dpbsud(3, 0, 2);
        _tile_stored(3, sums[turn], 64);
        if (g > 1) add_sums(acc, sums[turn == 2 ? 0 : turn + 1], tile, g - 2, half, slab_info, groups, rows);
    }
    for (int64_t g = w_groups > 1 ? w_groups - 2 : 0; g < w_groups; g++)
        add_sums(acc, sums[g % 3], tile, g, half, slab_info, groups, rows);
    for (int i = 0; i < rows; i++) _mm512_storeu_ps(out + i * out_stride, acc[i]);
}

// All rows on AMX: blocks of rows whose parts stay in L2 while every tile passes (one job a block
// and tile, consecutive jobs one block through the tiles), each tile's codes made B tiles once
// per block.
static int amx_rows(const float *x, int64_t x_stride, int64_t m, int64_t groups, int64_t w_groups,
                    const uint8_t *packed, int64_t tile_bytes, const int half, int64_t tiles, float *out,
                    int64_t n_out, int num_threads) {
    const int64_t slabs = (m + TILE - 1) / TILE, slab_bytes = groups * PART_BYTES;
    const int64_t block = BLOCK_BYTES / slab_bytes > 1 ? BLOCK_BYTES / slab_bytes : 1;  // slabs a block
    const int64_t blocks = (slabs + block - 1) / block, jobs = blocks * tiles;
    int8_t *xq = aligned_alloc(64, slabs * slab_bytes);
    RowGroup *info = malloc(slabs * TILE * groups * sizeof(RowGroup));
    int failed = !xq || !info;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && !failed)
    if (!failed) {
#pragma omp for schedule(static)
        for (int64_t s = 0; s < slabs; s++)
            for (int64_t row = s * TILE; row < (s + 1) * TILE; row++) {
                if (row < m) {
                    tile_digits(x + row * x_stride, groups, row, xq, info + row * groups);
                    continue;
                }
                for (int64_t g = 0; g < groups; g++)  // rows past m multiply as zeros
                    memset(xq + (s * groups + g) * PART_BYTES + row % TILE * 64, 0, 64);
            }
        amx_configure_tiles();
        uint8_t *codes = aligned_alloc(64, w_groups * 1024);
        if (!codes) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < jobs; j++) {
            if (!codes) continue;
            const int64_t b = j / tiles, t = j % tiles;
            const uint8_t *tile = packed + t * tile_bytes;
            code_tiles(tile, w_groups, half, codes);
            for (int64_t s = b * block; s < (b + 1) * block && s < slabs; s++) {
                float *o = out + s * TILE * n_out + t * TILE;
                if (m - s * TILE >= TILE)  // a whole slab: the sums stay in registers
                    amx_slab(xq, info, groups, w_groups, codes, tile, half, s, TILE, o, n_out);
                else
                    amx_slab(xq, info, groups, w_groups, codes, tile, half, s, (int)(m - s * TILE), o, n_out);
            }
        }
        free(codes);
        _tile_release();
    }
    free(xq);
    free(info);
    return failed ? -2 : 0;
}
#endif

// x: float32 [m, x_cols], rows x_stride apart; W: [n_out, w_cols] packed (cpu_int4.h), w_cols =
// x_cols, or 2 * x_cols for Q8_0's split codes; out: float32 [m, n_out], contiguous. n_out a
// multiple of 16, x_cols of 32. Returns 0 or -2 (out of memory).
int int4_linear_vnni(const float *x, int64_t x_stride, int64_t m, int64_t x_cols, const uint8_t *packed, int half,
                     int64_t n_out, int64_t w_cols, float *out, int num_threads) {
    if (m <= 0) return 0;
    const int64_t tiles = n_out / TILE, groups = x_cols / GROUP, w_groups = w_cols / GROUP;
    const int64_t tile_bytes = w_groups * group_bytes(half);
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
    if (m >= AMX_ROWS && amx_supported())
        return amx_rows(x, x_stride, m, groups, w_groups, packed, tile_bytes, half, tiles, out, n_out, num_threads);
#endif
    // From BLOCKED_ROWS rows: blocks of rows whose digits stay in L2 while every tile passes,
    // one job a block and tile, consecutive jobs one block through the tiles.
    const int blocked = m >= BLOCKED_ROWS && !amx_supported();  // with AMX: the vectors below AMX_ROWS
    const int64_t padded = blocked ? (m + BLOCK_ROWS - 1) / BLOCK_ROWS * BLOCK_ROWS : m;  // rows past m: zeros
    int8_t *xv = malloc(padded * groups * DIGIT_BYTES);
    RowGroup *info = calloc(padded * groups, sizeof(RowGroup));
    if (!xv || !info) {
        free(xv);
        free(info);
        return -2;
    }
    int64_t block = blocked ? PANEL_BYTES / (groups * DIGIT_BYTES) / BLOCK_ROWS * BLOCK_ROWS : m;
    if (block < BLOCK_ROWS) block = BLOCK_ROWS;
    const int64_t jobs = (m + block - 1) / block * tiles;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < padded; r++) {
            int8_t *d = blocked ? xv + r / BLOCK_ROWS * groups * SLOT_BYTES + r % BLOCK_ROWS * DIGIT_BYTES
                                : xv + r * groups * DIGIT_BYTES;
            const int64_t stride = blocked ? SLOT_BYTES : DIGIT_BYTES;
            if (r < m) byte_digits(x + r * x_stride, groups, d, stride, info + r * groups);
            else for (int64_t g = 0; g < groups; g++) memset(d + g * stride, 0, DIGIT_BYTES);
        }
        __m512i *codes = blocked ? aligned_alloc(64, w_groups * 8 * sizeof(__m512i)) : NULL;
        GroupScales *scales = blocked ? aligned_alloc(64, w_groups * sizeof(GroupScales)) : NULL;
        if (blocked && (!codes || !scales)) {
#pragma omp atomic write
            failed = 1;
        }
        if (!blocked) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < tiles; t++)
                vector_tile(xv, info, groups, w_groups, packed + t * tile_bytes, half, m, out + t * TILE, n_out);
        } else {
#pragma omp for schedule(static)
            for (int64_t j = 0; j < jobs; j++) {
                if (!codes || !scales) continue;
                const int64_t r0 = j / tiles * block, t = j % tiles;
                const int64_t rows = m - r0 < block ? m - r0 : block;
                tile_operands(packed + t * tile_bytes, w_groups, half, codes, scales);
                block_tile(xv + r0 * groups * DIGIT_BYTES, info + r0 * groups, groups, w_groups, codes, scales, rows,
                           out + r0 * n_out + t * TILE, n_out);
            }
        }
        free(codes);
        free(scales);
    }
    free(xv);
    free(info);
    return failed ? -2 : 0;
}
#else
int vnni_supported(void) { return 0; }

void vnni_enable(int on) { (void)on; }

int int4_linear_vnni(const float *x, int64_t x_stride, int64_t m, int64_t x_cols, const uint8_t *packed, int half,
                     int64_t n_out, int64_t w_cols, float *out, int num_threads) {
    (void)x, (void)x_stride, (void)m, (void)x_cols, (void)packed, (void)half, (void)n_out, (void)w_cols, (void)out;
    (void)num_threads;
    return -5;
}
#endif
