/* What the AMX kernels share (`common/dense_attention_cpu.c`, `services/llm/kernels/matmul_cpu.c`): whether this
   build has AMX code, Linux's tile-state request, and the tile configuration's layout. `c_build` puts this
   directory on every kernel's include path. */

#ifndef RAG_AMX_H
#define RAG_AMX_H

#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <omp.h>
#define HAVE_AMX 1
#else
#define HAVE_AMX 0
#endif

/* Linux: a process must ask for the AMX tile state before its first tile instruction. */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* 1 where this build has the AMX kernel and Linux let this process use the tiles, else 0 (`c_build` calls it
   when it loads the library). */
int amx_available(void) {
#if HAVE_AMX
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
    return 0;
#endif
}

/* `_tile_loadconfig`'s operand (palette 1). */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} TileConfig;

#endif
