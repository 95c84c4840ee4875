// Shared pieces of the CPU BFP kernels (not part of the public API in bfp_cpu.h): mantissa
// loads and the per-ISA entry points that bfp_cpu_dispatch.cpp chooses between. Element
// conversions and loads / stores by DType: common/half_convert.h.
#pragma once

#include "bfp/bfp_cpu.h"
#include "bfp/bfp_rule.h"
#include "common/half_convert.h"

namespace llmcore {
namespace bfp {
namespace cpu {

// Mantissa i of a row, packed (bits <= 4) or not.
inline int load_mantissa(const uint8_t* row, int bits, int64_t i) {
  if (is_packed(bits)) return (i & 1) ? unpack_hi(row[i >> 1]) : unpack_lo(row[i >> 1]);
  return static_cast<int8_t>(row[i]);
}

// Per-ISA kernels: same contracts as the public functions of the same name. A null entry
// means "not vectorised on this ISA": the dispatcher uses the next lower one.
struct Kernels {
  decltype(&quantize_rows) quantize;
  decltype(&dequantize_rows) dequantize;
  decltype(&linear_rows) linear;
  decltype(&gemm_compute) gemm;
  decltype(&gemm_pack_b) pack_b;
};

// The portable B packing (any format); vector pack_b kernels hand it what they skip.
void gemm_pack_b_portable(const GemmPlan& p, const uint8_t* b_mant, int64_t b_row_stride,
                          const uint8_t* b_exp, int64_t b_exp_stride, int8_t* b_pack,
                          float* b_scale, int32_t* b_corr, int64_t p_begin, int64_t p_end);

namespace scalar { extern const Kernels kKernels; }
namespace avx2 { extern const Kernels kKernels; }
namespace avx512 {
extern const Kernels kKernels;
// linear_rows_typed on AVX-512 (needs F/BW/VL/VNNI; uses AVX512_BF16 when present).
void linear_typed(const void* x, DType xt, int64_t M, int64_t ldx, int64_t K,
                  const uint8_t* w_mant, int64_t w_row_stride, const uint8_t* w_exp,
                  int64_t exp_row_stride, int bits, int block, const float* bias, float* y,
                  int64_t ldy, int64_t n_begin, int64_t n_end);
}  // namespace avx512

}  // namespace cpu
}  // namespace bfp
}  // namespace llmcore
