// Device-side element conversions shared by the CUDA kernels of every op family: fp32 <->
// float / __half / __nv_bfloat16 (widening is exact; narrowing rounds to nearest even,
// cvt.rn, no FTZ), two floats packed into one 32-bit register of 16-bit elements, and
// run-time DType loads / stores. The host-side forms are in half_convert.h. No torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "common/dtype.h"

namespace llmcore {

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

// Two floats -> one register of two 16-bit elements (lo = a, the lower column / address),
// round to nearest even.
template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Element i of a float buffer of type t (kFloat32, kBFloat16 or kFloat16), for prologues
// and epilogues that are not worth a template.
__device__ __forceinline__ float load_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kBFloat16: return to_float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::kFloat16: return to_float(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}
__device__ __forceinline__ void store_float(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = from_float<__nv_bfloat16>(v); break;
    case DType::kFloat16: static_cast<__half*>(p)[i] = from_float<__half>(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

}  // namespace llmcore
