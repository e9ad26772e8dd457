// Paged attention on the tensor cores (fp16 / bf16, sm_80 and newer), for decode and
// (chunked) prefill over the block-major KV cache
// [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim].
//
// Rows: a CTA owns QT consecutive query tokens of one sequence times GROUP query heads that
// share one KV head (row r = token r / GROUP, head r % GROUP), so each K/V tile it loads
// serves every head of the group. Warps form a WM x WN grid: warp (wm, wn) computes rows
// 16 wm .. 16 wm + 15 against keys NK wn .. NK wn + NK - 1 of every tile. Prefill uses
// WM = 4, WN = 1 (64 rows share each tile); decode has a single token per sequence, so
// WM = 1 and the warps split the keys instead (WN > 1), their results merged at the end.
//
// K/V tiles of BLOCK_N keys go from the paged cache to shared memory with cp.async, two
// stages deep: tile t + 1 is in flight while tile t is computed. Rows of the tiles are
// padded by 16 bytes so that ldmatrix reads them without bank conflicts. Block-table
// entries are staged in shared memory, a window of TBL entries at a time.
//
// Per tile and warp: S = Q K^T with mma.m16n8k16 (Q fragments stay in registers), the
// online softmax in fp32 (base 2: the scale carries log2(e)) on S's accumulator fragments,
// whose layout is that of the A operand of the next product, and O += P V, V read
// transposed by ldmatrix.trans.
//
// Fragment layouts of mma.m16n8k16 (lane = 4 g + t): A holds (row g | g + 8, columns
// 2t, 2t + 1 | 8 + 2t, 9 + 2t); B holds (k 2t, 2t + 1 | 8 + 2t, 9 + 2t; column g); C holds
// (row g | g + 8; columns 2t, 2t + 1).
//
// Split-K: with gridDim.z > 1 every CTA handles one partition of part_size keys and writes
// an unnormalised partial (max, sum, acc) that paged_attention_reduce (paged_attention.cu)
// combines; the partial layout is the scalar kernel's.
//
// Sliding window: with window > 0 a row sees only the last `window` keys up to its own; the
// keys (and blocks) before the window of a segment's first row are never read.
#include "common.cuh"

#define PAGEDKV_MMA_TBL 256

template <typename T, int D, int WM, int WN, int GROUP, int QT, int BLOCK_N>
__global__ void __launch_bounds__(32 * WM * WN) paged_attention_mma_kernel(
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
    constexpr int THREADS = 32 * WM * WN;
    constexpr int ROWS = QT * GROUP;              // valid rows of the 16 WM
    constexpr int NK = BLOCK_N / WN;              // keys per warp and tile
    constexpr int LDS = D + 8;                    // padded row, in elements
    constexpr int CH = D * static_cast<int>(sizeof(T)) / 16;  // 16-byte chunks per key row
    constexpr int EPC = 16 / static_cast<int>(sizeof(T));     // elements per chunk
    static_assert(sizeof(T) == 2 && D % 32 == 0 && NK % 16 == 0 && ROWS <= 16 * WM, "bad tiling");

    alignas(16) __shared__ T s_kv[2][2][BLOCK_N][LDS];  // [K | V][stage][key][dim]
    __shared__ int s_tbl[PAGEDKV_MMA_TBL];
    __shared__ float s_ml[WN][16 * WM][2];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp % WM, wn = warp / WM;
    const int g = lane / 4, t4 = lane % 4;
    const int tile_begin = blockIdx.x * QT;
    const int tile_end = min(tile_begin + QT, num_rows);
    const int head0 = blockIdx.y * GROUP;
    const int kv_head = head0 / (num_q_heads / num_kv_heads);
    const int part = blockIdx.z, num_parts = gridDim.z;
    const long long stride_tok = static_cast<long long>(num_kv_heads) * D;
    const T* kv_base = cache + layer_offset + kv_head * D;

    // A tile may span sequences (short or decode sequences): handle them one by one. Every
    // bound below is uniform over the CTA, so all threads reach the same barriers.
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
        // The last token of the segment sees the most keys, the first the earliest ones.
        const int first_start = window > 0 ? max(0, ctx - q_len + (row0 - first_row) + 1 - window) : 0;
        const int key_begin = max(part * part_size, first_start);
        const int key_end = min(ctx - q_len + (rows_end - first_row), part * part_size + part_size);

        // This lane's rows: g and g + 8 of the warp's 16; each sees keys [key_lo, key_lim).
        int key_lim[2], key_lo[2];
        unsigned int qa[D / 16][4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = 16 * wm + g + 8 * h;
            const int row = row0 + r / GROUP;
            const bool valid = r < ROWS && row < rows_end;
            key_lim[h] = valid ? min(key_end, ctx - q_len + (row - first_row) + 1) : 0;
            key_lo[h] = valid && window > 0 ? max(0, ctx - q_len + (row - first_row) + 1 - window) : 0;
            const T* qp = q + (valid ? row * q_stride_t + (head0 + r % GROUP) * q_stride_h : 0);
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int col = 16 * ks + 8 * half + 2 * t4;
                    qa[ks][h + 2 * half] = valid ? *reinterpret_cast<const unsigned int*>(qp + col) : 0u;
                }
            }
        }

        float o[D / 8][4], m[2], l[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) { m[h] = PAGEDKV_NEG_INF; l[h] = 0.0f; }
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[dt][e] = 0.0f;

        const int* bt = block_tables + seq * bt_stride;
        const int last_entry = key_end > 0 ? (key_end - 1) / block_size : -1;
        int win0 = -PAGEDKV_MMA_TBL;  // first block-table entry held in s_tbl
        const int num_tiles = key_end > key_begin ? (key_end - key_begin + BLOCK_N - 1) / BLOCK_N : 0;

        // Starts the copy of tile `tile` into stage `st`; keys past key_end read as zeros.
        auto issue = [&](int tile, int st) {
            const int k0 = key_begin + tile * BLOCK_N;
            const int e_first = k0 / block_size;
            const int e_last = (min(k0 + BLOCK_N, key_end) - 1) / block_size;
            if (e_first < win0 || e_last >= win0 + PAGEDKV_MMA_TBL) {  // uniform
                __syncthreads();  // every thread is done with the old window
                win0 = e_first;
                for (int i = threadIdx.x; i < PAGEDKV_MMA_TBL && win0 + i <= last_entry; i += THREADS)
                    s_tbl[i] = bt[win0 + i];
                __syncthreads();
            }
            for (int idx = threadIdx.x; idx < BLOCK_N * CH; idx += THREADS) {
                const int kk = idx / CH, c = idx % CH;
                const int key = k0 + kk;
                const bool valid = key < key_end;
                const T* src = kv_base;
                if (valid) {
                    const int e = key / block_size;
                    src += static_cast<long long>(s_tbl[e - win0]) * stride_block
                           + (key - e * block_size) * stride_tok + c * EPC;
                }
                cp_async16(smem_addr(&s_kv[0][st][kk][c * EPC]), src, valid ? 16 : 0);
                cp_async16(smem_addr(&s_kv[1][st][kk][c * EPC]), src + (valid ? stride_kv : 0), valid ? 16 : 0);
            }
            cp_async_commit();
        };

        if (num_tiles > 0) issue(0, 0);
        for (int tile = 0; tile < num_tiles; ++tile) {
            const int st = tile & 1;
            if (tile + 1 < num_tiles) {
                issue(tile + 1, st ^ 1);
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();

            // S = Q K^T for this warp's NK keys.
            const int kw = wn * NK;  // the warp's first key within the tile
            float s[NK / 8][4];
#pragma unroll
            for (int nt = 0; nt < NK / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < D / 16; ks += 2) {
#pragma unroll
                for (int nt = 0; nt < NK / 8; ++nt) {
                    unsigned int b[4];
                    ldmatrix_x4<false>(b, smem_addr(&s_kv[0][st][kw + 8 * nt + lane % 8][16 * ks + 8 * (lane / 8)]));
                    mma_16816(s[nt], qa[ks], b[0], b[1], static_cast<T*>(nullptr));
                    mma_16816(s[nt], qa[ks + 1], b[2], b[3], static_cast<T*>(nullptr));
                }
            }

            // Online softmax; a row's max is shared by the 4 lanes (a quad) that hold it.
            const int key0 = key_begin + tile * BLOCK_N + kw + 2 * t4;
            float corr[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float mx = PAGEDKV_NEG_INF;
#pragma unroll
                for (int nt = 0; nt < NK / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const bool seen = key0 + 8 * nt + e < key_lim[h] && key0 + 8 * nt + e >= key_lo[h];
                        s[nt][2 * h + e] = seen ? s[nt][2 * h + e] * scale_log2 : PAGEDKV_NEG_INF;
                        mx = fmaxf(mx, s[nt][2 * h + e]);
                    }
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(m[h], mx);
                corr[h] = pagedkv_rescale(m[h], m_new);
                m[h] = m_new;
                float sum = 0.0f;
#pragma unroll
                for (int nt = 0; nt < NK / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        s[nt][2 * h + e] = pagedkv_rescale(s[nt][2 * h + e], m_new);
                        sum += s[nt][2 * h + e];
                    }
                l[h] = l[h] * corr[h] + sum;  // this lane's columns only; quad-summed at the end
            }
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
                for (int e = 0; e < 4; ++e) o[dt][e] *= corr[e / 2];

            // O += P V, 16 keys per step; P's accumulator layout is already A's.
#pragma unroll
            for (int kk = 0; kk < NK / 16; ++kk) {
                const unsigned int pa[4] = {
                    pack_pair<T>(s[2 * kk][0], s[2 * kk][1]), pack_pair<T>(s[2 * kk][2], s[2 * kk][3]),
                    pack_pair<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack_pair<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
                const int vrow = kw + 16 * kk + lane % 8 + 8 * ((lane / 8) % 2);
#pragma unroll
                for (int dt = 0; dt < D / 8; dt += 2) {
                    unsigned int b[4];
                    ldmatrix_x4<true>(b, smem_addr(&s_kv[1][st][vrow][8 * (dt + lane / 16)]));
                    mma_16816(o[dt], pa, b[0], b[1], static_cast<T*>(nullptr));
                    mma_16816(o[dt + 1], pa, b[2], b[3], static_cast<T*>(nullptr));
                }
            }
            __syncthreads();  // stage st is refilled by the next iteration's issue
        }

#pragma unroll
        for (int h = 0; h < 2; ++h) {
            l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
            l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        }

        if (WN == 1) {  // each row lives in one warp: write straight from the fragments
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = 16 * wm + g + 8 * h;
                const int row = row0 + r / GROUP;
                if (r >= ROWS || row >= rows_end) continue;
                const long long oh = static_cast<long long>(row) * num_q_heads + head0 + r % GROUP;
                const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int d = 8 * dt + 2 * t4 + e;
                        if (part_acc == nullptr) {
                            store_float(out + oh * D + d, o[dt][2 * h + e] * inv);
                        } else {
                            part_acc[(oh * num_parts + part) * D + d] = o[dt][2 * h + e];
                        }
                    }
                if (part_acc != nullptr && t4 == 0) {
                    part_ml[2 * (oh * num_parts + part)] = m[h];
                    part_ml[2 * (oh * num_parts + part) + 1] = l[h];
                }
            }
        } else {  // merge the WN warps' states of each row through shared memory
            float* s_o = reinterpret_cast<float*>(&s_kv[0][0][0][0]);  // [WN][16 WM][D], fits
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = 16 * wm + g + 8 * h;
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        s_o[(wn * 16 * WM + r) * D + 8 * dt + 2 * t4 + e] = o[dt][2 * h + e];
                if (t4 == 0) { s_ml[wn][r][0] = m[h]; s_ml[wn][r][1] = l[h]; }
            }
            __syncthreads();
            for (int idx = threadIdx.x; idx < ROWS * D; idx += THREADS) {
                const int r = idx / D, d = idx % D;
                const int row = row0 + r / GROUP;
                if (row >= rows_end) continue;
                float mx = PAGEDKV_NEG_INF;
#pragma unroll
                for (int w = 0; w < WN; ++w) mx = fmaxf(mx, s_ml[w][r][0]);
                float sum = 0.0f, a = 0.0f;
#pragma unroll
                for (int w = 0; w < WN; ++w) {
                    const float c = pagedkv_rescale(s_ml[w][r][0], mx);
                    sum += s_ml[w][r][1] * c;
                    a += s_o[(w * 16 * WM + r) * D + d] * c;
                }
                const long long oh = static_cast<long long>(row) * num_q_heads + head0 + r % GROUP;
                if (part_acc == nullptr) {
                    store_float(out + oh * D + d, sum > 0.0f ? a / sum : 0.0f);
                } else {
                    const long long pi = oh * num_parts + part;
                    part_acc[pi * D + d] = a;
                    if (d == 0) { part_ml[2 * pi] = mx; part_ml[2 * pi + 1] = sum; }
                }
            }
        }
        __syncthreads();  // shared memory is reused by the next sequence of the tile
        row0 = rows_end;
    }
}

#ifdef PAGEDKV_INSTANTIATE_FOR_CHECK
// Offline compile check (nvcc): the run-time build instantiates through name_expressions.
#define PAGEDKV_MMA_ARGS(T) T*, float*, float*, const T*, long long, long long, const T*, long long, long long, \
    long long, int, int, const int*, long long, const int*, const int*, int, int, int, int, float, int
template __global__ void paged_attention_mma_kernel<half_t, 128, 1, 2, 4, 1, 32>(PAGEDKV_MMA_ARGS(half_t));
template __global__ void paged_attention_mma_kernel<bf16_t, 128, 4, 1, 4, 16, 32>(PAGEDKV_MMA_ARGS(bf16_t));
template __global__ void paged_attention_mma_kernel<half_t, 128, 4, 1, 1, 64, 32>(PAGEDKV_MMA_ARGS(half_t));
template __global__ void paged_attention_mma_kernel<bf16_t, 64, 1, 4, 3, 1, 64>(PAGEDKV_MMA_ARGS(bf16_t));
template __global__ void paged_attention_mma_kernel<half_t, 96, 4, 1, 4, 16, 32>(PAGEDKV_MMA_ARGS(half_t));
template __global__ void paged_attention_mma_kernel<bf16_t, 256, 1, 1, 16, 1, 16>(PAGEDKV_MMA_ARGS(bf16_t));
#endif
