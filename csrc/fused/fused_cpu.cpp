// Fused elementwise CPU kernels of a decoder step: see fused_cpu.h. Plain loops over
// contiguous rows that the compiler vectorises; the dtype is a template constant so the
// 16-bit loads and stores inline.
#include "fused/fused_cpu.h"

#include <cmath>

#include "common/half_convert.h"

namespace llmcore {
namespace fused {
namespace cpu {
namespace {

// v rounded to dtype T and back (what storing an intermediate in T does).
template <DType T>
inline float round_to(float v) {
  if constexpr (T == DType::kBFloat16) return bf16_to_f32(f32_to_bf16(v));
  if constexpr (T == DType::kFloat16) return f16_to_f32(f32_to_f16(v));
  return v;
}

template <DType T>
void rms_norm_impl(const void* x, const void* delta, const void* weight, void* sum, void* y,
                   int64_t n, float eps, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * n;
    float ss = 0.0f;
    if (delta != nullptr) {
      for (int64_t i = 0; i < n; ++i) {
        const float v = round_to<T>(load_float(x, T, o + i) + load_float(delta, T, o + i));
        store_float(sum, T, o + i, v);
        ss += v * v;
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const float v = load_float(x, T, o + i);
        ss += v * v;
      }
    }
    const void* src = delta != nullptr ? sum : x;
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
    for (int64_t i = 0; i < n; ++i) {
      const float v = round_to<T>(load_float(src, T, o + i) * inv);
      store_float(y, T, o + i, load_float(weight, T, i) * v);
    }
  }
}

template <DType T>
void rope_impl(void* x, int64_t seq, int64_t s0, int64_t s1, int64_t s2, int64_t heads,
               int64_t d, const void* cos, const void* sin, int64_t r0, int64_t r1) {
  const int64_t h = d / 2;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t hd = 0; hd < heads; ++hd) {
      const int64_t o = (r / seq) * s0 + (r % seq) * s1 + hd * s2;
      for (int64_t i = 0; i < h; ++i) {
        const float a = load_float(x, T, o + i), b = load_float(x, T, o + i + h);
        const float c0 = load_float(cos, T, r * d + i), c1 = load_float(cos, T, r * d + i + h);
        const float s0 = load_float(sin, T, r * d + i), s1 = load_float(sin, T, r * d + i + h);
        // x * cos + rotate_half(x) * sin, each product rounded as the unfused chain does
        const float lo = round_to<T>(a * c0) + round_to<T>(-b * s0);
        const float hi = round_to<T>(b * c1) + round_to<T>(a * s1);
        store_float(x, T, o + i, lo);
        store_float(x, T, o + i + h, hi);
      }
    }
  }
}

template <DType T>
void silu_mul_impl(const void* gate, const void* up, void* y, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    const float g = load_float(gate, T, i);
    const float s = round_to<T>(g / (1.0f + std::exp(-g)));
    store_float(y, T, i, s * load_float(up, T, i));
  }
}

}  // namespace

void rms_norm_rows(const void* x, const void* delta, const void* weight, void* sum, void* y,
                   DType t, int64_t n, float eps, int64_t r0, int64_t r1) {
  switch (t) {
    case DType::kBFloat16:
      return rms_norm_impl<DType::kBFloat16>(x, delta, weight, sum, y, n, eps, r0, r1);
    case DType::kFloat16:
      return rms_norm_impl<DType::kFloat16>(x, delta, weight, sum, y, n, eps, r0, r1);
    default: return rms_norm_impl<DType::kFloat32>(x, delta, weight, sum, y, n, eps, r0, r1);
  }
}

void rope_rows(void* x, int64_t seq, int64_t s0, int64_t s1, int64_t s2, int64_t heads,
               int64_t d, const void* cos, const void* sin, DType t, int64_t r0, int64_t r1) {
  switch (t) {
    case DType::kBFloat16:
      return rope_impl<DType::kBFloat16>(x, seq, s0, s1, s2, heads, d, cos, sin, r0, r1);
    case DType::kFloat16:
      return rope_impl<DType::kFloat16>(x, seq, s0, s1, s2, heads, d, cos, sin, r0, r1);
    default:
      return rope_impl<DType::kFloat32>(x, seq, s0, s1, s2, heads, d, cos, sin, r0, r1);
  }
}

void silu_mul(const void* gate, const void* up, void* y, DType t, int64_t i0, int64_t i1) {
  switch (t) {
    case DType::kBFloat16: return silu_mul_impl<DType::kBFloat16>(gate, up, y, i0, i1);
    case DType::kFloat16: return silu_mul_impl<DType::kFloat16>(gate, up, y, i0, i1);
    default: return silu_mul_impl<DType::kFloat32>(gate, up, y, i0, i1);
  }
}

}  // namespace cpu
}  // namespace fused
}  // namespace llmcore
