// Writes new keys/values into a KV cache, in place (docs/decode.md).
//
// k, v [B, T, Hkv, D] (contiguous, fp32/bf16/fp16) go to positions start_pos[b] + t of
// each sequence: cache row (b, pos) when contiguous, (block_table[b][pos / page_size],
// pos % page_size) when paged. Rows whose position is outside [0, capacity) or whose page
// id is outside [0, num_pages) are skipped; nothing else of the cache is written.
//
//  - Float cache (same dtype as k): one thread per element, a plain copy.
//  - MXINT8 cache: one warp per 32-element block of D of one (b, t, kv head) row, lane i
//    holding element i (zero past D, as docs/formats.md pads): max |x| as bits reduced by xor
//    shuffles, the shared exponent and the mantissas by bfp_rule.h (8 bits, round half
//    away from zero) with non-FTZ multiplies: bit-exact with bfp_quantize and
//    llmcore.reference.bfp. The block's exponent byte goes to k/v_exponent.
//
// Compile alone: nvcc -std=c++17 -O3 -Icsrc -c csrc/decode/kv_cache_append.cu
//   -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bfp/bfp_rule.h"
#include "common/half_convert.cuh"
#include "common/ptx.cuh"
#include "decode/decode_cuda.cuh"

namespace llmcore {
namespace decode {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBits = 8;    // MXINT8
constexpr int kBlock = 32;

// (i0, i1) = (batch or page, row) of position pos of sequence b, or false when pos is
// outside [0, capacity) or its page id outside [0, num_pages).
__device__ __forceinline__ bool locate_row(const CacheGeometry& g, int b, int64_t pos,
                                           int64_t& i0, int64_t& i1) {
  if (pos < 0 || pos >= cache_capacity(g)) return false;
  if (g.block_table == nullptr) {
    if (b >= g.dim0) return false;
    i0 = b;
    i1 = pos;
    return true;
  }
  const int64_t slot = pos / g.dim1;
  const int32_t page = g.block_table[b * g.bt_stride + slot];
  if (page < 0 || page >= g.dim0) return false;
  i0 = page;
  i1 = pos - slot * g.dim1;
  return true;
}

// Float cache: element i of k/v [B, T, Hkv, D] (E: a same-size integer type, a raw copy).
template <typename E>
__global__ void __launch_bounds__(kThreads)
append_float_kernel(const KvCacheAppendParams p, int64_t total) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= total) return;
  const int d = static_cast<int>(i % p.head_dim);
  int64_t rest = i / p.head_dim;
  const int h = static_cast<int>(rest % p.kv_heads);
  rest /= p.kv_heads;
  const int t = static_cast<int>(rest % p.new_tokens);
  const int b = static_cast<int>(rest / p.new_tokens);
  int64_t i0, i1;
  if (!locate_row(p.geo, b, static_cast<int64_t>(p.start_pos[b]) + t, i0, i1)) return;
  static_cast<E*>(p.k_cache)[i0 * p.k_strides.s0 + i1 * p.k_strides.s1 + h * p.k_strides.s2 + d] =
      static_cast<const E*>(p.k)[i];
  static_cast<E*>(p.v_cache)[i0 * p.v_strides.s0 + i1 * p.v_strides.s1 + h * p.v_strides.s2 + d] =
      static_cast<const E*>(p.v)[i];
}

// bfp_rule.h quantize_element with multiplies that keep subnormals.
__device__ __forceinline__ int quantize_mxint8(float x, int e) {
  const float v = ptx::mul_noftz(ptx::mul_noftz(x, bfp::exp2i(-e)), bfp::exp2i(kBits - 2));
  const float r = bfp::round_half_away(v);  // a subnormal v rounds to 0 either way
  const float lim = static_cast<float>(bfp::max_mantissa(kBits));
  const float c = r > lim ? lim : (r < -lim ? -lim : r);
  return static_cast<int>(c);
}

// Quantise one 32-element block held one element per lane (x = 0 past D) and store it.
__device__ __forceinline__ void quantize_block(float x, bool in_row, int lane, int8_t* mant,
                                               uint8_t* expo) {
  uint32_t amax = float_to_bits(x) & 0x7fffffffu;  // Inf/NaN order on top
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = max(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const bool nonfinite = amax >= 0x7f800000u;
  const int e = bfp::block_exponent(bits_to_float(amax));
  if (lane == 0)
    *expo = nonfinite ? bfp::kNaNExponent : static_cast<uint8_t>(e + bfp::kExpBias);
  if (in_row) *mant = nonfinite ? 0 : static_cast<int8_t>(quantize_mxint8(x, e));
}

// MXINT8 cache: warp w handles block (w % nb) of row (w / nb) of k/v [B*T*Hkv, D].
template <typename T>
__global__ void __launch_bounds__(kThreads)
append_mxint8_kernel(const KvCacheAppendParams p, int64_t warps_total) {
  const int lane = threadIdx.x & 31;
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  if (w >= warps_total) return;  // whole warps: w is warp-uniform
  const int nb = (p.head_dim + kBlock - 1) / kBlock;
  const int blk = static_cast<int>(w % nb);
  const int64_t row = w / nb;  // (b * T + t) * Hkv + h
  const int h = static_cast<int>(row % p.kv_heads);
  const int64_t bt = row / p.kv_heads;
  const int t = static_cast<int>(bt % p.new_tokens);
  const int b = static_cast<int>(bt / p.new_tokens);
  int64_t i0, i1;
  if (!locate_row(p.geo, b, static_cast<int64_t>(p.start_pos[b]) + t, i0, i1)) return;
  const int c = blk * kBlock + lane;
  const bool in_row = c < p.head_dim;
  const int64_t src = row * p.head_dim + c;
  const float kx = in_row ? to_float(static_cast<const T*>(p.k)[src]) : 0.0f;
  const float vx = in_row ? to_float(static_cast<const T*>(p.v)[src]) : 0.0f;
  int8_t* km = static_cast<int8_t*>(p.k_cache) + i0 * p.k_strides.s0 + i1 * p.k_strides.s1 +
               h * p.k_strides.s2 + (in_row ? c : 0);
  int8_t* vm = static_cast<int8_t*>(p.v_cache) + i0 * p.v_strides.s0 + i1 * p.v_strides.s1 +
               h * p.v_strides.s2 + (in_row ? c : 0);
  uint8_t* ke = p.k_exponent + i0 * p.ke_strides.s0 + i1 * p.ke_strides.s1 + h * p.ke_strides.s2 + blk;
  uint8_t* ve = p.v_exponent + i0 * p.ve_strides.s0 + i1 * p.ve_strides.s1 + h * p.ve_strides.s2 + blk;
  quantize_block(kx, in_row, lane, km, ke);
  quantize_block(vx, in_row, lane, vm, ve);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

cudaError_t kv_cache_append(const KvCacheAppendParams& p, cudaStream_t stream) {
  if (p.batch < 0 || p.new_tokens < 0 || p.kv_heads < 0 || p.head_dim < 0 || p.geo.dim0 < 0 ||
      p.geo.dim1 < 0 || (p.geo.block_table != nullptr && p.geo.dim1 == 0))
    return cudaErrorInvalidValue;
  if (p.int8_cache && (p.k_exponent == nullptr || p.v_exponent == nullptr))
    return cudaErrorInvalidValue;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.new_tokens * p.kv_heads;
  if (rows == 0 || p.head_dim == 0) return cudaSuccess;
  if (!p.int8_cache) {
    const int64_t total = rows * p.head_dim;
    const int64_t grid = ceil_div(total, kThreads);
    if (grid > 0x7fffffff) return cudaErrorInvalidValue;
    if (p.dtype == DType::kFloat32)
      append_float_kernel<uint32_t><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p, total);
    else
      append_float_kernel<uint16_t><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p, total);
    return cudaGetLastError();
  }
  const int64_t warps = rows * ceil_div(p.head_dim, kBlock);
  const int64_t grid = ceil_div(warps * 32, kThreads);
  if (grid > 0x7fffffff) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32:
      append_mxint8_kernel<float><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p, warps);
      break;
    case DType::kBFloat16:
      append_mxint8_kernel<__nv_bfloat16><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p, warps);
      break;
    case DType::kFloat16:
      append_mxint8_kernel<__half><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p, warps);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace decode
}  // namespace llmcore
