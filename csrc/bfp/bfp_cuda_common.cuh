// Device helpers shared by the BFP CUDA kernels (bfp_quantize.cu, bfp_gemv.cu,
// bfp_gemm_w8a8.cu): the E8M0 block scale and format checks, with the shared PTX wrappers
// and element conversions of common/. No torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "bfp/bfp_cuda.cuh"
#include "bfp/bfp_rule.h"
#include "common/half_convert.cuh"
#include "common/ptx.cuh"

namespace llmcore {
namespace bfp {
namespace cuda {

// The FTZ-proof multiply (common/ptx.cuh); to_float / from_float / load_float /
// store_float of the three activation dtypes are common/half_convert.cuh's.
using ptx::mul_noftz;

// value = mantissa * scale; exponent byte 255 -> NaN (bfp_rule.h block_scale).
__device__ __forceinline__ float scale_of(uint8_t exp_byte, int bits) {
  return block_scale(exp_byte, bits);
}

inline bool valid_format(int bits, int block) {
  return bits >= 2 && bits <= 8 && block >= 1 && block <= 1024;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace bfp
}  // namespace llmcore
