// BFP quantise and dequantise on the GPU, bit-exact with llmcore.reference.bfp.
//
// quantize:   x [rows, K] (fp32/bf16/fp16) -> mantissa [rows, K] int8 (or packed nibbles,
//             uint8 [rows, ceil(K/2)], for mantissa_bits <= 4), exponent [rows, ceil(K/B)].
// dequantize: the inverse map to fp32/bf16/fp16 [rows, K].
//
// Algorithm (quantize). A group of G lanes of one warp owns one block: G = 32 for blocks
// longer than 16 elements, else the power of two >= B, so a warp holds 32/G blocks. Each
// lane strides over its block's elements, taking max |x| as an unsigned bit pattern
// (exact, FTZ-proof, and >= 0x7f800000 flags Inf/NaN); xor shuffles within the group
// reduce it. The exponent follows from bfp_rule.h (block_exponent); mantissas from
// quantize_element's arithmetic with non-FTZ multiplies. Unpacked mantissas are written
// by the same group. Packed mantissas go to a second, elementwise kernel (one thread per
// output byte, reading back the exponents) because with an odd block size one byte can
// straddle two blocks.
// dequantize is elementwise: value = m * 2^(e-127-(bits-2)) (NaN for 255), exact in fp32,
// then rounded to nearest even for bf16/fp16.
//
// Compile alone: nvcc -std=c++17 -O3 -Icsrc -c csrc/bfp/bfp_quantize.cu
//   -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a
#include "bfp/bfp_cuda_common.cuh"

namespace llmcore {
namespace bfp {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// bfp_rule.h quantize_element with multiplies that keep subnormals (x * 2^-e may be a
// subnormal input or 2^-e a subnormal factor).
__device__ __forceinline__ int quantize_element_dev(float x, int e, int bits, bool round_even) {
  const float v = mul_noftz(mul_noftz(x, exp2i(-e)), exp2i(bits - 2));
  // A subnormal v rounds to 0 either way, so FTZ in the rounding below is harmless.
  const float r = round_even ? round_half_even(v) : round_half_away(v);
  const float lim = static_cast<float>(max_mantissa(bits));
  const float c = r > lim ? lim : (r < -lim ? -lim : r);
  return static_cast<int>(c);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
quantize_blocks_kernel(const T* __restrict__ x, int64_t rows, int64_t k, int64_t ldx, int bits,
                       int block, int64_t nb, int group, bool round_even,
                       int8_t* __restrict__ mant, int64_t ldm, uint8_t* __restrict__ expo,
                       int64_t lde) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t blk = warp * (32 / group) + lane / group;
  const int j0 = lane % group;
  const bool valid = blk < rows * nb;
  const int64_t row = valid ? blk / nb : 0;
  const int64_t kb = valid ? blk % nb : 0;
  const int64_t c0 = kb * block;
  const int len = valid ? static_cast<int>(min(static_cast<int64_t>(block), k - c0)) : 0;
  const T* xr = x + row * ldx + c0;

  uint32_t amax = 0;  // max |x| as bits; unsigned order = magnitude order, Inf/NaN on top
  for (int j = j0; j < len; j += group)
    amax = max(amax, float_to_bits(to_float(xr[j])) & 0x7fffffffu);
  for (int off = group >> 1; off > 0; off >>= 1)
    amax = max(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  if (!valid) return;  // after the last shuffle

  const bool nonfinite = amax >= 0x7f800000u;
  const int e = block_exponent(bits_to_float(amax));
  if (j0 == 0) expo[row * lde + kb] = nonfinite ? kNaNExponent : static_cast<uint8_t>(e + kExpBias);
  if (mant == nullptr) return;
  int8_t* mr = mant + row * ldm + c0;
  for (int j = j0; j < len; j += group)
    mr[j] = nonfinite ? 0 : static_cast<int8_t>(quantize_element_dev(to_float(xr[j]), e, bits, round_even));
}

// One thread per packed byte: elements 2p (low nibble) and 2p+1 (high nibble).
template <typename T>
__global__ void __launch_bounds__(kThreads)
quantize_packed_kernel(const T* __restrict__ x, int64_t rows, int64_t k, int64_t ldx, int bits,
                       int block, bool round_even, const uint8_t* __restrict__ expo, int64_t lde,
                       uint8_t* __restrict__ mant, int64_t ldm) {
  const int64_t mcols = (k + 1) / 2;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * mcols) return;
  const int64_t row = idx / mcols, p = idx % mcols;
  int m[2] = {0, 0};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t c = 2 * p + h;
    if (c < k) {
      const uint8_t eb = expo[row * lde + c / block];
      if (eb != kNaNExponent)
        m[h] = quantize_element_dev(to_float(x[row * ldx + c]), static_cast<int>(eb) - kExpBias,
                                    bits, round_even);
    }
  }
  mant[row * ldm + p] = pack_nibbles(m[0], m[1]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
dequantize_kernel(const uint8_t* __restrict__ mant, int64_t ldm, const uint8_t* __restrict__ expo,
                  int64_t lde, int64_t rows, int k, int bits, int block, T* __restrict__ y,
                  int64_t ldy) {
  const bool packed = is_packed(bits);
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const uint8_t* mr = mant + row * ldm;
    const uint8_t* er = expo + row * lde;
    T* yr = y + row * ldy;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < k; c += gridDim.x * blockDim.x) {
      int m;
      if (packed) {
        const uint8_t byte = mr[c >> 1];
        m = (c & 1) ? unpack_hi(byte) : unpack_lo(byte);
      } else {
        m = static_cast<int8_t>(mr[c]);
      }
      // m * 2^s is exact (|m| < 2^7 and the scale >= 2^-133): no rounding before the cast.
      yr[c] = from_float<T>(mul_noftz(static_cast<float>(m), scale_of(er[c / block], bits)));
    }
  }
}

template <typename T>
cudaError_t quantize_t(const T* x, int64_t rows, int64_t k, int64_t ldx, int bits, int block,
                       bool round_even, void* mantissa, int64_t ldm, uint8_t* exponent,
                       int64_t lde, cudaStream_t stream) {
  const int64_t nb = ceil_div(k, block);
  int group = 32;
  if (block <= 16) {
    group = 1;
    while (group < block) group <<= 1;
  }
  const int64_t warps = ceil_div(rows * nb, 32 / group);
  const int64_t grid = ceil_div(warps * 32, kThreads);
  if (grid > 0x7fffffff) return cudaErrorInvalidValue;
  const bool packed = is_packed(bits);
  quantize_blocks_kernel<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      x, rows, k, ldx, bits, block, nb, group, round_even,
      packed ? nullptr : static_cast<int8_t*>(mantissa), ldm, exponent, lde);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !packed) return err;
  const int64_t grid2 = ceil_div(rows * ((k + 1) / 2), kThreads);
  if (grid2 > 0x7fffffff) return cudaErrorInvalidValue;
  quantize_packed_kernel<T><<<static_cast<unsigned>(grid2), kThreads, 0, stream>>>(
      x, rows, k, ldx, bits, block, round_even, exponent, lde, static_cast<uint8_t*>(mantissa),
      ldm);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dequantize_t(const uint8_t* mantissa, int64_t ldm, const uint8_t* exponent,
                         int64_t lde, int64_t rows, int64_t k, int bits, int block, T* y,
                         int64_t ldy, cudaStream_t stream) {
  if (k > 0x7fffffff) return cudaErrorInvalidValue;
  const int64_t gx = ceil_div(k, kThreads), gy = rows;
  const dim3 grid(static_cast<unsigned>(gx < 64 ? gx : 64), static_cast<unsigned>(gy < 65535 ? gy : 65535));
  dequantize_kernel<T><<<grid, kThreads, 0, stream>>>(mantissa, ldm, exponent, lde, rows,
                                                      static_cast<int>(k), bits, block, y, ldy);
  return cudaGetLastError();
}

}  // namespace

cudaError_t quantize(const void* x, DType xtype, int64_t rows, int64_t k, int64_t ldx,
                     int bits, int block, bool round_even, void* mantissa, int64_t ldm,
                     uint8_t* exponent, int64_t lde, cudaStream_t stream) {
  if (!valid_format(bits, block) || rows < 0 || k < 0) return cudaErrorInvalidValue;
  if (rows == 0 || k == 0) return cudaSuccess;
  switch (xtype) {
    case DType::kFloat32:
      return quantize_t(static_cast<const float*>(x), rows, k, ldx, bits, block, round_even,
                        mantissa, ldm, exponent, lde, stream);
    case DType::kBFloat16:
      return quantize_t(static_cast<const __nv_bfloat16*>(x), rows, k, ldx, bits, block,
                        round_even, mantissa, ldm, exponent, lde, stream);
    case DType::kFloat16:
      return quantize_t(static_cast<const __half*>(x), rows, k, ldx, bits, block, round_even,
                        mantissa, ldm, exponent, lde, stream);
    case DType::kInt8: break;  // not an activation dtype
  }
  return cudaErrorInvalidValue;
}

cudaError_t dequantize(const void* mantissa, int64_t ldm, const uint8_t* exponent,
                       int64_t lde, int64_t rows, int64_t k, int bits, int block, void* y,
                       DType ytype, int64_t ldy, cudaStream_t stream) {
  if (!valid_format(bits, block) || rows < 0 || k < 0) return cudaErrorInvalidValue;
  if (rows == 0 || k == 0) return cudaSuccess;
  const auto* m = static_cast<const uint8_t*>(mantissa);
  switch (ytype) {
    case DType::kFloat32:
      return dequantize_t(m, ldm, exponent, lde, rows, k, bits, block, static_cast<float*>(y),
                          ldy, stream);
    case DType::kBFloat16:
      return dequantize_t(m, ldm, exponent, lde, rows, k, bits, block,
                          static_cast<__nv_bfloat16*>(y), ldy, stream);
    case DType::kFloat16:
      return dequantize_t(m, ldm, exponent, lde, rows, k, bits, block, static_cast<__half*>(y),
                          ldy, stream);
    case DType::kInt8: break;  // not an activation dtype
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace bfp
}  // namespace llmcore
