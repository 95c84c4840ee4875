// The BFP quantisation rule for one element, shared by the CPU and CUDA kernels.
// Framework-free: no torch, usable from host and device code.
//
// One block x[0..B) with b mantissa bits (docs/formats.md, OCP MX scale rule):
//   amax = max |x_i|; any Inf/NaN in the block -> exponent byte 255 (E8M0 NaN), mantissas 0
//   e    = floor(log2(amax)) clamped to [-127, 127] (all-zero block: e = -127, byte 0)
//   m_i  = round(x_i * 2^(b-2-e)) clamped to +-(2^(b-1) - 1)
//   x_i ~= m_i * 2^(e-(b-2));   stored byte = e + 127
//
// Every multiplication below is by a power of two and exact; rounding is done without
// the x + 0.5 trick (which rounds 0.49999997 up), so the result is bit-exact.
#pragma once

#include <stdint.h>

#include "common/host_device.h"

namespace llmcore {
namespace bfp {

constexpr int kExpBias = 127;
constexpr uint8_t kNaNExponent = 255;

// 2^k as a float for k in [-149, 127] (subnormal below -126), 0 below, +inf above.
LLMCORE_HD float exp2i(int k) {
  if (k > 127) return bits_to_float(0x7f800000u);
  if (k >= -126) return bits_to_float(static_cast<uint32_t>(k + 127) << 23);
  if (k >= -149) return bits_to_float(1u << (k + 149));
  return 0.0f;
}

// Shared exponent e from the block's max |x| (finite). floor(log2) of a float is its
// unbiased exponent field; subnormals (field 0) and zero land on the clamp, -127.
LLMCORE_HD int block_exponent(float amax) {
  const int field = static_cast<int>((float_to_bits(amax) >> 23) & 0xff);
  return field == 0 ? -127 : field - 127;
}

LLMCORE_HD int max_mantissa(int bits) { return (1 << (bits - 1)) - 1; }

// Round v to an integer: half away from zero, or half to even.
LLMCORE_HD float round_half_away(float v) {
#if defined(__CUDA_ARCH__)
  const float t = truncf(v);  // exact
#else
  const float t = __builtin_truncf(v);  // exact
#endif
  const float frac = v - t;             // exact for |v| < 2^23
  if (frac >= 0.5f) return t + 1.0f;
  if (frac <= -0.5f) return t - 1.0f;
  return t;
}

LLMCORE_HD float round_half_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return __builtin_rintf(v);  // default FP environment: round to nearest even
#endif
}

// Mantissa of x in a block with shared exponent e (finite block).
LLMCORE_HD int quantize_element(float x, int e, int bits, bool round_even) {
  // x * 2^-e < 2 always (|x| <= amax < 2^(e+1)); then * 2^(b-2) < 2^(b-1). Underflow in
  // the first step only hits values that round to 0 anyway.
  const float v = (x * exp2i(-e)) * exp2i(bits - 2);
  const float r = round_even ? round_half_even(v) : round_half_away(v);
  const float lim = static_cast<float>(max_mantissa(bits));
  const float c = r > lim ? lim : (r < -lim ? -lim : r);
  return static_cast<int>(c);
}

// Scale of one block: value = mantissa * block_scale(byte, bits). NaN block -> NaN.
LLMCORE_HD float block_scale(uint8_t exp_byte, int bits) {
  if (exp_byte == kNaNExponent) return bits_to_float(0x7fc00000u);
  return exp2i(static_cast<int>(exp_byte) - kExpBias - (bits - 2));
}

// 4-bit packing: element 2i in the low nibble, 2i+1 in the high nibble (two's complement).
LLMCORE_HD uint8_t pack_nibbles(int lo, int hi) {
  return static_cast<uint8_t>((lo & 0xf) | ((hi & 0xf) << 4));
}
LLMCORE_HD int unpack_lo(uint8_t b) { return static_cast<int>(static_cast<int8_t>(b << 4)) >> 4; }
LLMCORE_HD int unpack_hi(uint8_t b) { return static_cast<int>(static_cast<int8_t>(b)) >> 4; }

LLMCORE_HD bool is_packed(int bits) { return bits <= 4; }

}  // namespace bfp
}  // namespace llmcore
