// Paged attention over the block-major KV cache
// [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim].
//
// The scalar kernel: decode and (chunked) prefill for fp32, and for every dtype on GPUs
// older than sm_80; fp16/bf16 on sm_80+ run paged_attention_mma.cu. A CTA owns up to ROWS "rows": QT
// consecutive query tokens of one sequence times GROUP query heads that share one KV
// head, so every K/V vector it loads is used ROWS times. Its 4 warps walk the keys of
// one partition; inside a warp, sub-groups of LPT lanes each take one key (a lane holds
// VEC = D / LPT dims, read with one 16-byte access where the shapes allow it), and the
// softmax is computed online in fp32 (base 2: the scale carries log2(e)).
//
// Split-K: with gridDim.z > 1 every CTA handles one partition of part_size keys and
// writes an unnormalised partial (max, sum, acc); paged_attention_reduce combines them.
//
// Sliding window: with window > 0 a row sees only the last `window` keys up to its own; the
// keys (and blocks) before the window of a segment's first row are never read.
#include "common.cuh"

#define PAGEDKV_ATTN_WARPS 4
#define PAGEDKV_ATTN_THREADS (PAGEDKV_ATTN_WARPS * 32)

template <typename T, int D, int LPT, int ROWS, int GROUP>
__global__ void __launch_bounds__(PAGEDKV_ATTN_THREADS) paged_attention_kernel(
    T* __restrict__ out,                      // [num_rows, Hq, D], when not split
    float* __restrict__ part_acc,             // [num_rows, Hq, P, D], when split
    float* __restrict__ part_ml,              // [num_rows, Hq, P, 2] (max, sum), when split
    const T* __restrict__ q, long long q_stride_t, long long q_stride_h,
    const T* __restrict__ cache, long long stride_block, long long layer_offset,
    long long stride_kv, int block_size, int num_kv_heads,
    const int* __restrict__ block_tables, long long bt_stride,
    const int* __restrict__ query_start_loc,  // [S + 1]; null: row r is sequence r (decode)
    const int* __restrict__ context_lens,     // [S]
    int num_rows, int num_seqs, int num_q_heads, int part_size, float scale_log2, int window) {
    constexpr int VEC = D / LPT;              // dims per lane
    constexpr int TPW = 32 / LPT;             // keys per warp per step
    constexpr int QT = ROWS / GROUP;          // query tokens per CTA
    constexpr int U = 2;                      // keys per sub-group per step (loads in flight)
    constexpr int STEP = PAGEDKV_ATTN_WARPS * TPW * U;
    static_assert(D % LPT == 0 && 32 % LPT == 0 && ROWS % GROUP == 0, "bad tiling");

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int sub = lane / LPT, slot = lane % LPT;
    const int tile_begin = blockIdx.x * QT;
    const int tile_end = min(tile_begin + QT, num_rows);
    const int head0 = blockIdx.y * GROUP;
    const int kv_head = head0 / (num_q_heads / num_kv_heads);
    const int part = blockIdx.z, num_parts = gridDim.z;
    const bool split = part_acc != nullptr;

    __shared__ float s_m[PAGEDKV_ATTN_WARPS][ROWS];
    __shared__ float s_l[PAGEDKV_ATTN_WARPS][ROWS];
    __shared__ float s_acc[PAGEDKV_ATTN_WARPS][ROWS][D];

    // A tile may span sequences (short or decode sequences): handle them one by one.
    int row0 = tile_begin;
    while (row0 < tile_end) {
        int seq = row0, first_row = row0, q_len = 1;
        if (query_start_loc != nullptr) {
            seq = pagedkv_find_seq(query_start_loc, num_seqs, row0);
            first_row = query_start_loc[seq];
            q_len = query_start_loc[seq + 1] - first_row;
        }
        const int rows_end = min(tile_end, first_row + q_len);
        const int ctx = context_lens[seq];

        // Row r = (query token r / GROUP, head r % GROUP) sees keys [key_start[r], key_limit[r]).
        int key_limit[ROWS], key_start[ROWS];
        int max_limit = 0;
        float qv[ROWS][VEC];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int row = row0 + r / GROUP;
            key_limit[r] = row < rows_end ? ctx - q_len + (row - first_row) + 1 : 0;
            key_start[r] = window > 0 ? max(0, key_limit[r] - window) : 0;
            max_limit = max(max_limit, key_limit[r]);
            if (row < rows_end) {
                const T* qp = q + row * q_stride_t + (head0 + r % GROUP) * q_stride_h + slot * VEC;
#pragma unroll
                for (int j = 0; j < VEC; ++j) qv[r][j] = to_float(qp[j]) * scale_log2;
            } else {
#pragma unroll
                for (int j = 0; j < VEC; ++j) qv[r][j] = 0.0f;
            }
        }
        // Row 0 of the tile (the segment's earliest row here) has the earliest window.
        const int key_begin = max(part * part_size, key_start[0]);
        const int key_end = min(max_limit, part * part_size + part_size);

        float m[ROWS], l[ROWS], acc[ROWS][VEC];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            m[r] = PAGEDKV_NEG_INF;
            l[r] = 0.0f;
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc[r][j] = 0.0f;
        }

        const int* bt = block_tables + seq * bt_stride;
        const long long stride_tok = static_cast<long long>(num_kv_heads) * D;
        // The loop bound is uniform per warp, so every lane reaches the shuffles.
        for (int base = key_begin + warp * TPW * U; base < key_end; base += STEP) {
            float kf[U][VEC], vf[U][VEC];
            int key[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                key[u] = base + u * TPW + sub;
                if (key[u] < key_end) {
                    const int blk = bt[key[u] / block_size];
                    const int off = key[u] - (key[u] / block_size) * block_size;
                    const T* kp = cache + blk * stride_block + layer_offset + off * stride_tok
                                  + kv_head * D + slot * VEC;
                    load_as_float<T, VEC>(kp, kf[u]);
                    load_as_float<T, VEC>(kp + stride_kv, vf[u]);
                } else {
#pragma unroll
                    for (int j = 0; j < VEC; ++j) { kf[u][j] = 0.0f; vf[u][j] = 0.0f; }
                }
            }
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                float s[U];
                float chunk_max = PAGEDKV_NEG_INF;
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    float dot = 0.0f;
#pragma unroll
                    for (int j = 0; j < VEC; ++j) dot += qv[r][j] * kf[u][j];
#pragma unroll
                    for (int o = LPT / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
                    s[u] = (key[u] < key_end && key[u] < key_limit[r] && key[u] >= key_start[r]) ? dot
                                                                                                   : PAGEDKV_NEG_INF;
                    chunk_max = fmaxf(chunk_max, s[u]);
                }
                const float m_new = fmaxf(m[r], chunk_max);
                if (m_new == PAGEDKV_NEG_INF) continue;  // no visible key yet
                const float corr = pagedkv_rescale(m[r], m_new);
                l[r] *= corr;
#pragma unroll
                for (int j = 0; j < VEC; ++j) acc[r][j] *= corr;
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const float p = pagedkv_rescale(s[u], m_new);
                    l[r] += p;
#pragma unroll
                    for (int j = 0; j < VEC; ++j) acc[r][j] += p * vf[u][j];
                }
                m[r] = m_new;
            }
        }

        // Merge the sub-groups of a warp (lanes with the same slot hold the same dims).
#pragma unroll
        for (int o = LPT; o < 32; o <<= 1) {
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const float m_o = __shfl_xor_sync(0xffffffffu, m[r], o);
                const float l_o = __shfl_xor_sync(0xffffffffu, l[r], o);
                const float m_new = fmaxf(m[r], m_o);
                const float a = pagedkv_rescale(m[r], m_new), b = pagedkv_rescale(m_o, m_new);
                l[r] = l[r] * a + l_o * b;
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    const float acc_o = __shfl_xor_sync(0xffffffffu, acc[r][j], o);
                    acc[r][j] = acc[r][j] * a + acc_o * b;
                }
                m[r] = m_new;
            }
        }
        if (sub == 0) {
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
#pragma unroll
                for (int j = 0; j < VEC; ++j) s_acc[warp][r][slot * VEC + j] = acc[r][j];
                if (slot == 0) { s_m[warp][r] = m[r]; s_l[warp][r] = l[r]; }
            }
        }
        __syncthreads();

        // Merge the warps and write one output (or partial) element per thread and step.
        for (int idx = threadIdx.x; idx < ROWS * D; idx += PAGEDKV_ATTN_THREADS) {
            const int r = idx / D, d = idx % D;
            const int row = row0 + r / GROUP, head = head0 + r % GROUP;
            if (row >= rows_end) continue;
            float mx = PAGEDKV_NEG_INF;
#pragma unroll
            for (int w = 0; w < PAGEDKV_ATTN_WARPS; ++w) mx = fmaxf(mx, s_m[w][r]);
            float sum = 0.0f, a = 0.0f;
#pragma unroll
            for (int w = 0; w < PAGEDKV_ATTN_WARPS; ++w) {
                const float c = pagedkv_rescale(s_m[w][r], mx);
                sum += s_l[w][r] * c;
                a += s_acc[w][r][d] * c;
            }
            const long long oh = static_cast<long long>(row) * num_q_heads + head;
            if (!split) {
                store_float(out + oh * D + d, sum > 0.0f ? a / sum : 0.0f);
            } else {
                const long long pi = oh * num_parts + part;
                part_acc[pi * D + d] = a;
                if (d == 0) { part_ml[2 * pi] = mx; part_ml[2 * pi + 1] = sum; }
            }
        }
        __syncthreads();  // shared memory is reused by the next sequence of the tile
        row0 = rows_end;
    }
}

// Combines the split-K partials of one (row, head), of either attention kernel: grid (num_rows, Hq).
template <typename T>
__global__ void __launch_bounds__(128) paged_attention_reduce(
    T* __restrict__ out, const float* __restrict__ part_acc, const float* __restrict__ part_ml,
    const int* __restrict__ query_start_loc, const int* __restrict__ context_lens,
    int num_seqs, int num_q_heads, int head_dim, int num_parts, int part_size) {
    const int row = blockIdx.x, head = blockIdx.y;
    int seq = row, first_row = row, q_len = 1;
    if (query_start_loc != nullptr) {
        seq = pagedkv_find_seq(query_start_loc, num_seqs, row);
        first_row = query_start_loc[seq];
        q_len = query_start_loc[seq + 1] - first_row;
    }
    const int limit = context_lens[seq] - q_len + (row - first_row) + 1;
    // Partitions at or past the row's last visible key hold nothing for it.
    const int used = limit <= 0 ? 0 : min(num_parts, (limit + part_size - 1) / part_size);
    const long long oh = static_cast<long long>(row) * num_q_heads + head;
    const float* ml = part_ml + 2 * oh * num_parts;
    const float* pa = part_acc + oh * num_parts * head_dim;

    float mx = PAGEDKV_NEG_INF;
    for (int p = 0; p < used; ++p) mx = fmaxf(mx, ml[2 * p]);
    float sum = 0.0f;
    for (int p = 0; p < used; ++p) sum += ml[2 * p + 1] * pagedkv_rescale(ml[2 * p], mx);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.0f;
        for (int p = 0; p < used; ++p) a += pa[static_cast<long long>(p) * head_dim + d] * pagedkv_rescale(ml[2 * p], mx);
        store_float(out + oh * head_dim + d, a * inv);
    }
}

#ifdef PAGEDKV_INSTANTIATE_FOR_CHECK
// Offline compile check (nvcc): the run-time build instantiates through name_expressions.
template __global__ void paged_attention_kernel<half_t, 128, 16, 4, 4>(half_t*, float*, float*, const half_t*, long long, long long, const half_t*, long long, long long, long long, int, int, const int*, long long, const int*, const int*, int, int, int, int, float, int);
template __global__ void paged_attention_kernel<bf16_t, 64, 8, 4, 1>(bf16_t*, float*, float*, const bf16_t*, long long, long long, const bf16_t*, long long, long long, long long, int, int, const int*, long long, const int*, const int*, int, int, int, int, float, int);
template __global__ void paged_attention_kernel<float, 128, 32, 8, 8>(float*, float*, float*, const float*, long long, long long, const float*, long long, long long, long long, int, int, const int*, long long, const int*, const int*, int, int, int, int, float, int);
template __global__ void paged_attention_kernel<half_t, 96, 16, 5, 5>(half_t*, float*, float*, const half_t*, long long, long long, const half_t*, long long, long long, long long, int, int, const int*, long long, const int*, const int*, int, int, int, int, float, int);
template __global__ void paged_attention_kernel<float, 256, 32, 4, 2>(float*, float*, float*, const float*, long long, long long, const float*, long long, long long, long long, int, int, const int*, long long, const int*, const int*, int, int, int, int, float, int);
template __global__ void paged_attention_reduce<half_t>(half_t*, const float*, const float*, const int*, const int*, int, int, int, int, int);
template __global__ void paged_attention_reduce<bf16_t>(bf16_t*, const float*, const float*, const int*, const int*, int, int, int, int, int);
template __global__ void paged_attention_reduce<float>(float*, const float*, const float*, const int*, const int*, int, int, int, int, int);
#endif
