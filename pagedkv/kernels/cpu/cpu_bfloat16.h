// bfloat16 <-> float32 for the CPU kernels (cpu_kernels.c, cpu_bf16.c).
#pragma once
#include <stdint.h>

static inline float bf16_to_float(uint16_t x) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)x << 16};
    return v.f;
}

// Round to nearest even, as torch converts float32 to bfloat16; NaN stays a quiet NaN.
static inline uint16_t float_to_bf16(float f) {
    union { float f; uint32_t u; } v = {.f = f};
    if (f != f) return 0x7FC0;
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
}
