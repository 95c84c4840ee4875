// Framework-free CUDA launchers for the block-floating-point (BFP) ops (docs/bfp.md).
//
// The story: a BFP tensor is a matrix of integer mantissas (int8 [rows, K], or for
// mantissa_bits <= 4 two's-complement nibbles packed two per byte, uint8 [rows, ceil(K/2)])
// plus one E8M0 exponent byte per block of `block` consecutive elements of a row
// (uint8 [rows, ceil(K/block)], biased by 127; 255 = the block held Inf/NaN).
//
//   quantize        x [rows, K] float -> (mantissa, exponent), bit-exact with
//                   llmcore.reference.bfp_quantize (bfp_quantize.cu)
//   dequantize      (mantissa, exponent) -> y [rows, K] float, exact (bfp_quantize.cu)
//   linear_small_m  y [M, N] = x [M, K] @ dequant(w)[N, K]^T (+ bias), M <= 16: a streaming
//                   GEMV that reads the weight once with wide loads and dequantises in
//                   registers (bfp_gemv.cu)
//   gemm_int8       y [M, N] = A [M, K] (x) B [N, K]^T, both BFP with int8 mantissas and the
//                   same block of 16 or 32: int8 tensor cores, one MMA K-step per block,
//                   the exact int32 block product scaled in fp32 (bfp_gemm_w8a8.cu)
//
// Everything here takes raw device pointers, sizes, row strides (in elements of the
// pointed-to type; bytes for the uint8/int8 buffers) and a stream, and returns the
// cudaError_t of the launch (cudaErrorInvalidValue for arguments out of contract). No
// torch: the one torch binding is bfp_cuda_binding.cu.
//
// Numerics under --use_fast_math (setup.py): quantize/dequantize do their scaling with
// explicit non-FTZ PTX multiplies, so subnormal inputs, scales and outputs are exact.
// The fp32 accumulations of linear/gemm flush products below 2^-126 to zero.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "common/dtype.h"

namespace llmcore {
namespace bfp {
namespace cuda {

// Activation / output buffers are DType::kFloat32, kBFloat16 or kFloat16 (common/dtype.h).
// x [rows, k] (row stride ldx elements) -> mantissa [rows, mcols] (row stride ldm bytes;
// mcols = k, or ceil(k/2) when packed) and exponent [rows, ceil(k/block)] (row stride lde).
cudaError_t quantize(const void* x, DType xtype, int64_t rows, int64_t k, int64_t ldx,
                     int bits, int block, bool round_even, void* mantissa, int64_t ldm,
                     uint8_t* exponent, int64_t lde, cudaStream_t stream);

// (mantissa, exponent) -> y [rows, k] (row stride ldy elements) of ytype.
cudaError_t dequantize(const void* mantissa, int64_t ldm, const uint8_t* exponent,
                       int64_t lde, int64_t rows, int64_t k, int bits, int block, void* y,
                       DType ytype, int64_t ldy, cudaStream_t stream);

// Largest M linear_small_m accepts.
constexpr int kSmallMMax = 16;

// y [m, n] = x [m, k] @ dequant(w)[n, k]^T (+ bias [n]); x, bias and y share xtype.
// w_mantissa row stride ldw bytes, w_exponent row stride lde bytes. 1 <= m <= 16.
// Rows of w that are 16-byte aligned (8-byte when packed) are read with vector loads,
// others byte by byte. bias may be null.
cudaError_t linear_small_m(const void* x, DType xtype, int64_t m, int64_t k, int64_t ldx,
                           const void* w_mantissa, int64_t ldw, const uint8_t* w_exponent,
                           int64_t lde, int64_t n, int bits, int block, const void* bias,
                           void* y, int64_t ldy, cudaStream_t stream);

// Whether gemm_int8 handles these operands: int8 (unpacked, bits 5..8) mantissas and a
// block of 16 or 32.
inline bool gemm_int8_supported(int a_bits, int b_bits, int block) {
  return a_bits >= 5 && a_bits <= 8 && b_bits >= 5 && b_bits <= 8 &&
         (block == 16 || block == 32);
}

// y [m, n] (row stride ldy elements, ytype) = sum over K blocks of
//   (int32 dot of the block's mantissas) * 2^(ea-127-(a_bits-2)) * 2^(eb-127-(b_bits-2))
// accumulated in fp32, + bias_f32 [n] (may be null). a [m, k] int8 with row stride lda
// bytes, b [n, k] int8 with row stride ldb bytes: lda and ldb must be multiples of 16 and
// the pointers 16-byte aligned (the binding pads otherwise); bytes past k in a row are
// never read. Exponents: a_exp [m, ceil(k/block)] row stride ldae, b_exp likewise ldbe.
cudaError_t gemm_int8(const int8_t* a, int64_t lda, const uint8_t* a_exp, int64_t ldae,
                      const int8_t* b, int64_t ldb, const uint8_t* b_exp, int64_t ldbe,
                      int64_t m, int64_t n, int64_t k, int a_bits, int b_bits, int block,
                      const float* bias_f32, void* y, DType ytype, int64_t ldy,
                      cudaStream_t stream);

}  // namespace cuda
}  // namespace bfp
}  // namespace llmcore
