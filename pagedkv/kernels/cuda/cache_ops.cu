// Cache maintenance kernels for the block-major KV cache
// [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim].
//
// All three are plain byte copies (no dtype conversion), templated on the copy unit: the
// host picks the widest unit (16 bytes where alignment allows) so that a warp moves
// 512 contiguous bytes per access.
#include "common.cuh"

// Writes the K/V rows of token blockIdx.x into their cache slot; slot < 0 is skipped
// (padding tokens). Strides are in bytes, so K/V may be views into a fused projection.
template <typename UNIT>
__global__ void __launch_bounds__(128) reshape_and_cache_kernel(
    const char* __restrict__ key, long long k_stride_t, long long k_stride_h,
    const char* __restrict__ value, long long v_stride_t, long long v_stride_h,
    char* __restrict__ cache, long long stride_block, long long layer_offset,
    long long stride_kv, const long long* __restrict__ slot_mapping,
    int block_size, int num_kv_heads, int head_bytes) {
    const int t = blockIdx.x;
    const long long slot = slot_mapping[t];
    if (slot < 0) return;
    const long long blk = slot / block_size;
    const long long off = slot - blk * block_size;
    char* dst = cache + blk * stride_block + layer_offset
                + off * static_cast<long long>(num_kv_heads) * head_bytes;
    const int units_per_head = head_bytes / static_cast<int>(sizeof(UNIT));
    const int total = num_kv_heads * units_per_head;
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
        const int h = i / units_per_head, c = i - h * units_per_head;
        const UNIT* ks = reinterpret_cast<const UNIT*>(key + t * k_stride_t + h * k_stride_h);
        const UNIT* vs = reinterpret_cast<const UNIT*>(value + t * v_stride_t + h * v_stride_h);
        reinterpret_cast<UNIT*>(dst)[i] = ks[c];
        reinterpret_cast<UNIT*>(dst + stride_kv)[i] = vs[c];
    }
}

// Copies whole chunks: chunk pairs[2p] of src onto chunk pairs[2p+1] of dst, for pair
// p = blockIdx.x; blockIdx.y splits a chunk among CTAs. One block of the block-major
// cache is one contiguous chunk (all layers, K and V), so this one launch serves both
//  - copy_blocks (copy-on-write): src == dst == the device pool, and
//  - swap_blocks: one side is the device pool, the other the pinned CPU pool.
// Why a kernel and not one cudaMemcpyAsync per block: pinned host memory is mapped into
// the GPU's address space (unified virtual addressing), so one launch moves every listed
// block over PCIe with wide coalesced loads/stores, whatever the number of blocks, while
// per-block copies pay a driver call and a DMA setup each (the cost that made vLLM's
// swapping lose to recomputation at small block sizes). Each thread keeps UNROLL
// accesses in flight to hide the PCIe round trip when reading host memory.
// Sources and destinations must not overlap (the block manager guarantees it).
template <typename UNIT>
__global__ void __launch_bounds__(256) copy_chunks_kernel(
    const UNIT* __restrict__ src, UNIT* __restrict__ dst,
    const long long* __restrict__ pairs, long long units_per_chunk) {
    constexpr int UNROLL = 4;
    const long long s = pairs[2 * blockIdx.x], d = pairs[2 * blockIdx.x + 1];
    const UNIT* sp = src + s * units_per_chunk;
    UNIT* dp = dst + d * units_per_chunk;
    const long long stride = static_cast<long long>(gridDim.y) * blockDim.x;
    long long i = static_cast<long long>(blockIdx.y) * blockDim.x + threadIdx.x;
    for (; i + (UNROLL - 1) * stride < units_per_chunk; i += UNROLL * stride) {
        UNIT buf[UNROLL];
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) buf[k] = sp[i + k * stride];
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) dp[i + k * stride] = buf[k];
    }
    for (; i < units_per_chunk; i += stride) dp[i] = sp[i];
}

#ifdef PAGEDKV_INSTANTIATE_FOR_CHECK
// Offline compile check (nvcc): the run-time build instantiates through name_expressions.
template __global__ void reshape_and_cache_kernel<pk16>(const char*, long long, long long, const char*, long long, long long, char*, long long, long long, long long, const long long*, int, int, int);
template __global__ void reshape_and_cache_kernel<pk8>(const char*, long long, long long, const char*, long long, long long, char*, long long, long long, long long, const long long*, int, int, int);
template __global__ void reshape_and_cache_kernel<unsigned int>(const char*, long long, long long, const char*, long long, long long, char*, long long, long long, long long, const long long*, int, int, int);
template __global__ void reshape_and_cache_kernel<unsigned short>(const char*, long long, long long, const char*, long long, long long, char*, long long, long long, long long, const long long*, int, int, int);
template __global__ void copy_chunks_kernel<pk16>(const pk16*, pk16*, const long long*, long long);
template __global__ void copy_chunks_kernel<unsigned short>(const unsigned short*, unsigned short*, const long long*, long long);
#endif
