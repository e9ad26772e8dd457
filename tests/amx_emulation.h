// AMX's tile instructions in plain C, so that the kernels' AMX paths run (slowly) and are tested
// on CPUs without AMX. Built into the kernels with
//   PAGEDKV_CPU_CFLAGS="-mamx-tile -mamx-int8 -mamx-bf16 -include tests/amx_emulation.h"
// (tests/test_amx_emulation.py). Each thread has its own eight tiles and configuration, as on the
// hardware, and a tile instruction before LDTILECFG, or on a tile the configuration leaves out,
// aborts where the hardware would fault. The permission AMX needs from Linux is granted.
// Semantics from Intel's SDM (TDPBSUD and kin, TDPBF16PS: inputs' denormals as zero, each
// product added in float32, round to nearest even).
#ifndef PAGEDKV_AMX_EMULATION_H
#define PAGEDKV_AMX_EMULATION_H

#include <immintrin.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} AmxEmuConfig;

// Weak, so that every file of the library shares one set per thread.
__thread uint8_t amx_emu_tile[8][16][64] __attribute__((weak, aligned(64)));
__thread AmxEmuConfig amx_emu_config __attribute__((weak));

static inline void amx_emu_fault(const char *what, int t) {
    fprintf(stderr, "AMX emulation: %s (tile %d)\n", what, t);
    abort();
}

static inline void amx_emu_check(int t) {
    if (amx_emu_config.palette != 1) amx_emu_fault("tile instruction before LDTILECFG", t);
    if (t < 0 || t > 7 || !amx_emu_config.rows[t] || !amx_emu_config.colsb[t]) amx_emu_fault("unconfigured tile", t);
}

static inline void amx_emu_loadconfig(const void *config) {
    memcpy(&amx_emu_config, config, sizeof amx_emu_config);
    for (int t = 0; t < 8; t++)
        if (amx_emu_config.palette == 1 && (amx_emu_config.rows[t] > 16 || amx_emu_config.colsb[t] > 64 ||
                                            amx_emu_config.colsb[t] % 4))
            amx_emu_fault("configuration outside palette 1", t);
    memset(amx_emu_tile, 0, sizeof amx_emu_tile);
}

static inline void amx_emu_release(void) {
    memset(&amx_emu_config, 0, sizeof amx_emu_config);
    memset(amx_emu_tile, 0, sizeof amx_emu_tile);
}

static inline void amx_emu_loadd(int t, const void *base, long stride) {
    amx_emu_check(t);
    memset(amx_emu_tile[t], 0, sizeof amx_emu_tile[t]);
    for (int r = 0; r < amx_emu_config.rows[t]; r++)
        memcpy(amx_emu_tile[t][r], (const uint8_t *)base + r * stride, amx_emu_config.colsb[t]);
}

static inline void amx_emu_stored(int t, void *base, long stride) {
    amx_emu_check(t);
    for (int r = 0; r < amx_emu_config.rows[t]; r++)
        memcpy((uint8_t *)base + r * stride, amx_emu_tile[t][r], amx_emu_config.colsb[t]);
}

static inline void amx_emu_zero(int t) {
    amx_emu_check(t);
    memset(amx_emu_tile[t], 0, sizeof amx_emu_tile[t]);
}

// C (M x N dwords) += A (M x K dwords) . B (K x N dwords), shapes checked as the hardware does.
static inline void amx_emu_shapes(int c, int a, int b) {
    amx_emu_check(c), amx_emu_check(a), amx_emu_check(b);
    const AmxEmuConfig *g = &amx_emu_config;
    if (g->rows[c] != g->rows[a] || g->colsb[a] / 4 != g->rows[b] || g->colsb[b] != g->colsb[c])
        amx_emu_fault("tile shapes do not match", c);
}

// Byte products: a_signed / b_signed say how each operand's bytes are read.
static inline void amx_emu_dp_bytes(int c, int a, int b, int a_signed, int b_signed) {
    amx_emu_shapes(c, a, b);
    for (int m = 0; m < amx_emu_config.rows[c]; m++)
        for (int n = 0; n < amx_emu_config.colsb[c] / 4; n++) {
            uint32_t sum;
            memcpy(&sum, &amx_emu_tile[c][m][4 * n], 4);
            for (int k = 0; k < amx_emu_config.colsb[a] / 4; k++)
                for (int i = 0; i < 4; i++) {
                    const uint8_t x = amx_emu_tile[a][m][4 * k + i], y = amx_emu_tile[b][k][4 * n + i];
                    sum += (uint32_t)((a_signed ? (int32_t)(int8_t)x : (int32_t)x) *
                                      (b_signed ? (int32_t)(int8_t)y : (int32_t)y));
                }
            memcpy(&amx_emu_tile[c][m][4 * n], &sum, 4);
        }
}

static inline float amx_emu_bf16(const uint8_t *p) {
    uint32_t bits = (uint32_t)(p[0] | p[1] << 8) << 16;
    if (!(bits & 0x7f800000u)) bits &= 0x80000000u;  // denormals as zero
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline void amx_emu_dp_bf16(int c, int a, int b) {
    amx_emu_shapes(c, a, b);
    for (int m = 0; m < amx_emu_config.rows[c]; m++)
        for (int n = 0; n < amx_emu_config.colsb[c] / 4; n++) {
            volatile float sum;  // each addition rounded to float32, never fused or kept wider
            float start;
            memcpy(&start, &amx_emu_tile[c][m][4 * n], 4);
            sum = start;
            for (int k = 0; k < amx_emu_config.colsb[a] / 4; k++)
                for (int i = 0; i < 2; i++) {
                    const float p = amx_emu_bf16(&amx_emu_tile[a][m][4 * k + 2 * i]) *
                                    amx_emu_bf16(&amx_emu_tile[b][k][4 * n + 2 * i]);
                    sum = sum + p;
                }
            float out = sum;
            uint32_t bits;
            memcpy(&bits, &out, 4);
            if (!(bits & 0x7f800000u)) bits &= 0x80000000u;  // denormal results flushed
            memcpy(&amx_emu_tile[c][m][4 * n], &bits, 4);
        }
}

// Linux's permission for AMX's tile state: granted; every other system call as it is.
static inline long amx_emu_syscall(long number, ...) {
    va_list args;
    va_start(args, number);
    long a[6];
    for (int i = 0; i < 6; i++) a[i] = va_arg(args, long);
    va_end(args);
    if (number == SYS_arch_prctl && a[0] == 0x1023) return 0;  // ARCH_REQ_XCOMP_PERM
    return syscall(number, a[0], a[1], a[2], a[3], a[4], a[5]);
}

#undef _tile_loadd
#undef _tile_stream_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbssd
#undef _tile_dpbsud
#undef _tile_dpbusd
#undef _tile_dpbuud
#undef _tile_dpbf16ps
#define _tile_loadconfig amx_emu_loadconfig
#define _tile_release amx_emu_release
#define _tile_loadd(t, base, stride) amx_emu_loadd(t, base, stride)
#define _tile_stream_loadd(t, base, stride) amx_emu_loadd(t, base, stride)
#define _tile_stored(t, base, stride) amx_emu_stored(t, base, stride)
#define _tile_zero(t) amx_emu_zero(t)
#define _tile_dpbssd(c, a, b) amx_emu_dp_bytes(c, a, b, 1, 1)
#define _tile_dpbsud(c, a, b) amx_emu_dp_bytes(c, a, b, 1, 0)
#define _tile_dpbusd(c, a, b) amx_emu_dp_bytes(c, a, b, 0, 1)
#define _tile_dpbuud(c, a, b) amx_emu_dp_bytes(c, a, b, 0, 0)
#define _tile_dpbf16ps(c, a, b) amx_emu_dp_bf16(c, a, b)
#define syscall amx_emu_syscall

#endif
