// Shared helpers of the pagedkv CUDA sources: storage types, conversions, wide loads.
//
// The sources are compiled at run time by NVRTC (cupy.RawModule), so they include no
// headers at all: half and bfloat16 are handled as raw 16-bit storage and converted with
// single PTX instructions, which keeps them independent of where cuda_fp16.h lives.
#ifndef PAGEDKV_COMMON_CUH
#define PAGEDKV_COMMON_CUH

#define PAGEDKV_NEG_INF (__int_as_float(0xff800000))
#define PAGEDKV_LOG2E 1.4426950408889634f

// 16-bit storage types; the kernels only ever convert them to and from float.
struct half_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };

// Copy units for wide, aligned memory accesses.
struct alignas(16) pk16 { unsigned int x, y, z, w; };
struct alignas(8) pk8 { unsigned int x, y; };

// A host build of these sources (the CPU emulation the tests use) supplies its own
// versions of everything written in PTX: the conversions below and the tensor-core,
// ldmatrix and cp.async wrappers further down.
#ifndef PAGEDKV_HOST_EMULATION
__device__ __forceinline__ float pagedkv_half_bits_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short pagedkv_float_to_half_bits(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ unsigned short pagedkv_float_to_bf16_bits(float f) {
#if __CUDA_ARCH__ >= 800
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else  // no bf16 conversion instruction before sm_80: round to nearest even by hand
    const unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}
#endif

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(half_t x) { return pagedkv_half_bits_to_float(x.bits); }
__device__ __forceinline__ float to_float(bf16_t x) {
    return __uint_as_float(static_cast<unsigned int>(x.bits) << 16);
}

__device__ __forceinline__ void store_float(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_float(half_t* p, float x) {
    p->bits = pagedkv_float_to_half_bits(x);
}
__device__ __forceinline__ void store_float(bf16_t* p, float x) {
    p->bits = pagedkv_float_to_bf16_bits(x);
}

// Element j of a run of T packed into 32-bit words (little endian, as loaded).
__device__ __forceinline__ float word_elem(const unsigned int* w, int j, float*) {
    return __uint_as_float(w[j]);
}
__device__ __forceinline__ float word_elem(const unsigned int* w, int j, half_t*) {
    return pagedkv_half_bits_to_float(static_cast<unsigned short>(w[j >> 1] >> ((j & 1) * 16)));
}
__device__ __forceinline__ float word_elem(const unsigned int* w, int j, bf16_t*) {
    return __uint_as_float((j & 1) ? (w[j >> 1] & 0xffff0000u) : (w[j >> 1] << 16));
}

// Loads N consecutive elements into floats using the widest access the byte count
// allows (16, 8 or 4 bytes); the caller guarantees alignment to that width. The
// branches are compile-time constants (plain `if`, so any C++ dialect compiles it).
template <typename T, int N>
__device__ __forceinline__ void load_as_float(const T* __restrict__ src, float (&dst)[N]) {
    constexpr int BYTES = N * static_cast<int>(sizeof(T));
    constexpr int WORDS = BYTES / 4 > 0 ? BYTES / 4 : 1;
    if (BYTES % 4 != 0) {
#pragma unroll
        for (int j = 0; j < N; ++j) dst[j] = to_float(src[j]);
        return;
    }
    unsigned int w[WORDS];
    if (BYTES % 16 == 0) {
#pragma unroll
        for (int i = 0; i < BYTES / 16; ++i) {
            const pk16 v = reinterpret_cast<const pk16*>(src)[i];
            w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
        }
    } else if (BYTES % 8 == 0) {
#pragma unroll
        for (int i = 0; i < BYTES / 8; ++i) {
            const pk8 v = reinterpret_cast<const pk8*>(src)[i];
            w[2 * i] = v.x; w[2 * i + 1] = v.y;
        }
    } else {
#pragma unroll
        for (int i = 0; i < WORDS; ++i) w[i] = reinterpret_cast<const unsigned int*>(src)[i];
    }
#pragma unroll
    for (int j = 0; j < N; ++j) dst[j] = word_elem(w, j, static_cast<T*>(nullptr));
}

// Sequence owning query row `row`: the last s with query_start_loc[s] <= row.
__device__ __forceinline__ int pagedkv_find_seq(const int* __restrict__ qsl, int num_seqs, int row) {
    int lo = 0, hi = num_seqs - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (qsl[mid] <= row) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// Two floats as one packed pair of 16-bit values (lo in the low half), the operand format
// of the tensor-core instructions.
template <typename T>
__device__ __forceinline__ unsigned int pack_pair(float lo, float hi) {
    T a, b;
    store_float(&a, lo);
    store_float(&b, hi);
    return static_cast<unsigned int>(a.bits) | (static_cast<unsigned int>(b.bits) << 16);
}

// Warp-level tensor-core and asynchronous-copy primitives (sm_80 and newer), as inline
// PTX so that NVRTC needs no header. Shared-memory operands are 32-bit shared addresses.
#ifndef PAGEDKV_HOST_EMULATION
typedef unsigned int smem_addr_t;

__device__ __forceinline__ smem_addr_t smem_addr(const void* p) {
    smem_addr_t a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared without passing through registers; src_bytes 0 writes zeros.
__device__ __forceinline__ void cp_async16(smem_addr_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

// Four 8x8 matrices of 16-bit values; lane l addresses row l % 8 of matrix l / 8. Without
// TRANS lane l receives (row l / 4, columns 2 (l % 4) and +1) of each matrix, with TRANS
// (rows 2 (l % 4) and +1, column l / 4).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(unsigned int (&r)[4], smem_addr_t row_addr) {
    if (TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(row_addr) : "memory");
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(row_addr) : "memory");
    }
}

// d += a (16x16, row major) * b (16x8, column major) in fp32; operands in the standard
// m16n8k16 fragment layout (see paged_attention_mma.cu).
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned int (&a)[4], unsigned int b0,
                                          unsigned int b1, half_t*) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned int (&a)[4], unsigned int b0,
                                          unsigned int b1, bf16_t*) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// exp2(x - m) where m may be -inf (an empty state): such a state contributes nothing.
__device__ __forceinline__ float pagedkv_rescale(float x, float m) {
    return m == PAGEDKV_NEG_INF ? 0.0f : exp2f(x - m);
}

#endif  // PAGEDKV_COMMON_CUH
