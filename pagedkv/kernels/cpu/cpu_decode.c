// A decode batch's decoder layers in one call: the kernels pagedkv/runtime/models/llama.py calls between
// its matrix products (cpu_kernels.c), the matrix products themselves (the BLAS sgemm that
// F.linear calls for few rows, or cpu_f32.c where the model takes it instead; cpu_int4.c and
// cpu_vnni.c through it, cpu_amx.c, cpu_bf16.c's two), in the loop's order, on the same buffers'
// contents, so every output bit equals the loop's.
//
// Why: decoding one sequence, each matrix product streams its weights through the caches, and
// the Python between the products (about 150 calls a step, their argument checks and tensor
// allocations) then runs cold. That cost 6 ms of a 45 ms float32 step of SmolLM2-135M, and 3
// of a 13.5 ms quantized one. Here it is one ctypes call a step.
#include <stdint.h>
#include <stddef.h>

#include "cpu_api.h"  // the kernels this composes

// The Fortran BLAS sgemm (column-major; no hidden string lengths: MKL and OpenBLAS take none).
typedef void (*Sgemm)(const char *transa, const char *transb, const int *m, const int *n, const int *k,
                      const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
                      const float *beta, float *c, const int *ldc);

enum { LINEAR_F32 = 0, LINEAR_INT4 = 1, LINEAR_BF16 = 2, LINEAR_Q6K = 3, LINEAR_INT4_DOTS = 4, LINEAR_Q8 = 5 };

// One weight matrix: out[rows, n] = x[rows, in] @ W^T.
typedef struct {
    int32_t kind;        // LINEAR_F32 (sgemm, or f32_linear without one; float32 rows), LINEAR_INT4 (cpu_int4.c's
                         // float32 rows, or cpu_amx.c's bfloat16 ones), LINEAR_INT4_DOTS (bfloat16 rows by
                         // cpu_bf16.c's 4-bit kernel, where AMX is missing), LINEAR_BF16, LINEAR_Q6K
                         // (cpu_q6k.c's float32 rows), LINEAR_Q8 (cpu_q8.c's float32 rows)
    int32_t half;        // LINEAR_INT4, LINEAR_INT4_DOTS: scales and offsets in float16
    const void *data;    // [n, columns] row-major, cpu_int4.c's or cpu_q8.c's packed tiles, or GGUF's Q6_K blocks
    int64_t n, columns;  // output features; weight columns (LINEAR_INT4: twice the input's for Q8_0's split codes)
} Linear;

typedef struct {
    Linear qkv, o, gate_up, down;
    const void *post_norm;  // post-attention RMS norm weight
    const void *next_norm;  // the next layer's input norm weight; the final norm's after the last layer
    int32_t window;         // sliding-window attention over this many positions; 0: all of them
    int32_t rope;           // the rotary table it takes: 0 (cos, sin) or 1 (cos_local, sin_local)
    // Per-head RMS norms of q and k before the rotary embedding (Qwen3, Gemma 3), and norms of
    // the attention's and the MLP's outputs before their residual adds (Gemma 3); NULL: none.
    const void *q_norm, *k_norm, *attn_out_norm, *mlp_out_norm;
} Layer;

typedef struct {
    int64_t rows;  // sequences, one new token each (LINEAR_F32 layers: 1 .. 3, or 8 by f32_linear;
                   // LINEAR_BF16 ones: 1 .. 4)
    int32_t hidden, num_heads, num_kv_heads, head_dim, intermediate;
    int32_t bf16;  // rows and weights in bfloat16 (else float32)
    float eps, scale;
    int32_t num_threads;
    const void *cos, *sin;  // [rows, head_dim], sin's first half negated
    void *cache;
    int32_t cache_bf16, num_layers, block_size;
    int64_t num_blocks;
    const int64_t *slots;
    const int32_t *block_tables;
    int64_t table_stride, table_width;
    const int32_t *context_lens;
    Sgemm sgemm;  // NULL: float32 matrices by f32_linear
    // Buffers, rows of the row type: qkv [rows, (heads + 2 kv heads) * head_dim], attention
    // output [rows, heads * head_dim], gate_up [rows, 2 * intermediate], act [rows,
    // intermediate], delta [rows, hidden].
    void *qkv, *attn, *gate_up, *act, *delta;
    const void *cos_local, *sin_local;  // the local layers' rotary table (Gemma 3), where layers take it
    int32_t gelu;                        // the MLP's gate is GELU's tanh form, else SiLU
} DecodeStep;

static int linear(const DecodeStep *s, const Linear *w, const void *x, int64_t x_cols, void *out) {
    switch (w->kind) {
    case LINEAR_F32: {
        if (!s->sgemm)  // the model's own few-row loops (cpu_f32.c), where it takes them over BLAS
            return f32_linear(x, x_cols, (int)s->rows, w->columns, w->data, w->n, NULL, out, s->num_threads);
        // Row-major out[rows, n] = x W^T is column-major out^T = W^T' x^T: F.linear's own call.
        const int n = (int)w->n, m = (int)s->rows, k = (int)w->columns;
        const float one = 1.0f, zero = 0.0f;
        s->sgemm("T", "N", &n, &m, &k, &one, w->data, &k, x, &k, &zero, out, &n);
        return 0;
    }
    case LINEAR_INT4:
        if (s->bf16)
            return int4_linear_amx(x, x_cols, s->rows, x_cols, w->data, w->half, w->n, w->columns, out,
                                   s->num_threads);
        return int4_linear(x, x_cols, s->rows, x_cols, w->data, w->half, w->n, w->columns, out, s->num_threads);
    case LINEAR_INT4_DOTS:
        return int4_linear_bf16(x, x_cols, s->rows, x_cols, w->data, w->half, w->n, w->columns, out, s->num_threads);
    case LINEAR_BF16:
        return bf16_linear(x, x_cols, (int)s->rows, w->columns, w->data, w->n, NULL, out, s->num_threads);
    case LINEAR_Q6K:
        return q6k_linear(x, x_cols, s->rows, w->columns, w->data, w->n, out, s->num_threads);
    case LINEAR_Q8:
        return q8_linear(x, x_cols, s->rows, w->columns, w->data, w->n, out, s->num_threads);
    }
    return -4;
}

// h: the residual stream [rows, hidden], updated in place; x: layer 0's normalised input on
// entry, the final norm's output on return. Returns 0 or the first failing kernel's error.
int decode_layers(const DecodeStep *s, const Layer *layers, int num_layers, void *h, void *x) {
    const int64_t rows = s->rows, q_len = (int64_t)s->num_heads * s->head_dim;
    const int64_t qkv_len = q_len + 2 * (int64_t)s->num_kv_heads * s->head_dim;
    int rc = 0;
    for (int i = 0; i < num_layers && !rc; i++) {
        const Layer *l = &layers[i];
        if ((rc = linear(s, &l->qkv, x, s->hidden, s->qkv))) break;
        if (l->q_norm)  // each head of q, then of k, normalised in place (its rows are head_dim wide)
            for (int64_t r = 0; r < rows; r++) {
                char *row = (char *)s->qkv + r * qkv_len * (s->bf16 ? 2 : 4);
                add_rms_norm(row, NULL, l->q_norm, row, s->num_heads, s->head_dim, s->eps, s->bf16, 1);
                char *k = row + q_len * (s->bf16 ? 2 : 4);
                add_rms_norm(k, NULL, l->k_norm, k, s->num_kv_heads, s->head_dim, s->eps, s->bf16, 1);
            }
        if ((rc = rotary_and_cache(s->qkv, qkv_len, s->bf16, rows, s->num_heads, s->num_kv_heads, s->head_dim,
                                   l->rope ? s->cos_local : s->cos, l->rope ? s->sin_local : s->sin, s->cache,
                                   s->cache_bf16, s->num_blocks, s->num_layers, i, s->block_size, s->slots)))
            break;
        if ((rc = paged_attention(s->qkv, qkv_len, s->bf16, rows, s->attn, s->cache, s->cache_bf16, s->num_blocks,
                                  s->num_layers, i, s->block_size, s->num_kv_heads, s->head_dim, s->num_heads,
                                  s->block_tables, s->table_stride, s->table_width, NULL, s->context_lens,
                                  (int)rows, 1, s->scale, l->window, s->num_threads)))
            break;
        if ((rc = linear(s, &l->o, s->attn, q_len, s->delta))) break;
        if (l->attn_out_norm)
            add_rms_norm(s->delta, NULL, l->attn_out_norm, s->delta, rows, s->hidden, s->eps, s->bf16, s->num_threads);
        add_rms_norm(h, s->delta, l->post_norm, x, rows, s->hidden, s->eps, s->bf16, s->num_threads);
        if ((rc = linear(s, &l->gate_up, x, s->hidden, s->gate_up))) break;
        if (s->gelu) gelu_tanh_and_mul(s->gate_up, s->act, rows, s->intermediate, s->bf16, s->num_threads);
        else silu_and_mul(s->gate_up, s->act, rows, s->intermediate, s->bf16, s->num_threads);
        if ((rc = linear(s, &l->down, s->act, s->intermediate, s->delta))) break;
        if (l->mlp_out_norm)
            add_rms_norm(s->delta, NULL, l->mlp_out_norm, s->delta, rows, s->hidden, s->eps, s->bf16, s->num_threads);
        add_rms_norm(h, s->delta, l->next_norm, x, rows, s->hidden, s->eps, s->bf16, s->num_threads);
    }
    return rc;
}
