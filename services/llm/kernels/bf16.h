/* bf16 <-> fp32 as torch converts them (c10::BFloat16): widening is exact; narrowing rounds to nearest even and
   turns every NaN into the one quiet NaN torch writes, 0x7FC0. Shared by the C kernels in this directory. */
#ifndef RAG_PLATFORM_BF16_H
#define RAG_PLATFORM_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? 0x7FC0 : rounded;
}

#endif
