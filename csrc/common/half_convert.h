// Scalar float16 / bfloat16 <-> float32 conversions with IEEE round-to-nearest-even (NaN
// stays a quiet NaN), for the framework-free CPU kernels of every op family. The fp16
// forms are the FP16 library's branch-free ones; they rely on the default rounding mode,
// which the build keeps (no -ffast-math for host code).
#pragma once

#include <stdint.h>
#include <string.h>

namespace llmcore {
namespace half_detail {

inline float as_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t as_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

}  // namespace half_detail

inline float bf16_to_f32(uint16_t h) {
  return half_detail::as_float(static_cast<uint32_t>(h) << 16);
}

inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = half_detail::as_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float f16_to_f32(uint16_t h) {
  using half_detail::as_bits;
  using half_detail::as_float;
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = as_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = as_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t r = sign | (two_w < (1u << 27) ? as_bits(denormalized) : as_bits(normalized));
  return as_float(r);
}

inline uint16_t f32_to_f16(float f) {
  using half_detail::as_bits;
  using half_detail::as_float;
  const float abs_f = as_float(as_bits(f) & 0x7fffffffu);
  float base = (abs_f * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = as_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = as_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = as_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

}  // namespace llmcore
