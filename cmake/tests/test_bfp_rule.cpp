// Native checks of csrc/bfp/bfp_rule.h, the per-element BFP rule shared by the CPU and
// CUDA kernels: exp2i edges, block_exponent of zero/subnormals/powers of two, both
// rounding modes on ties, saturation, block_scale and nibble packing.
// Built and run by cmake/CMakeLists.txt (ctest), optionally under ASan/UBSan.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "bfp/bfp_rule.h"

using namespace llmcore;
using namespace llmcore::bfp;

static int g_failures = 0;

#define EXPECT_EQ(a, b)                                                                  \
  do {                                                                                   \
    const auto va = (a);                                                                 \
    const auto vb = (b);                                                                 \
    if (!(va == vb)) {                                                                   \
      ++g_failures;                                                                      \
      fprintf(stderr, "%s:%d: %s == %s failed (%.9g vs %.9g)\n", __FILE__, __LINE__, #a, \
              #b, static_cast<double>(va), static_cast<double>(vb));                     \
    }                                                                                    \
  } while (0)

#define EXPECT_TRUE(c)                                                                   \
  do {                                                                                   \
    if (!(c)) {                                                                          \
      ++g_failures;                                                                      \
      fprintf(stderr, "%s:%d: %s failed\n", __FILE__, __LINE__, #c);                     \
    }                                                                                    \
  } while (0)

static float f_of(uint32_t u) { return bits_to_float(u); }

static void test_exp2i() {
  EXPECT_EQ(exp2i(0), 1.0f);
  EXPECT_EQ(exp2i(1), 2.0f);
  EXPECT_EQ(exp2i(-1), 0.5f);
  EXPECT_EQ(float_to_bits(exp2i(127)), 0x7f000000u);
  EXPECT_TRUE(isinf(exp2i(128)));
  EXPECT_EQ(float_to_bits(exp2i(-126)), 0x00800000u);  // smallest normal
  EXPECT_EQ(float_to_bits(exp2i(-127)), 0x00400000u);  // subnormal
  EXPECT_EQ(float_to_bits(exp2i(-149)), 0x00000001u);  // smallest subnormal
  EXPECT_EQ(exp2i(-150), 0.0f);
  for (int k = -149; k <= 127; ++k) EXPECT_EQ(static_cast<double>(exp2i(k)), ldexp(1.0, k));
}

static void test_block_exponent() {
  EXPECT_EQ(block_exponent(0.0f), -127);
  EXPECT_EQ(block_exponent(f_of(0x00000001u)), -127);  // subnormals clamp to -127
  EXPECT_EQ(block_exponent(f_of(0x007fffffu)), -127);
  EXPECT_EQ(block_exponent(f_of(0x00800000u)), -126);
  EXPECT_EQ(block_exponent(1.0f), 0);
  EXPECT_EQ(block_exponent(1.5f), 0);
  EXPECT_EQ(block_exponent(f_of(0x3f7fffffu)), -1);  // just below 1
  EXPECT_EQ(block_exponent(2.0f), 1);
  EXPECT_EQ(block_exponent(f_of(0x7f7fffffu)), 127);  // FLT_MAX
  for (int k = -126; k <= 127; ++k) EXPECT_EQ(block_exponent(exp2i(k)), k);
}

static void test_rounding() {
  EXPECT_EQ(round_half_away(0.5f), 1.0f);
  EXPECT_EQ(round_half_away(-0.5f), -1.0f);
  EXPECT_EQ(round_half_away(1.5f), 2.0f);
  EXPECT_EQ(round_half_away(2.5f), 3.0f);
  EXPECT_EQ(round_half_away(-2.5f), -3.0f);
  EXPECT_EQ(round_half_away(0.49999997f), 0.0f);  // the x + 0.5 trick would give 1
  EXPECT_EQ(round_half_away(2.4f), 2.0f);
  EXPECT_EQ(round_half_even(0.5f), 0.0f);
  EXPECT_EQ(round_half_even(1.5f), 2.0f);
  EXPECT_EQ(round_half_even(2.5f), 2.0f);
  EXPECT_EQ(round_half_even(-2.5f), -2.0f);
  EXPECT_EQ(round_half_even(3.5f), 4.0f);
  EXPECT_EQ(round_half_even(0.49999997f), 0.0f);
}

static void test_quantize_element() {
  // 8 bits, e = 0: m = round(x * 64), |m| <= 127
  EXPECT_EQ(quantize_element(1.0f, 0, 8, false), 64);
  EXPECT_EQ(quantize_element(1.5f / 64, 0, 8, false), 2);
  EXPECT_EQ(quantize_element(1.5f / 64, 0, 8, true), 2);
  EXPECT_EQ(quantize_element(2.5f / 64, 0, 8, false), 3);
  EXPECT_EQ(quantize_element(2.5f / 64, 0, 8, true), 2);
  EXPECT_EQ(quantize_element(-2.5f / 64, 0, 8, false), -3);
  EXPECT_EQ(quantize_element(-2.5f / 64, 0, 8, true), -2);
  EXPECT_EQ(quantize_element(f_of(0x3fffffffu), 0, 8, false), 127);  // 127.99.. saturates
  EXPECT_EQ(quantize_element(-1.9999999f, 0, 8, true), -127);
  // 4 bits, e = 0: m = round(x * 4), |m| <= 7
  EXPECT_EQ(quantize_element(1.75f, 0, 4, false), 7);
  EXPECT_EQ(quantize_element(1.9f, 0, 4, false), 7);
  EXPECT_EQ(quantize_element(-1.9f, 0, 4, false), -7);
  EXPECT_EQ(quantize_element(0.375f, 0, 4, false), 2);  // 1.5 -> 2
  EXPECT_EQ(quantize_element(0.625f, 0, 4, true), 2);   // 2.5 -> 2
  // 2 bits: m in {-1, 0, 1}
  EXPECT_EQ(quantize_element(1.0f, 0, 2, false), 1);
  EXPECT_EQ(quantize_element(-1.5f, 0, 2, false), -1);
  EXPECT_EQ(quantize_element(0.5f, 0, 2, false), 1);
  EXPECT_EQ(quantize_element(0.5f, 0, 2, true), 0);
  // extreme exponents: e = 127 (2^-e is subnormal) and e = -127 (subnormal inputs)
  EXPECT_EQ(quantize_element(exp2i(127), 127, 8, false), 64);
  EXPECT_EQ(quantize_element(f_of(0x7f7fffffu), 127, 8, false), 127);
  EXPECT_EQ(quantize_element(exp2i(-127), -127, 8, false), 64);
  EXPECT_EQ(quantize_element(exp2i(-133), -127, 8, false), 1);
  EXPECT_EQ(quantize_element(exp2i(-134), -127, 8, false), 1);  // 0.5 away from zero
  EXPECT_EQ(quantize_element(exp2i(-134), -127, 8, true), 0);
}

static void test_block_scale() {
  EXPECT_TRUE(isnan(block_scale(kNaNExponent, 8)));
  EXPECT_EQ(block_scale(127, 8), 1.0f / 64);
  EXPECT_EQ(block_scale(127, 2), 1.0f);
  EXPECT_EQ(block_scale(254, 2), exp2i(127));
  EXPECT_EQ(float_to_bits(block_scale(0, 8)), 1u << 16);  // 2^-133
  EXPECT_EQ(max_mantissa(8), 127);
  EXPECT_EQ(max_mantissa(4), 7);
  EXPECT_EQ(max_mantissa(2), 1);
  EXPECT_TRUE(is_packed(4) && is_packed(2) && !is_packed(5));
}

static void test_nibbles() {
  EXPECT_EQ(pack_nibbles(-1, 7), 0x7f);
  EXPECT_EQ(pack_nibbles(0, -8), 0x80);
  EXPECT_EQ(unpack_lo(0x7f), -1);
  EXPECT_EQ(unpack_hi(0x7f), 7);
  EXPECT_EQ(unpack_lo(0x80), 0);
  EXPECT_EQ(unpack_hi(0x80), -8);
  for (int lo = -8; lo <= 7; ++lo)
    for (int hi = -8; hi <= 7; ++hi) {
      const uint8_t b = pack_nibbles(lo, hi);
      EXPECT_EQ(unpack_lo(b), lo);
      EXPECT_EQ(unpack_hi(b), hi);
    }
}

int main() {
  test_exp2i();
  test_block_exponent();
  test_rounding();
  test_quantize_element();
  test_block_scale();
  test_nibbles();
  if (g_failures) {
    fprintf(stderr, "test_bfp_rule: %d failure(s)\n", g_failures);
    return 1;
  }
  printf("test_bfp_rule: all checks passed\n");
  return 0;
}
