// CPU kernels for the paged KV cache: attention (decode, and prompts) and the cache write.
//
// The torch reference (pagedkv/kernels/reference.py) gathers every K/V block a decode batch reads
// into a fresh tensor, converts it to float32 and runs two batched matmuls around a softmax;
// on a CPU that moves the K/V several times and, from a few dozen sequences on, costs as much
// as the model's matrices. These kernels read each K/V row once, in place, through the block
// tables (as vLLM's CPU backend does), for a whole GQA group of query heads at a time.
// pagedkv/kernels/cpu/ops.py builds them with gcc at first use; the reference stays the oracle they are
// tested against.
//
// Cache layout: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], float32 or
// bfloat16. Activations (queries, new K/V, outputs): float32 or bfloat16 rows, one per token,
// with a token stride; the heads of a token contiguous. Arithmetic in float32; with bfloat16
// queries and cache, on a CPU with AMX, the query-key products are AMX tile products (exact
// products, float32 sums) of 16 positions at a time.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_api.h"
#include "cpu_bfloat16.h"

// AMX (cpu_amx.c): the query-key products of bfloat16 caches, where the CPU has it.
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <immintrin.h>
#define HAVE_AMX 1
#else
#define HAVE_AMX 0
#endif

#define ERR_BLOCK -1   // a block table entry or a slot outside the cache
#define ERR_MEMORY -2  // no memory for the job list
#define ERR_TABLE -3   // a context longer than its block table
#define ERR_QUERY -4   // query rows outside the batch, more new tokens than context, or an unsupported shape

// Element i of a float32 (bf16 = 0) or bfloat16 (bf16 = 1) array. `bf16` is a constant at
// each call site after inlining, so every kernel is compiled once per type.
static inline __attribute__((always_inline)) float load(const void *p, int64_t i, const int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline __attribute__((always_inline)) void store(void *p, int64_t i, float x, const int bf16) {
    if (bf16) ((uint16_t *)p)[i] = float_to_bf16(x);
    else ((float *)p)[i] = x;
}

// 16 floats in one vector (GCC vector extensions: AVX-512 where the CPU has it, halves or
// quarters of it elsewhere). Head dimensions that are multiples of 16 take the vector path.
#define LANES 16
typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));
typedef uint32_t vuint __attribute__((vector_size(64)));
typedef uint16_t vhalf __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) vfloat load_vec(const void *p, int64_t i, const int bf16) {
    if (bf16) {
        vhalf h;
        memcpy(&h, (const uint16_t *)p + i, sizeof h);
        return (vfloat)(__builtin_convertvector(h, vuint) << 16);
    }
    vfloat x;
    memcpy(&x, (const float *)p + i, sizeof x);
    return x;
}

// The sum of the 16 lanes as a tree (a chain of 15 scalar additions would be the critical path).
static inline float sum_lanes(vfloat a) {
    a += __builtin_shuffle(a, (vint){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    a += __builtin_shuffle(a, (vint){4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
    a += __builtin_shuffle(a, (vint){2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
    a += __builtin_shuffle(a, (vint){1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0});
    return a[0];
}

// One layer of the cache, as element offsets from `base` (that layer's K of block 0).
typedef struct {
    const void *base;
    int64_t num_blocks;
    int64_t block_stride;  // block b -> b + 1
    int64_t kv_stride;     // K -> V of the same block
    int64_t slot_stride;   // offset o -> o + 1 in a block: every head's row of one token
    int block_size, head_dim;
} CacheLayer;

static CacheLayer cache_layer(const void *cache, int bf16, int64_t num_blocks, int num_layers, int layer,
                              int block_size, int num_kv_heads, int head_dim) {
    CacheLayer c;
    c.slot_stride = (int64_t)num_kv_heads * head_dim;
    c.kv_stride = c.slot_stride * block_size;
    c.block_stride = 2 * c.kv_stride * num_layers;
    c.base = (const char *)cache + (int64_t)layer * 2 * c.kv_stride * (bf16 ? 2 : 4);
    c.num_blocks = num_blocks;
    c.block_size = block_size;
    c.head_dim = head_dim;
    return c;
}

#define TILE 16    // context positions per step: one vector of scores
#define QUERIES 4  // query vectors that share each K/V row read (a GQA group, or rows of a prompt)

static inline __attribute__((always_inline)) vfloat splat(float x) { return (vfloat){0} + x; }

// a where `mask` (a vector comparison's result) is set, else b.
static inline __attribute__((always_inline)) vfloat blend(vint mask, vfloat a, vfloat b) {
    return (vfloat)(((vint)a & mask) | ((vint)b & ~mask));
}

// x rounded to bfloat16 (to nearest even, NaN to a quiet NaN), still as float32 values.
static inline __attribute__((always_inline)) vfloat round_bf16_vec(vfloat x) {
    const vuint u = (vuint)x;
    const vuint rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    return blend(x != x, splat(__builtin_nanf("")), (vfloat)rounded);
}

// store() for 16 elements.
static inline __attribute__((always_inline)) void store_vec(void *p, int64_t i, vfloat x, const int bf16) {
    if (bf16) {
        const vhalf h = __builtin_convertvector((vuint)round_bf16_vec(x) >> 16, vhalf);
        memcpy((uint16_t *)p + i, &h, sizeof h);
    } else {
        memcpy((float *)p + i, &x, sizeof x);
    }
}

// The 16 sums at once: lane t of the result is the sum of v[t]'s lanes. Four rounds, each
// halving the lanes per vector and doubling the vectors per lane (45 operations where 16
// separate reductions take 128).
static inline vfloat sum_each(const vfloat v[TILE]) {
    const vint lo1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const vint hi1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const vint lo2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const vint hi2 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    const vint lo3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    const vint hi3 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
    const vint lo4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const vint hi4 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    vfloat w[8], x[4], y[2];
    for (int i = 0; i < 8; i++)  // w[i]: v[2i] in lanes 0-7, v[2i+1] in 8-15
        w[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], lo1) + __builtin_shuffle(v[2 * i], v[2 * i + 1], hi1);
    for (int i = 0; i < 4; i++)  // x[i]: v[4i .. 4i+3], four lanes each
        x[i] = __builtin_shuffle(w[2 * i], w[2 * i + 1], lo2) + __builtin_shuffle(w[2 * i], w[2 * i + 1], hi2);
    for (int i = 0; i < 2; i++)  // y[i]: v[8i .. 8i+7], two lanes each
        y[i] = __builtin_shuffle(x[2 * i], x[2 * i + 1], lo3) + __builtin_shuffle(x[2 * i], x[2 * i + 1], hi3);
    return __builtin_shuffle(y[0], y[1], lo4) + __builtin_shuffle(y[0], y[1], hi4);
}

static inline float max_lanes(vfloat a) {
    vfloat b = __builtin_shuffle(a, (vint){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    a = blend(a > b, a, b);
    b = __builtin_shuffle(a, (vint){4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
    a = blend(a > b, a, b);
    b = __builtin_shuffle(a, (vint){2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
    a = blend(a > b, a, b);
    return a[0] > a[1] ? a[0] : a[1];
}

// e^x for x <= 0 (softmax's exponents), within about one float32 rounding: 2^n * e^r with
// n = round(x / ln 2), |r| <= ln 2 / 2, e^r by Cephes' expf polynomial. Below -87 (and -inf)
// the result is 0.
static inline vfloat exp_nonpositive(vfloat x) {
    const vfloat round_magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    const vint underflow = x < splat(-87.0f);
    x = blend(underflow, splat(-87.0f), x);
    const vfloat t = x * 1.44269504088896341f + round_magic, n = t - round_magic;
    const vfloat r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vfloat p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const vint two_n = ((vint)t - (vint)round_magic + 127) << 23;
    return blend(underflow, splat(0.0f), p * (vfloat)two_n);
}

// Element offsets (from c->base) of the K rows of context positions t0 .. t0+n-1; positions
// before `first` (a sliding window's start, whose blocks may be gone) take position first's
// row, which no query weighs.
static inline void tile_rows(const CacheLayer *c, const int32_t *table, int t0, int n, int first, int64_t *rows) {
    const int skip = first - t0 > n ? n : first - t0 > 0 ? first - t0 : 0;
    int block = (t0 + skip) / c->block_size, offset = (t0 + skip) % c->block_size;
    for (int i = 0; i < n; i++) {
        rows[i] = table[block] * c->block_stride + offset * c->slot_stride;
        if (i < skip) continue;
        if (++offset == c->block_size) offset = 0, block++;
    }
}

// Positions of the tile from t0 before `end`: TILE, fewer in the last, 0 past it.
static inline int tile_length(int t0, int end) { return end - t0 >= TILE ? TILE : end - t0 > 0 ? end - t0 : 0; }

// Asks for the K and V bytes span_first .. span_end-1 of n rows (tile_rows' offsets) into L2.
// Attention asks two tiles ahead: a sequence's blocks lie anywhere in the cache, and a tile's
// arithmetic is shorter than its rows take to arrive from memory.
static inline void prefetch_rows(const CacheLayer *c, const int64_t *rows, int n, int64_t span_first,
                                 int64_t span_end, int elem) {
    for (int i = 0; i < n; i++)
        for (int64_t b = span_first; b < span_end; b += 64) {
            __builtin_prefetch((const char *)c->base + rows[i] * elem + b, 0, 2);
            __builtin_prefetch((const char *)c->base + (rows[i] + c->kv_stride) * elem + b, 0, 2);
        }
}

// One cache row of VECS * 16 elements as float vectors. A bfloat16 row of an even number of
// vectors is read 32 elements a load and widened in two operations: the even elements to
// row[2p], the odd ones to row[2p+1] (`split` order; queries and outputs are permuted to
// match), where widening in element order takes five.
static inline __attribute__((always_inline)) void load_row(const void *base, int64_t at, const int bf16,
                                                          const int VECS, vfloat *row) {
    if (bf16 && VECS % 2 == 0)
        for (int p = 0; p < VECS / 2; p++) {
            vuint pair;
            memcpy(&pair, (const uint16_t *)base + at + p * 2 * LANES, sizeof pair);
            row[2 * p] = (vfloat)(pair << 16);
            row[2 * p + 1] = (vfloat)(pair & 0xFFFF0000u);
        }
    else
        for (int v = 0; v < VECS; v++) row[v] = load_vec(base, at + v * LANES, bf16);
}

// float32 [VECS * 16] in element order to load_row's order, and back.
static inline __attribute__((always_inline)) void to_row_order(const float *x, const int split, const int VECS,
                                                              vfloat *row) {
    for (int v = 0; v < VECS; v++) row[v] = load_vec(x, v * LANES, 0);
    if (split)
        for (int p = 0; p < VECS / 2; p++) {
            const vfloat a = row[2 * p], b = row[2 * p + 1];
            row[2 * p] = __builtin_shuffle(a, b, (vint){0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30});
            row[2 * p + 1] = __builtin_shuffle(a, b, (vint){1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31});
        }
}

static inline __attribute__((always_inline)) void from_row_order(const vfloat *row, const int split, const int VECS,
                                                                float *x) {
    for (int v = 0; v < VECS; v++) {
        vfloat o = row[v];
        if (split) {
            const vfloat even = row[v & ~1], odd = row[v | 1];
            o = v % 2 == 0
                ? __builtin_shuffle(even, odd, (vint){0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23})
                : __builtin_shuffle(even, odd, (vint){8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31});
        }
        memcpy(x + v * LANES, &o, sizeof o);
    }
}

// The KV heads one job walks a sequence's context for at once: a tile's rows of every head
// lie together in the cache (a slot holds all of them), so one pass streams them in order.
#define UNITS 8
// Arrays of a head's vectors take the largest size: sized by VECS, a constant only after
// inlining, they would be variable-length arrays, kept in memory.
#define MAX_VECS 16

// Query vectors of one sequence against up to UNITS KV heads: for unit u (KV head at element
// offset heads[u] of a slot), q[(u * QUERIES + j) * VECS * 16] is query j (float32, element
// order), which sees context positions lo[j] .. ctx[j]-1 (ctx[j] > 0 for j < nq; lo[j] =
// ctx[j] - window with a sliding window of `window` > 0 positions, else 0); query j of every
// unit is the same token's. Flash-style: one pass over the context in tiles of 16 positions, a
// running maximum and sum per query, the weighted V rows summed in registers; each K and V row
// is read once for a unit's queries. Tiles are aligned to multiples of 16 positions, and a
// query skips the tiles that hold none of its positions, so each query's arithmetic is its own
// (no lane mixes queries or heads) and a row's result is the same whatever queries, heads,
// batch or thread it is computed with. Blocks wholly before every query's window are never
// read. With `amx` (bfloat16 cache and queries, heads a multiple of 32 wide; one unit) a
// tile's scores are one C tile, positions by queries: A = the tile's K rows (in place when they
// are 16 evenly spaced rows, else copied), B = the queries, 32 dimensions at a time; each
// query's column is its own, as above. SmolLM2-135M's decode over a float32 cache, 64
// sequences of 300 positions, 30 layers, 1 thread, Zen 4: 130 ms a step, where one KV head a
// job with its arrays in memory took 236 (the reads, scattered 24 KB a block and layer, now
// set the pace: about 7 GB/s, where such reads alone reach 10).
static inline __attribute__((always_inline)) void attend(const CacheLayer *c, const int bf16, const int VECS,
                                                        const int amx, const int32_t *table, const float *q,
                                                        const int *ctx, int nq, const int64_t *heads, int units,
                                                        int window, float scale, float *out) {
    const int d_len = VECS * LANES, split = bf16 && VECS % 2 == 0;
    vfloat acc[UNITS][QUERIES][MAX_VECS], qv[UNITS][QUERIES][MAX_VECS];
    float top[UNITS][QUERIES], total[UNITS][QUERIES];
#if HAVE_AMX
    // The queries as B tiles, one per 32 dimensions: row r holds each query's dimensions 2r and
    // 2r + 1 (bfloat16, exact: the queries were bfloat16). Columns from nq on are left as they
    // are: column j of the scores depends on column j of these tiles only.
    uint32_t q_tiles[8][TILE * TILE] __attribute__((aligned(64)));  // heads of up to 256
    uint16_t k_rows[TILE][256] __attribute__((aligned(64)));
    float scores[TILE * TILE] __attribute__((aligned(64)));
    if (amx)
        for (int j = 0; j < nq; j++)
            for (int d = 0; d < d_len / 32; d++) {
                const float *dims = q + j * d_len + d * 32;
                const __m512 low = _mm512_loadu_ps(dims), high = _mm512_loadu_ps(dims + 16);
                uint32_t pairs[TILE] __attribute__((aligned(64)));
                _mm512_store_si512(pairs, (__m512i)_mm512_cvtne2ps_pbh(high, low));
                for (int r = 0; r < TILE; r++) q_tiles[d][r * TILE + j] = pairs[r];
            }
#endif
    float weight[QUERIES][TILE] __attribute__((aligned(64)));
    int64_t rows[TILE], ahead[TILE], far[TILE];  // this tile's rows, the next's, the one after
    int ctx_max = 0, lo[QUERIES], lo_min = 0;
    for (int j = 0; j < QUERIES; j++) {
        lo[j] = j < nq && window > 0 && ctx[j] > window ? ctx[j] - window : 0;
        if (j < nq && ctx[j] > ctx_max) ctx_max = ctx[j];
        if (j < nq && (j == 0 || lo[j] < lo_min)) lo_min = lo[j];
    }
    for (int u = 0; u < units; u++)
        for (int j = 0; j < QUERIES; j++) {
            top[u][j] = -INFINITY;
            total[u][j] = 0.0f;
            for (int v = 0; v < VECS; v++) acc[u][j][v] = splat(0.0f);
            if (j < nq) to_row_order(q + (u * QUERIES + j) * d_len, split, VECS, qv[u][j]);
        }
    // The bytes of a slot the job reads: from the first unit's head to the end of the last's.
    const int elem = bf16 ? 2 : 4;
    const int64_t span_first = heads[0] * elem, span_end = (heads[units - 1] + d_len) * elem;
    const vint lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const int t_first = lo_min / TILE * TILE;
    tile_rows(c, table, t_first, tile_length(t_first, ctx_max), lo_min, rows);
    tile_rows(c, table, t_first + TILE, tile_length(t_first + TILE, ctx_max), lo_min, ahead);
    prefetch_rows(c, ahead, tile_length(t_first + TILE, ctx_max), span_first, span_end, elem);
    for (int t0 = t_first; t0 < ctx_max; t0 += TILE) {
        const int n = tile_length(t0, ctx_max), n_far = tile_length(t0 + 2 * TILE, ctx_max);
        tile_rows(c, table, t0 + 2 * TILE, n_far, lo_min, far);  // each tile's rows found once
        prefetch_rows(c, far, n_far, span_first, span_end, elem);
        for (int i = n; i < TILE; i++) rows[i] = rows[n - 1];  // scored, never weighed
        int valid[QUERIES], skip[QUERIES];  // lanes skip .. valid-1 of the tile are query j's
        for (int j = 0; j < QUERIES; j++) {
            valid[j] = j < nq ? (ctx[j] - t0 < n ? ctx[j] - t0 : n) : 0;
            skip[j] = j < nq && lo[j] > t0 ? lo[j] - t0 : 0;
        }
        for (int u = 0; u < units; u++) {
            vfloat s[QUERIES];
            if (!amx) {
                vfloat partial[QUERIES][TILE];
                for (int i = 0; i < TILE; i++) {
                    vfloat k[MAX_VECS];
                    load_row(c->base, rows[i] + heads[u], bf16, VECS, k);
                    for (int j = 0; j < QUERIES; j++) {
                        if (j >= nq) break;
                        vfloat part = qv[u][j][0] * k[0];
                        for (int v = 1; v < VECS; v++) part += qv[u][j][v] * k[v];
                        partial[j][i] = part;
                    }
                }
                for (int j = 0; j < QUERIES; j++)
                    if (j < nq) s[j] = sum_each(partial[j]);
            }
#if HAVE_AMX
            else {
                // scores[i][j] = K row i . query j: A = the tile's K rows (in place where they are
                // 16 evenly spaced rows of one block, else copied, the rows past n zero).
                const uint16_t *k = (const uint16_t *)c->base + rows[0] + heads[u];
                int64_t k_stride = c->slot_stride * 2;
                int in_place = n == TILE;
                for (int i = 1; i < TILE && in_place; i++) in_place = rows[i] - rows[0] == i * c->slot_stride;
                if (!in_place) {
                    for (int i = 0; i < TILE; i++) {
                        if (i < n) memcpy(k_rows[i], (const uint16_t *)c->base + rows[i] + heads[u], d_len * 2);
                        else memset(k_rows[i], 0, d_len * 2);
                    }
                    k = k_rows[0];
                    k_stride = sizeof k_rows[0];
                }
                _tile_zero(4);
                for (int d = 0; d < d_len / 32; d++) {
                    _tile_loadd(0, k + d * 32, k_stride);
                    _tile_loadd(2, q_tiles[d], 64);
                    _tile_dpbf16ps(4, 0, 2);
                }
                _tile_stored(4, scores, TILE * 4);
                for (int j = 0; j < nq; j++)  // query j's column of the scores
                    s[j] = (vfloat)_mm512_i32gather_ps(
                        _mm512_add_epi32(_mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80,
                                                          64, 48, 32, 16, 0),
                                         _mm512_set1_epi32(j)),
                        scores, 4);
            }
#endif
            vfloat a[QUERIES][MAX_VECS];  // the unit's weighted V sums, in registers for the tile
            for (int j = 0; j < QUERIES; j++) {
                vfloat p = splat(0.0f);
                for (int v = 0; v < VECS; v++) a[j][v] = acc[u][j][v];
                if (valid[j] > skip[j]) {
                    const vint keep = (lane < valid[j]) & (lane >= skip[j]);
                    const vfloat scaled = blend(keep, s[j] * scale, splat(-INFINITY));
                    const float tile_top = max_lanes(scaled);
                    const float new_top = tile_top > top[u][j] ? tile_top : top[u][j];
                    const float rescale = expf(top[u][j] - new_top);
                    p = exp_nonpositive(scaled - new_top);
                    total[u][j] = total[u][j] * rescale + sum_lanes(p);
                    top[u][j] = new_top;
                    for (int v = 0; v < VECS; v++) a[j][v] *= rescale;
                }
                memcpy(weight[j], &p, sizeof p);
            }
            for (int i = 0; i < n; i++) {
                vfloat val[MAX_VECS];
                load_row(c->base, rows[i] + heads[u] + c->kv_stride, bf16, VECS, val);
                for (int j = 0; j < QUERIES; j++) {
                    if (j >= nq) break;
                    for (int v = 0; v < VECS; v++) a[j][v] += weight[j][i] * val[v];
                }
            }
            for (int j = 0; j < QUERIES; j++)
                for (int v = 0; v < VECS; v++) acc[u][j][v] = a[j][v];
        }
        memcpy(rows, ahead, sizeof rows);
        memcpy(ahead, far, sizeof ahead);
    }
    for (int u = 0; u < units; u++)
        for (int j = 0; j < nq; j++) {
            const float inv = ctx[j] > 0 ? 1.0f / total[u][j] : 0.0f;
            for (int v = 0; v < VECS; v++) acc[u][j][v] *= inv;
            from_row_order(acc[u][j], split, VECS, out + (u * QUERIES + j) * d_len);
        }
}

// One job: for each of KV heads kv_head .. kv_head+heads-1, query vectors first ..
// first+count-1 of sequence `seq` (vector r * group + i is query head kv_head * group + i of the
// sequence's row r).
typedef struct {
    int seq, kv_head, heads, first, count;
} Job;

// The per-type, per-head-size instances of `attend`, chosen once per call.
#define ATTEND_CASES(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(16)
#define ATTEND_ARGS const CacheLayer *c, const int32_t *t, const float *q, const int *x, int n, const int64_t *h, \
                    int u, int w, float s, float *o
#define ATTEND_FN(vecs)                                                                                     \
    static void attend_f32_##vecs(ATTEND_ARGS) { attend(c, 0, vecs, 0, t, q, x, n, h, u, w, s, o); }       \
    static void attend_bf16_##vecs(ATTEND_ARGS) { attend(c, 1, vecs, 0, t, q, x, n, h, u, w, s, o); }      \
    static void attend_bf16_amx_##vecs(ATTEND_ARGS) {                                                       \
        attend(c, 1, vecs, HAVE_AMX && vecs % 2 == 0, t, q, x, n, h, u, w, s, o);                           \
    }
ATTEND_CASES(ATTEND_FN)
typedef void (*AttendFn)(ATTEND_ARGS);

// Whether attention takes its query-key products on AMX's tiles: bfloat16 queries and cache,
// heads a multiple of 32 wide, and AMX usable here.
static int attention_on_amx(int query_bf16, int cache_bf16, int head_dim) {
    return HAVE_AMX && query_bf16 && cache_bf16 && head_dim % 32 == 0 && amx_supported();
}

// The instance for a cache type and head size (with AMX's tiles where `amx`), NULL where none.
static AttendFn attend_fn(int bf16, int head_dim, int amx) {
#define ATTEND_PICK(vecs)            \
    if (head_dim == (vecs) * LANES) \
        return amx ? attend_bf16_amx_##vecs : bf16 ? attend_bf16_##vecs : attend_f32_##vecs;
    ATTEND_CASES(ATTEND_PICK)
    return NULL;
}

// The head sizes `paged_attention` takes: multiples of 16 up to 128, and 256.
int paged_attention_supports(int head_dim) { return attend_fn(0, head_dim, 0) != NULL; }

// Attention over the paged cache for a ragged batch whose new K/V are already in it.
// Sequence s owns query rows query_start_loc[s] .. query_start_loc[s+1]-1 (NULL: row s alone,
// the decode case), its last rows: row i of q_len sees positions 0 .. ctx - q_len + i, or with
// a sliding window of `window` > 0 positions the last `window` of them. Table entries of
// blocks wholly before the first row's window are neither checked nor read.
// query: [rows, num_heads, head_dim] float32 or bfloat16, rows `query_stride` apart; out:
// contiguous, same type. block_tables: int32 rows of `table_width` entries, `table_stride`
// apart; context_lens: int32 [num_seqs]. A row with no context gets zeros; rows of no
// sequence, and of sequences with more than `max_rows` rows, are left as they are. Returns 0,
// or ERR_BLOCK / ERR_MEMORY / ERR_TABLE / ERR_QUERY (out is then unspecified).
int paged_attention(const void *query, int64_t query_stride, int query_bf16, int64_t num_rows, void *out,
                    const void *cache, int cache_bf16, int64_t num_blocks, int num_layers, int layer,
                    int block_size, int num_kv_heads, int head_dim, int num_heads, const int32_t *block_tables,
                    int64_t table_stride, int64_t table_width, const int32_t *query_start_loc,
                    const int32_t *context_lens, int num_seqs, int64_t max_rows, float scale, int window,
                    int num_threads) {
    const int amx = attention_on_amx(query_bf16, cache_bf16, head_dim);
    const AttendFn fn = attend_fn(cache_bf16, head_dim, amx);
    if (!fn || num_heads % num_kv_heads) return ERR_QUERY;
    const CacheLayer c = cache_layer(cache, cache_bf16, num_blocks, num_layers, layer, block_size, num_kv_heads,
                                     head_dim);
    const int group = num_heads / num_kv_heads;
    // Check every sequence before any work, and count the query vectors' groups of QUERIES.
    int64_t num_chunks = 0;
    for (int s = 0; s < num_seqs; s++) {
        const int64_t start = query_start_loc ? query_start_loc[s] : s;
        const int64_t q_len = query_start_loc ? query_start_loc[s + 1] - start : 1;
        const int ctx = context_lens[s] > 0 ? context_lens[s] : 0;
        if (start < 0 || q_len < 0 || start + q_len > num_rows || (query_start_loc && q_len > ctx)) return ERR_QUERY;
        if ((ctx + block_size - 1) / block_size > table_width) return ERR_TABLE;
        const int64_t first_key = window > 0 && ctx - q_len + 1 > window ? ctx - q_len + 1 - window : 0;
        for (int64_t b = first_key / block_size; b < (ctx + block_size - 1) / block_size; b++) {
            const int32_t block = block_tables[s * table_stride + b];
            if (block < 0 || block >= num_blocks) return ERR_BLOCK;
        }
        if (q_len <= max_rows) num_chunks += (q_len * group + QUERIES - 1) / QUERIES;
    }
    // A job takes every KV head (up to UNITS) of its query vectors; one head each where that
    // would leave threads too few jobs to share (a decode of a sequence or two), and on AMX.
    int heads_per_job = num_kv_heads < UNITS ? num_kv_heads : UNITS;
    if (amx || (num_threads > 1 && num_chunks < 4 * num_threads)) heads_per_job = 1;
    const int head_jobs = (num_kv_heads + heads_per_job - 1) / heads_per_job;
    const int64_t num_jobs = num_chunks * head_jobs;
    Job *jobs = malloc(sizeof(Job) * (num_jobs ? num_jobs : 1));
    if (!jobs) return ERR_MEMORY;
    int64_t j = 0;
    for (int s = 0; s < num_seqs; s++) {
        const int64_t q_len = query_start_loc ? query_start_loc[s + 1] - query_start_loc[s] : 1;
        const int64_t vectors = q_len <= max_rows ? q_len * group : 0;
        for (int64_t first = 0; first < vectors; first += QUERIES)
            for (int g = 0; g < num_kv_heads; g += heads_per_job)
                jobs[j++] = (Job){s, g, num_kv_heads - g < heads_per_job ? num_kv_heads - g : heads_per_job,
                                  (int)first, (int)(vectors - first < QUERIES ? vectors - first : QUERIES)};
    }
    const int64_t row_len = (int64_t)num_heads * head_dim;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && num_jobs > 1)
    {
    if (amx) amx_configure_tiles();
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_jobs; i++) {
        const Job job = jobs[i];
        const int64_t start = query_start_loc ? query_start_loc[job.seq] : job.seq;
        const int64_t q_len = query_start_loc ? query_start_loc[job.seq + 1] - start : 1;
        const int ctx = context_lens[job.seq] > 0 ? context_lens[job.seq] : 0;
        // The job's queries and outputs, float32: unit u's query k at (u * QUERIES + k) * head_dim.
        float q[UNITS * QUERIES * 16 * LANES] __attribute__((aligned(64)));
        float o[UNITS * QUERIES * 16 * LANES] __attribute__((aligned(64)));
        int q_ctx[QUERIES] = {0};
        int64_t heads[UNITS];  // element offset of each unit's KV head in a slot
        int64_t row[QUERIES];  // query k's row of the sequence, and its head's place in the group
        int in_group[QUERIES];
        for (int k = 0; k < job.count; k++) {
            row[k] = (job.first + k) / group;
            in_group[k] = (job.first + k) % group;
            q_ctx[k] = ctx ? (int)(ctx - q_len + row[k] + 1) : 0;
        }
        for (int u = 0; u < job.heads; u++) {
            heads[u] = (int64_t)(job.kv_head + u) * head_dim;
            for (int k = 0; k < job.count; k++) {
                const int64_t head = (int64_t)(job.kv_head + u) * group + in_group[k];
                const int64_t at = (start + row[k]) * query_stride + head * head_dim;
                float *dst = q + (u * QUERIES + k) * head_dim;
                for (int d = 0; d < head_dim; d++) dst[d] = load(query, at + d, query_bf16);
            }
        }
        if (ctx) fn(&c, block_tables + job.seq * table_stride, q, q_ctx, job.count, heads, job.heads, window, scale, o);
        else memset(o, 0, sizeof(float) * UNITS * QUERIES * head_dim);
        for (int u = 0; u < job.heads; u++)
            for (int k = 0; k < job.count; k++) {
                const int64_t head = (int64_t)(job.kv_head + u) * group + in_group[k];
                const int64_t at = (start + row[k]) * row_len + head * head_dim;
                const float *src = o + (u * QUERIES + k) * head_dim;
                for (int d = 0; d < head_dim; d++) store(out, at + d, src[d], query_bf16);
            }
    }
#if HAVE_AMX
    if (amx) _tile_release();
#endif
    }
    free(jobs);
    return 0;
}

// Write token t's K and V ([num_tokens, num_kv_heads, head_dim] rows `key_stride` and
// `value_stride` elements apart, float32 or bfloat16) into slot slots[t] of `layer`; negative
// slots are skipped. Every slot is checked before anything is written.
int reshape_and_cache(const void *key, int64_t key_stride, const void *value, int64_t value_stride, int src_bf16,
                      void *cache, int cache_bf16, int64_t num_blocks, int num_layers, int layer, int block_size,
                      int num_kv_heads, int head_dim, const int64_t *slots, int64_t num_tokens) {
    const CacheLayer c = cache_layer(cache, cache_bf16, num_blocks, num_layers, layer, block_size, num_kv_heads,
                                     head_dim);
    for (int64_t t = 0; t < num_tokens; t++)
        if (slots[t] >= num_blocks * block_size) return ERR_BLOCK;
    const int64_t width = c.slot_stride;
    for (int64_t t = 0; t < num_tokens; t++) {
        if (slots[t] < 0) continue;
        const int64_t at = slots[t] / block_size * c.block_stride + slots[t] % block_size * c.slot_stride;
        void *k_dst = (void *)c.base, *v_dst = (void *)c.base;
        const void *k_src = key, *v_src = value;
        if (src_bf16 == cache_bf16) {
            const size_t elem = cache_bf16 ? 2 : 4;
            memcpy((char *)k_dst + at * elem, (const char *)k_src + t * key_stride * elem, width * elem);
            memcpy((char *)v_dst + (at + c.kv_stride) * elem, (const char *)v_src + t * value_stride * elem,
                   width * elem);
        } else if (cache_bf16) {  // float32 rows into a bfloat16 cache
            for (int64_t i = 0; i < width; i++) {
                store(k_dst, at + i, load(k_src, t * key_stride + i, 0), 1);
                store(v_dst, at + c.kv_stride + i, load(v_src, t * value_stride + i, 0), 1);
            }
        } else {  // bfloat16 rows into a float32 cache
            for (int64_t i = 0; i < width; i++) {
                store(k_dst, at + i, load(k_src, t * key_stride + i, 1), 0);
                store(v_dst, at + c.kv_stride + i, load(v_src, t * value_stride + i, 1), 0);
            }
        }
    }
    return 0;
}

// x * cos + rotate_half(x) * sin for one head (rotate_half(x) = [-x2, x1], the sign kept in
// `sin`), rounded as the model's torch ops round: each product, then the sum, to the row's type.
// `bf16` is a constant after inlining, so each type gets loops the compiler can vectorize.
static inline __attribute__((always_inline)) void rotate_head(void *x, int64_t at, const void *cos, const void *sin,
                                                             int64_t cs_at, int head_dim, const int bf16,
                                                             float *scratch) {
    const int half = head_dim / 2;
    for (int part = 0; part < 2; part++) {  // the first half pairs with the second, and back
        const int64_t from = part ? -half : half;
        for (int i = part * half; i < (part + 1) * half; i++) {
            float straight = load(x, at + i, bf16) * load(cos, cs_at + i, bf16);
            float swapped = load(x, at + i + from, bf16) * load(sin, cs_at + i, bf16);
            if (bf16) {
                straight = bf16_to_float(float_to_bf16(straight));
                swapped = bf16_to_float(float_to_bf16(swapped));
            }
            scratch[i] = straight + swapped;
        }
    }
    for (int i = 0; i < head_dim; i++) store(x, at + i, scratch[i], bf16);
}

// The attention input of one layer: rotates the query and key heads of each token's fused
// q/k/v row ([num_tokens, (num_heads + 2 * num_kv_heads) * head_dim], rows `row_stride`
// elements apart) in place by cos/sin ([num_tokens, head_dim], the row type, contiguous), then
// writes the token's K and V heads into slot slots[t] as reshape_and_cache does. One call
// where torch takes four operations and the cache write a fifth. Every slot is checked first:
// on ERR_BLOCK nothing is changed.
// No fused multiply-add here: GCC would contract the products into the sum across statements.
__attribute__((optimize("fp-contract=off"))) int rotary_and_cache(void *qkv, int64_t row_stride, int bf16, int64_t num_tokens, int num_heads, int num_kv_heads,
                     int head_dim, const void *cos, const void *sin, void *cache, int cache_bf16, int64_t num_blocks,
                     int num_layers, int layer, int block_size, const int64_t *slots) {
    for (int64_t t = 0; t < num_tokens; t++)
        if (slots[t] >= num_blocks * block_size) return ERR_BLOCK;
    float *scratch = malloc(sizeof(float) * head_dim);
    if (!scratch) return ERR_MEMORY;
    for (int64_t t = 0; t < num_tokens; t++)
        for (int h = 0; h < num_heads + num_kv_heads; h++) {
            const int64_t at = t * row_stride + (int64_t)h * head_dim;
            if (bf16) rotate_head(qkv, at, cos, sin, t * head_dim, head_dim, 1, scratch);
            else rotate_head(qkv, at, cos, sin, t * head_dim, head_dim, 0, scratch);
        }
    free(scratch);
    const size_t elem = bf16 ? 2 : 4;
    const char *key = (const char *)qkv + (int64_t)num_heads * head_dim * elem;
    return reshape_and_cache(key, row_stride, key + (int64_t)num_kv_heads * head_dim * elem, row_stride, bf16, cache,
                             cache_bf16, num_blocks, num_layers, layer, block_size, num_kv_heads, head_dim, slots,
                             num_tokens);
}

// -- the elementwise steps between a layer's matrix products ------------------------------------
// Each one C call where torch takes three to six operations: on a CPU decoding one sequence the
// matrix products stream the weights through the caches, and every small operation after them
// starts cold, so their number, not their arithmetic, sets their cost.

// h[r] += delta[r] (when delta is not NULL; each sum rounded to the row type), then
// out[r] = weight * round(h[r] / sqrt(mean(h[r]^2) + eps)): transformers' residual add and
// LlamaRMSNorm (the norm in float32, rounded to the row type, then scaled and rounded again).
// h, delta, out: [rows, width] contiguous; weight: [width]; all float32 or all bfloat16.
int add_rms_norm(void *h, const void *delta, const void *weight, void *out, int64_t rows, int64_t width, float eps,
                 int bf16, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1 && rows >= 32)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t at = r * width;
        vfloat squares = splat(0.0f);
        float tail = 0.0f;
        int64_t i = 0;
        for (; i + LANES <= width; i += LANES) {
            vfloat x = load_vec(h, at + i, bf16);
            if (delta) {
                x += load_vec(delta, at + i, bf16);
                if (bf16) x = round_bf16_vec(x);
                store_vec(h, at + i, x, bf16);
            }
            squares += x * x;
        }
        for (; i < width; i++) {
            float x = load(h, at + i, bf16);
            if (delta) {
                store(h, at + i, x + load(delta, at + i, bf16), bf16);
                x = load(h, at + i, bf16);
            }
            tail += x * x;
        }
        const float inv = 1.0f / sqrtf((sum_lanes(squares) + tail) / (float)width + eps);
        for (i = 0; i + LANES <= width; i += LANES) {
            vfloat y = load_vec(h, at + i, bf16) * inv;
            if (bf16) y = round_bf16_vec(y);
            store_vec(out, at + i, load_vec(weight, i, bf16) * y, bf16);
        }
        for (; i < width; i++) {
            float y = load(h, at + i, bf16) * inv;
            if (bf16) y = bf16_to_float(float_to_bf16(y));
            store(out, at + i, load(weight, i, bf16) * y, bf16);
        }
    }
    return 0;
}

// out = silu(gate) * up for gate_up [rows, 2 * width] (gate the first half of each row, up the
// second), out [rows, width] contiguous; silu rounded to the row type, then the product.
// silu(g) = g * sigmoid(g), sigmoid from e^-|g| so that the exponent never overflows.
int silu_and_mul(const void *gate_up, void *out, int64_t rows, int64_t width, int bf16, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1 && rows >= 32)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t in = r * 2 * width, at = r * width;
        int64_t i = 0;
        for (; i + LANES <= width; i += LANES) {
            const vfloat g = load_vec(gate_up, in + i, bf16), u = load_vec(gate_up, in + width + i, bf16);
            const vint negative = g < splat(0.0f);
            const vfloat e = exp_nonpositive(blend(negative, g, -g));
            vfloat silu = g * blend(negative, e, splat(1.0f)) / (splat(1.0f) + e);
            if (bf16) silu = round_bf16_vec(silu);
            store_vec(out, at + i, silu * u, bf16);
        }
        for (; i < width; i++) {
            const float g = load(gate_up, in + i, bf16), e = expf(-fabsf(g));
            float silu = g * (g < 0.0f ? e : 1.0f) / (1.0f + e);
            if (bf16) silu = bf16_to_float(float_to_bf16(silu));
            store(out, at + i, silu * load(gate_up, in + width + i, bf16), bf16);
        }
    }
    return 0;
}

// out = gelu(gate) * up with GELU's tanh form, gelu(g) = g / 2 * (1 + tanh(sqrt(2 / pi) * (g +
// 0.044715 g^3))) (Gemma's `gelu_pytorch_tanh`), for gate_up [rows, 2 * width] as silu_and_mul
// takes it; gelu rounded to the row type, then the product. tanh(u) = sign(u) (1 - e) / (1 + e)
// with e = e^-2|u| <= 1, so the exponent never overflows.
int gelu_tanh_and_mul(const void *gate_up, void *out, int64_t rows, int64_t width, int bf16, int num_threads) {
    const float c = 0.7978845608028654f, cubic = 0.044715f;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1 && rows >= 32)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t in = r * 2 * width, at = r * width;
        int64_t i = 0;
        for (; i + LANES <= width; i += LANES) {
            const vfloat g = load_vec(gate_up, in + i, bf16), u = load_vec(gate_up, in + width + i, bf16);
            const vfloat a = c * (g + cubic * g * g * g);
            const vint negative = a < splat(0.0f);
            const vfloat e = exp_nonpositive(-2.0f * blend(negative, -a, a));
            const vfloat t = (splat(1.0f) - e) / (splat(1.0f) + e);
            vfloat gelu = 0.5f * g * (splat(1.0f) + blend(negative, -t, t));
            if (bf16) gelu = round_bf16_vec(gelu);
            store_vec(out, at + i, gelu * u, bf16);
        }
        for (; i < width; i++) {
            const float g = load(gate_up, in + i, bf16), a = c * (g + cubic * g * g * g);
            const float e = expf(-2.0f * fabsf(a)), t = (1.0f - e) / (1.0f + e);
            float gelu = 0.5f * g * (1.0f + (a < 0.0f ? -t : t));
            if (bf16) gelu = bf16_to_float(float_to_bf16(gelu));
            store(out, at + i, gelu * load(gate_up, in + width + i, bf16), bf16);
        }
    }
    return 0;
}

// For each row of float32 logits [rows, vocab] (rows `row_stride` apart): the index of its
// first maximum (of its first NaN, if any, as torch.max) and its log-sum-exp (torch.logsumexp:
// max + log(sum(exp(x - max))), +inf, -inf or NaN where the row holds them). Two passes over a
// row, which stays in L2, where torch takes five operations over the whole batch.
int greedy_and_logsumexp(const float *logits, int64_t row_stride, int64_t rows, int64_t vocab, int64_t *index,
                         float *log_total, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1 && rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *x = logits + r * row_stride;
        // Pass 1: the maximum, 16 lanes at a time, then its first index.
        vfloat top = splat(-INFINITY);
        vint nan_seen = (vint){0};
        int64_t i = 0;
        for (; i + LANES <= vocab; i += LANES) {
            const vfloat v = load_vec(x, i, 0);
            nan_seen |= v != v;
            top = blend(v > top, v, top);
        }
        float best = max_lanes(top);
        int has_nan = 0;
        for (int l = 0; l < LANES; l++) has_nan |= nan_seen[l] != 0;
        for (; i < vocab; i++) {
            has_nan |= x[i] != x[i];
            best = x[i] > best ? x[i] : best;
        }
        int64_t at = 0;
        if (has_nan) {
            while (x[at] == x[at]) at++;
            best = x[at];
        } else {
            while (at < vocab - 1 && x[at] != best) at++;
        }
        index[r] = at;
        if (has_nan || isinf(best)) {  // NaN, +inf, or a row of -inf
            log_total[r] = best;
            continue;
        }
        // Pass 2: the sum of exp(x - max), every exponent <= 0.
        vfloat sum = splat(0.0f);
        float tail = 0.0f;
        for (i = 0; i + LANES <= vocab; i += LANES) sum += exp_nonpositive(load_vec(x, i, 0) - best);
        for (; i < vocab; i++) tail += expf(x[i] - best);
        log_total[r] = best + logf(sum_lanes(sum) + tail);
    }
    return 0;
}
