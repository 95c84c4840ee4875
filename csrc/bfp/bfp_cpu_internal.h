// Shared pieces of the CPU BFP kernels (not part of the public API in bfp_cpu.h): scalar
// float16/bfloat16 conversions with IEEE round-to-nearest-even, and the per-ISA entry
// points that bfp_cpu_dispatch.cpp chooses between.
#pragma once

#include "bfp/bfp_cpu.h"
#include "bfp/bfp_rule.h"

namespace llmcore {
namespace bfp {
namespace cpu {

inline float bf16_to_f32(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even, as torch does; NaN stays a quiet NaN.
inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// IEEE binary16 <-> binary32 without F16C (the FP16 library's branch-free forms; they rely
// on default rounding, which the build keeps: no -ffast-math).
inline float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t r = sign | (two_w < (1u << 27) ? float_to_bits(denormalized)
                                                 : float_to_bits(normalized));
  return bits_to_float(r);
}

inline uint16_t f32_to_f16(float f) {
  const float abs_f = bits_to_float(float_to_bits(f) & 0x7fffffffu);
  float base = (abs_f * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline float load_float(const void* p, FloatType t, int64_t i) {
  switch (t) {
    case FloatType::kBF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case FloatType::kF16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

inline void store_float(void* p, FloatType t, int64_t i, float v) {
  switch (t) {
    case FloatType::kBF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    case FloatType::kF16: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

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
void linear_typed(const void* x, FloatType xt, int64_t M, int64_t ldx, int64_t K,
                  const uint8_t* w_mant, int64_t w_row_stride, const uint8_t* w_exp,
                  int64_t exp_row_stride, int bits, int block, const float* bias, float* y,
                  int64_t ldy, int64_t n_begin, int64_t n_end);
}  // namespace avx512

}  // namespace cpu
}  // namespace bfp
}  // namespace llmcore
