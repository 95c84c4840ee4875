// Host/device portability for the headers that CPU and CUDA kernels share: LLMCORE_HD
// marks a function callable from both, and the bit casts between a float and its IEEE
// bits. Framework-free, no CUDA headers needed.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define LLMCORE_HD __host__ __device__ __forceinline__
#else
#define LLMCORE_HD inline
#endif

namespace llmcore {

LLMCORE_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
#endif
}

LLMCORE_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
#endif
}

}  // namespace llmcore
