// The functions one CPU source calls in another: every cross-file declaration in one place, so
// that no .c file declares another's functions (and no two declarations can drift apart). Each
// .c file includes this header, and the compiler checks every definition against it.
#pragma once
#include <stdint.h>

// cpu_kernels.c: attention and the cache write, the steps between a layer's matrix products.
int paged_attention(const void *query, int64_t query_stride, int query_bf16, int64_t num_rows, void *out,
                    const void *cache, int cache_bf16, int64_t num_blocks, int num_layers, int layer,
                    int block_size, int num_kv_heads, int head_dim, int num_heads, const int32_t *block_tables,
                    int64_t table_stride, int64_t table_width, const int32_t *query_start_loc,
                    const int32_t *context_lens, int num_seqs, int64_t max_rows, float scale, int window,
                    int num_threads);
int rotary_and_cache(void *qkv, int64_t row_stride, int bf16, int64_t num_tokens, int num_heads, int num_kv_heads,
                     int head_dim, const void *cos, const void *sin, void *cache, int cache_bf16, int64_t num_blocks,
                     int num_layers, int layer, int block_size, const int64_t *slots);
int add_rms_norm(void *h, const void *delta, const void *weight, void *out, int64_t rows, int64_t width, float eps,
                 int bf16, int num_threads);
int silu_and_mul(const void *gate_up, void *out, int64_t rows, int64_t width, int bf16, int num_threads);
int gelu_tanh_and_mul(const void *gate_up, void *out, int64_t rows, int64_t width, int bf16, int num_threads);

// cpu_int4.c: float32 rows through packed 4-bit weights (cpu_int4.h), float32 FMAs.
int int4_linear(const float *x, int64_t x_stride, int64_t m, int64_t x_cols, const uint8_t *packed, int half,
                int64_t n_out, int64_t w_cols, float *out, int num_threads);

// cpu_vnni.c: the same products in exact integer sums (VNNI, AMX from a few rows).
int vnni_supported(void);
void vnni_enable(int on);
int int4_linear_vnni(const float *x, int64_t x_stride, int64_t m, int64_t x_cols, const uint8_t *packed, int half,
                     int64_t n_out, int64_t w_cols, float *out, int num_threads);

// cpu_q8.c: float32 rows through 8-bit codes (Q8_0) in exact integer sums (VNNI).
int q8_linear_supported(void);
int q8_linear(const float *x, int64_t x_stride, int64_t m, int64_t k, const uint8_t *packed, int64_t n_out,
              float *out, int num_threads);

// cpu_amx.c: AMX's state, and bfloat16 rows through packed 4-bit weights on its tiles.
int amx_supported(void);
void amx_enable(int on);
void amx_configure_tiles(void);  // every tile 16 rows of 64 bytes
int int4_linear_amx(const uint16_t *x, int64_t x_stride, int64_t m, int64_t x_cols, const uint8_t *packed,
                    int half, int64_t n_out, int64_t w_cols, uint16_t *out, int num_threads);

// cpu_bf16.c: few bfloat16 rows through bfloat16 weights with AVX512-BF16 dot products.
int bf16_linear_supported(void);
int bf16_linear(const uint16_t *x, int64_t x_stride, int rows, int64_t k, const uint16_t *w, int64_t n,
                const uint16_t *bias, uint16_t *out, int num_threads);
// ... and bfloat16 rows through packed 4-bit weights where AMX is missing.
int int4_bf16_supported(void);
int int4_linear_bf16(const uint16_t *x, int64_t x_stride, int64_t m, int64_t x_cols, const uint8_t *packed,
                     int half, int64_t n_out, int64_t w_cols, uint16_t *out, int num_threads);

// cpu_f32.c: few float32 rows through float32 weights, each row's sums in one order.
int f32_linear_supported(void);
int f32_linear(const float *x, int64_t x_stride, int rows, int64_t k, const float *w, int64_t n, const float *bias,
               float *out, int num_threads);

// cpu_q6k.c: float32 rows through GGUF's Q6_K blocks, read in place.
int q6k_linear(const float *x, int64_t x_stride, int64_t m, int64_t k, const uint8_t *blocks, int64_t n,
               float *out, int num_threads);
int q6k_dequantize(const uint8_t *blocks, int64_t n, int64_t k, float *out);
