// Device helpers shared by the BFP CUDA kernels (bfp_quantize.cu, bfp_gemv.cu,
// bfp_gemm_w8a8.cu): float loads/stores of the three activation dtypes, FTZ-proof
// multiplies, and the E8M0 block scale. No torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "bfp/bfp_cuda.cuh"
#include "bfp/bfp_rule.h"

namespace llmcore {
namespace bfp {
namespace cuda {

// a * b rounded to nearest, never flushing subnormal inputs or results to zero, whatever
// -ftz / --use_fast_math says (an explicit mul.rn.f32 has no .ftz).
__device__ __forceinline__ float mul_noftz(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// Element loads / stores as fp32. The bf16/fp16 -> fp32 conversions are exact; fp32 ->
// bf16/fp16 rounds to nearest even (cvt.rn, no FTZ).
template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <> __device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// Run-time dtype versions, for prologues/epilogues that are not worth a template.
__device__ __forceinline__ float load_float(const void* p, int64_t i, FloatType t) {
  switch (t) {
    case FloatType::kBFloat16: return to_float(static_cast<const __nv_bfloat16*>(p)[i]);
    case FloatType::kFloat16: return to_float(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}
__device__ __forceinline__ void store_float(void* p, int64_t i, FloatType t, float v) {
  switch (t) {
    case FloatType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = from_float<__nv_bfloat16>(v); break;
    case FloatType::kFloat16: static_cast<__half*>(p)[i] = from_float<__half>(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

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
