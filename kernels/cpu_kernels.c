// CPU kernels for the paged KV cache: decode attention and the cache write.
//
// The torch reference (kernels/reference.py) gathers every K/V block a decode batch reads
// into a fresh tensor, converts it to float32 and runs two batched matmuls around a softmax;
// on a CPU that moves the K/V several times and, from a few dozen sequences on, costs as much
// as the model's matrices. These kernels read each K/V row once, in place, through the block
// tables (as vLLM's CPU backend does). kernels/cpu_ops.py builds them with gcc at first use;
// the reference stays the oracle they are tested against.
//
// Cache layout: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], float32 or
// bfloat16. Activations (queries, new K/V, outputs): float32 or bfloat16 rows, one per token,
// with a token stride; the heads of a token contiguous. Arithmetic in float32.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ERR_BLOCK -1   // a block table entry or a slot outside the cache
#define ERR_MEMORY -2  // no memory for the score buffers
#define ERR_TABLE -3   // a context longer than its block table

static inline float bf16_to_float(uint16_t x) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)x << 16};
    return v.f;
}

// Round to nearest even, as torch converts float32 to bfloat16; NaN stays a quiet NaN.
static inline uint16_t float_to_bf16(float f) {
    union { float f; uint32_t u; } v = {.f = f};
    if (isnan(f)) return 0x7FC0;
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
}

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

// q . row, q float32 [n], row float32 or bfloat16 [n] at element `at` of `base`.
static inline __attribute__((always_inline)) float dot(const float *q, const void *base, int64_t at, int n,
                                                       const int bf16) {
    if (n % LANES == 0) {
        vfloat a = {0}, b = {0};
        int d = 0;
        for (; d + 2 * LANES <= n; d += 2 * LANES) {
            a += load_vec(q, d, 0) * load_vec(base, at + d, bf16);
            b += load_vec(q, d + LANES, 0) * load_vec(base, at + d + LANES, bf16);
        }
        if (d < n) a += load_vec(q, d, 0) * load_vec(base, at + d, bf16);
        return sum_lanes(a + b);
    }
    float s = 0.0f;
    for (int d = 0; d < n; d++) s += q[d] * load(base, at + d, bf16);
    return s;
}

// out += p * row, out float32 [n], row as in `dot`.
static inline __attribute__((always_inline)) void axpy(float *out, float p, const void *base, int64_t at, int n,
                                                       const int bf16) {
    if (n % LANES == 0) {
        for (int d = 0; d < n; d += LANES) {
            vfloat o = load_vec(out, d, 0) + p * load_vec(base, at + d, bf16);
            memcpy(out + d, &o, sizeof o);
        }
        return;
    }
    for (int d = 0; d < n; d++) out[d] += p * load(base, at + d, bf16);
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

// Ask for one token's rows (every head) of another block ahead of use: the blocks of a
// sequence lie anywhere in the cache, where the hardware prefetchers cannot guess them.
static inline __attribute__((always_inline)) void prefetch_slot(const CacheLayer *c, const int bf16, int64_t at) {
    const char *p = (const char *)c->base + at * (bf16 ? 2 : 4);
    for (int64_t i = 0; i < c->slot_stride * (bf16 ? 2 : 4); i += 64) __builtin_prefetch(p + i);
}

// Attention of one sequence, every head, over its first `ctx` tokens (block table `table`).
// q: float32 [num_heads, head_dim], query head h reading KV head h / group; scores:
// [num_heads, ctx] scratch; out: float32 [num_heads, head_dim]. A token's K (and V) rows of
// all heads are contiguous in the cache, so each block is read front to back.
static inline __attribute__((always_inline)) int attend(const CacheLayer *c, const int bf16, const int32_t *table,
                                                        int64_t table_width, int ctx, const float *q,
                                                        int num_heads, int group, float scale, float *scores,
                                                        float *out) {
    const int d_len = c->head_dim, bs = c->block_size;
    if ((ctx + bs - 1) / bs > table_width) return ERR_TABLE;
    for (int t0 = 0; t0 < ctx; t0 += bs) {
        const int64_t block = table[t0 / bs];
        if (block < 0 || block >= c->num_blocks) return ERR_BLOCK;
        const int n = ctx - t0 < bs ? ctx - t0 : bs;
        const int64_t next = t0 + bs < ctx ? table[t0 / bs + 1] : block;
        for (int o = 0; o < n; o++) {
            const int64_t k_at = block * c->block_stride + o * c->slot_stride;
            prefetch_slot(c, bf16, next * c->block_stride + o * c->slot_stride);
            for (int h = 0; h < num_heads; h++) {
                const float s = dot(q + (int64_t)h * d_len, c->base, k_at + (int64_t)(h / group) * d_len, d_len, bf16);
                scores[(int64_t)h * ctx + t0 + o] = s * scale;
            }
        }
    }
    for (int h = 0; h < num_heads; h++) {
        float *s = scores + (int64_t)h * ctx, top = -INFINITY, sum = 0.0f;
        for (int t = 0; t < ctx; t++) top = s[t] > top ? s[t] : top;
        for (int t = 0; t < ctx; t++) {
            s[t] = expf(s[t] - top);
            sum += s[t];
        }
        const float inv = 1.0f / sum;
        for (int t = 0; t < ctx; t++) s[t] *= inv;
    }
    memset(out, 0, sizeof(float) * num_heads * d_len);
    for (int t0 = 0; t0 < ctx; t0 += bs) {
        const int64_t block = table[t0 / bs];
        const int n = ctx - t0 < bs ? ctx - t0 : bs;
        const int64_t next = t0 + bs < ctx ? table[t0 / bs + 1] : block;
        for (int o = 0; o < n; o++) {
            const int64_t v_at = block * c->block_stride + c->kv_stride + o * c->slot_stride;
            prefetch_slot(c, bf16, next * c->block_stride + c->kv_stride + o * c->slot_stride);
            for (int h = 0; h < num_heads; h++) {
                const float p = scores[(int64_t)h * ctx + t0 + o];
                axpy(out + (int64_t)h * d_len, p, c->base, v_at + (int64_t)(h / group) * d_len, d_len, bf16);
            }
        }
    }
    return 0;
}

// Decode attention: one query token per sequence. query: [num_seqs, num_heads, head_dim]
// rows `query_stride` elements apart; out: contiguous [num_seqs, num_heads, head_dim].
// block_tables: int32 rows of `table_width` entries, `table_stride` apart; context_lens:
// int32 [num_seqs]. A sequence with no context gets zeros. Returns 0, or ERR_BLOCK /
// ERR_MEMORY / ERR_TABLE (out is then unspecified).
int paged_attention_decode(const void *query, int64_t query_stride, int query_bf16, void *out,
                           const void *cache, int cache_bf16, int64_t num_blocks, int num_layers, int layer,
                           int block_size, int num_kv_heads, int head_dim, int num_heads,
                           const int32_t *block_tables, int64_t table_stride, int64_t table_width,
                           const int32_t *context_lens, int num_seqs, float scale, int num_threads) {
    const CacheLayer c = cache_layer(cache, cache_bf16, num_blocks, num_layers, layer, block_size, num_kv_heads,
                                     head_dim);
    const int group = num_heads / num_kv_heads;
    const int64_t row = (int64_t)num_heads * head_dim;
    int max_ctx = 0;
    for (int b = 0; b < num_seqs; b++) max_ctx = context_lens[b] > max_ctx ? context_lens[b] : max_ctx;
    int error = 0;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && num_seqs > 1)
    {
        float *q = malloc(sizeof(float) * row * 2 + sizeof(float) * num_heads * (size_t)(max_ctx + 1));
        float *acc = q ? q + row : NULL, *scores = q ? acc + row : NULL;
        if (!q) {
#pragma omp atomic write
            error = ERR_MEMORY;
        }
#pragma omp for schedule(dynamic, 1)
        for (int b = 0; b < num_seqs; b++) {
            int failed;
#pragma omp atomic read
            failed = error;
            if (failed) continue;
            const int ctx = context_lens[b];
            for (int64_t i = 0; i < row; i++) q[i] = load(query, b * query_stride + i, query_bf16);
            int rc = 0;
            const int32_t *table = block_tables + b * table_stride;
            if (ctx <= 0) memset(acc, 0, sizeof(float) * row);
            else if (cache_bf16) rc = attend(&c, 1, table, table_width, ctx, q, num_heads, group, scale, scores, acc);
            else rc = attend(&c, 0, table, table_width, ctx, q, num_heads, group, scale, scores, acc);
            if (rc) {
#pragma omp atomic write
                error = rc;
                continue;
            }
            for (int64_t i = 0; i < row; i++) store(out, b * row + i, acc[i], query_bf16);
        }
        free(q);
    }
    return error;
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
