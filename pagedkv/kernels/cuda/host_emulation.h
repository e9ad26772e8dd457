// Host emulation of the small CUDA subset the pagedkv kernels use, so that their CUDA C
// sources can be compiled by g++ and run on a CPU (pagedkv/kernels/cuda/emulation.py). Blocks run one
// after another, so `static` locals stand in for __shared__ memory. __syncthreads and warp
// shuffles are barriers: a kernel calling them from divergent code fails with "deadlock"
// here instead of silently misbehaving.
#ifndef PAGEDKV_HOST_EMULATION_H
#define PAGEDKV_HOST_EMULATION_H

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define PAGEDKV_HOST_EMULATION

using std::max;
using std::min;

struct emu_dim3 { unsigned x = 1, y = 1, z = 1; };
inline emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

// CUDA threads are user-level contexts switched by one scheduler (no OS threads): a
// thread runs until it reaches a barrier, and a barrier opens once every live thread of
// its scope (block or warp) waits at it.
enum emu_state { EMU_RUNNABLE, EMU_AT_BLOCK_BARRIER, EMU_AT_WARP_BARRIER, EMU_DONE };
struct emu_thread { ucontext_t ctx; emu_state state; };
inline std::vector<emu_thread> emu_threads;
inline ucontext_t emu_scheduler;
inline std::function<void()> emu_body;

inline void emu_wait(emu_state at) {
    emu_thread& t = emu_threads[threadIdx.x];
    t.state = at;
    swapcontext(&t.ctx, &emu_scheduler);
}

inline void __syncthreads() { emu_wait(EMU_AT_BLOCK_BARRIER); }

inline unsigned long long emu_exchange[32][32];  // [warp][lane], up to 1024 threads

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
    static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffle of a wide type");
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    unsigned long long bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    emu_exchange[warp][lane] = bits;
    emu_wait(EMU_AT_WARP_BARRIER);
    bits = emu_exchange[warp][lane ^ static_cast<unsigned>(lane_mask)];
    emu_wait(EMU_AT_WARP_BARRIER);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }

inline float pagedkv_half_bits_to_float(unsigned short h) {
    _Float16 x;
    std::memcpy(&x, &h, 2);
    return static_cast<float>(x);
}
inline unsigned short pagedkv_float_to_half_bits(float f) {
    const _Float16 x = static_cast<_Float16>(f);  // round to nearest even
    unsigned short h;
    std::memcpy(&h, &x, 2);
    return h;
}
inline unsigned short pagedkv_float_to_bf16_bits(float f) {
    const unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
    return static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // nearest even
}

// Warp-collective PTX (ldmatrix, mma): every lane deposits its operands, the warp meets
// at a barrier, each lane computes its own result from all 32 deposits, and the warp meets
// again before the buffer is reused.
inline unsigned char emu_deposit[32][32][64];  // [warp][lane][bytes]

template <typename P>
void emu_warp_share(const P& mine, P (&all)[32]) {
    static_assert(sizeof(P) <= 64, "deposit too wide");
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    std::memcpy(emu_deposit[warp][lane], &mine, sizeof(P));
    emu_wait(EMU_AT_WARP_BARRIER);
    for (unsigned i = 0; i < 32; ++i) std::memcpy(&all[i], emu_deposit[warp][i], sizeof(P));
    emu_wait(EMU_AT_WARP_BARRIER);
}

typedef unsigned long long smem_addr_t;  // on the host a shared address is a plain pointer
inline smem_addr_t smem_addr(const void* p) { return reinterpret_cast<smem_addr_t>(p); }

// cp.async has no asynchrony to model here: blocks run their threads one at a time.
inline void cp_async16(smem_addr_t dst, const void* src, int src_bytes) {
    if (src_bytes == 16) std::memcpy(reinterpret_cast<void*>(dst), src, 16);
    else std::memset(reinterpret_cast<void*>(dst), 0, 16);
}
inline void cp_async_commit() {}
template <int N> void cp_async_wait() {}

template <bool TRANS>
void ldmatrix_x4(unsigned int (&r)[4], smem_addr_t row_addr) {
    smem_addr_t rows[32];
    emu_warp_share(row_addr, rows);
    const unsigned lane = threadIdx.x % 32;
    auto at = [&](unsigned m, unsigned row, unsigned col) {
        unsigned short v;
        std::memcpy(&v, reinterpret_cast<const unsigned short*>(rows[8 * m + row]) + col, 2);
        return static_cast<unsigned int>(v);
    };
    for (unsigned m = 0; m < 4; ++m) {
        const unsigned a = lane / 4, b = 2 * (lane % 4);
        r[m] = TRANS ? (at(m, b, a) | at(m, b + 1, a) << 16) : (at(m, a, b) | at(m, a, b + 1) << 16);
    }
}

struct half_t;  // defined in common.cuh; the overloads only need their names
struct bf16_t;

inline float emu_elem(unsigned int word, unsigned half, half_t*) {
    return pagedkv_half_bits_to_float(static_cast<unsigned short>(word >> (16 * half)));
}
inline float emu_elem(unsigned int word, unsigned half, bf16_t*) {
    return __uint_as_float(half ? (word & 0xffff0000u) : (word << 16));
}

// m16n8k16 with the PTX fragment layouts: lane l = 4 g + t holds A (g, 2t..2t+1) in a0,
// (g + 8, ..) in a1, (g, 8 + 2t..) in a2, (g + 8, 8 + 2t..) in a3; B (k 2t..2t+1, n g) in
// b0 and (k 8 + 2t.., n g) in b1; C/D (g, 2t..2t+1) in d0, d1 and (g + 8, ..) in d2, d3.
template <typename T>
void mma_16816(float (&d)[4], const unsigned int (&a)[4], unsigned int b0, unsigned int b1, T*) {
    struct Ops { unsigned int a[4], b[2]; };
    Ops ops[32];
    emu_warp_share(Ops{{a[0], a[1], a[2], a[3]}, {b0, b1}}, ops);
    auto A = [&](unsigned row, unsigned k) {
        const Ops& o = ops[4 * (row % 8) + (k % 8) / 2];
        return emu_elem(o.a[(row >= 8) + 2 * (k >= 8)], k % 2, static_cast<T*>(nullptr));
    };
    auto B = [&](unsigned k, unsigned n) {
        const Ops& o = ops[4 * n + (k % 8) / 2];
        return emu_elem(o.b[k >= 8], k % 2, static_cast<T*>(nullptr));
    };
    const unsigned lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    for (unsigned i = 0; i < 4; ++i) {
        const unsigned row = g + 8 * (i / 2), col = 2 * t + i % 2;
        float acc = d[i];
        for (unsigned k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
        d[i] = acc;
    }
}
// Calls kernel(args...) where args[i] points at the i-th argument's bytes, like
// cuLaunchKernel's kernelParams.
template <typename... A, std::size_t... I>
void emu_call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

inline void emu_entry() {
    emu_body();
    emu_threads[threadIdx.x].state = EMU_DONE;  // returns to emu_scheduler via uc_link
}

// Opens the barrier `at` for every group of `size` threads whose live members all wait at it.
inline bool emu_release(emu_state at, unsigned size) {
    bool opened = false;
    for (unsigned g = 0; g < emu_threads.size(); g += size) {
        bool all = true, any = false;
        for (unsigned i = g; i < g + size; ++i) {
            all = all && (emu_threads[i].state == at || emu_threads[i].state == EMU_DONE);
            any = any || emu_threads[i].state == at;
        }
        if (all && any) {
            for (unsigned i = g; i < g + size; ++i)
                if (emu_threads[i].state == at) emu_threads[i].state = EMU_RUNNABLE;
            opened = true;
        }
    }
    return opened;
}

// Returns 0, or 1 after a deadlock (the stuck block's contexts are abandoned).
template <typename... A>
int emu_launch(void (*kernel)(A...), emu_dim3 grid, emu_dim3 block, void** args) {
    const unsigned n = block.x;  // the pagedkv kernels use 1-D blocks of whole warps
    constexpr std::size_t STACK = 256 * 1024;
    std::vector<char> stacks(STACK * n);
    gridDim = grid;
    blockDim = block;
    emu_body = [=] { emu_call(kernel, args, std::index_sequence_for<A...>{}); };
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = emu_dim3{x, y, z};
                emu_threads.assign(n, emu_thread{});
                for (unsigned t = 0; t < n; ++t) {
                    ucontext_t& c = emu_threads[t].ctx;
                    getcontext(&c);
                    c.uc_stack.ss_sp = stacks.data() + STACK * t;
                    c.uc_stack.ss_size = STACK;
                    c.uc_link = &emu_scheduler;
                    makecontext(&c, emu_entry, 0);
                }
                for (;;) {
                    bool ran = false, live = false;
                    for (unsigned t = 0; t < n; ++t) {
                        if (emu_threads[t].state != EMU_RUNNABLE) continue;
                        threadIdx = emu_dim3{t, 0, 0};
                        swapcontext(&emu_scheduler, &emu_threads[t].ctx);
                        ran = true;
                    }
                    for (const emu_thread& t : emu_threads) live = live || t.state != EMU_DONE;
                    if (!live) break;
                    const bool opened = emu_release(EMU_AT_WARP_BARRIER, 32) | emu_release(EMU_AT_BLOCK_BARRIER, n);
                    if (!ran && !opened) {
                        std::fprintf(stderr, "emulation: deadlock (divergent barrier or shuffle) in block %u,%u,%u\n", x, y, z);
                        return 1;
                    }
                }
            }
    return 0;
}

#endif  // PAGEDKV_HOST_EMULATION_H
