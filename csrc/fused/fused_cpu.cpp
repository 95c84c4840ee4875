// Fused elementwise CPU kernels of a decoder step: see fused_cpu.h. Plain loops over
// contiguous rows that the compiler vectorises; the dtype is a template constant so the
// 16-bit loads and stores inline.
#include "fused/fused_cpu.h"

#include <cmath>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/cpu_isa.h"
#include "common/exp_avx512.h"
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

// The sum of squares in kLanes partial sums (lane i % kLanes), added pairwise at the end:
// a fixed order the compiler vectorises (one running sum would be a chain of n dependent
// adds, 4 cycles each: 1.3 us a 768-wide row).
constexpr int kLanes = 16;

inline float lanes_sum(float* acc) {
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) acc[i] += acc[i + w];
  return acc[0];
}

template <DType T>
void rms_norm_impl(const void* x, const void* delta, const void* weight, void* sum, void* y,
                   int64_t n, float eps, int64_t r0, int64_t r1) {
  const int64_t body = n / kLanes * kLanes;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * n;
    float acc[kLanes] = {};
    if (delta != nullptr) {
      for (int64_t i = 0; i < n; ++i) {
        const float v = round_to<T>(load_float(x, T, o + i) + load_float(delta, T, o + i));
        store_float(sum, T, o + i, v);
      }
    }
    const void* src = delta != nullptr ? sum : x;
    for (int64_t i = 0; i < body; i += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const float v = load_float(src, T, o + i + l);
        acc[l] += v * v;
      }
    for (int64_t i = body; i < n; ++i) {
      const float v = load_float(src, T, o + i);
      acc[i - body] += v * v;
    }
    const float ss = lanes_sum(acc);
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

// silu(g) = g / (1 + e^-g). AVX-512 when the CPU has it (common/exp_avx512.h), else
// std::exp: torch's silu is vectorised too, and a scalar exp would make this op slower than
// the chain it replaces.
#if defined(__x86_64__)
// The lanes of a 16-wide step that lie below `left` elements.
inline __mmask16 lanes16(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
}

// 16 lanes of silu.
__attribute__((target("avx512f"))) inline __m512 silu16(__m512 v) {
  const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), v));
  return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

// g = silu(g) over n floats in place (the 16-bit dtypes' staging buffer).
__attribute__((target("avx512f"))) void sigmoid_mul_avx512(float* g, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes16(n - j);
    _mm512_mask_storeu_ps(g + j, m, silu16(_mm512_maskz_loadu_ps(m, g + j)));
  }
}

// y = silu(g) * u over fp32 [i0, i1) in one pass: the same values as the staged path.
__attribute__((target("avx512f"))) void silu_mul_f32_avx512(const float* g, const float* u,
                                                            float* y, int64_t i0, int64_t i1) {
  for (int64_t j = i0; j < i1; j += 16) {
    const __mmask16 m = lanes16(i1 - j);
    const __m512 s = silu16(_mm512_maskz_loadu_ps(m, g + j));
    _mm512_mask_storeu_ps(y + j, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, u + j)));
  }
}
#endif

bool avx512_silu() {
#if defined(__x86_64__)
  return cpu_features().avx512f && isa_limit() == Isa::kAvx512;
#else
  return false;
#endif
}

void sigmoid_mul(float* g, int64_t n, bool avx512) {
#if defined(__x86_64__)
  if (avx512) return sigmoid_mul_avx512(g, n);
#endif
  for (int64_t j = 0; j < n; ++j) g[j] = g[j] / (1.0f + std::exp(-g[j]));
}

// Chunks of kChunk: widen, silu in fp32, then round and multiply (fp32 on AVX-512: one pass).
constexpr int64_t kChunk = 256;

template <DType T>
void silu_mul_impl(const void* gate, const void* up, void* y, int64_t i0, int64_t i1) {
  const bool avx512 = avx512_silu();  // once per call: LLMCORE_CPU_ISA is an environment read
#if defined(__x86_64__)
  if (T == DType::kFloat32 && avx512) {
    silu_mul_f32_avx512(static_cast<const float*>(gate), static_cast<const float*>(up),
                        static_cast<float*>(y), i0, i1);
    return;
  }
#endif
  float g[kChunk];
  for (int64_t c0 = i0; c0 < i1; c0 += kChunk) {
    const int64_t n = i1 - c0 < kChunk ? i1 - c0 : kChunk;
    for (int64_t j = 0; j < n; ++j) g[j] = load_float(gate, T, c0 + j);
    sigmoid_mul(g, n, avx512);
    for (int64_t j = 0; j < n; ++j)
      store_float(y, T, c0 + j, round_to<T>(g[j]) * load_float(up, T, c0 + j));
  }
}

// One row's argmax (the header's rule). AVX-512, fp32: a pass for the maximum (a NaN, being
// unordered, is seen as one), then one for its first index; 16-bit rows are widened 16 at a
// time. The scalar loop is the definition.
template <DType T>
int64_t argmax_scalar(const void* x, int64_t o, int64_t n) {
  int64_t best = 0;
  float bv = load_float(x, T, o);
  if (std::isnan(bv)) return 0;
  for (int64_t i = 1; i < n; ++i) {
    const float v = load_float(x, T, o + i);
    if (std::isnan(v)) return i;
    if (v > bv) {
      bv = v;
      best = i;
    }
  }
  return best;
}

#if defined(__x86_64__)
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*(), which -Wall reports as
// maybe-uninitialised once inlined through a target attribute.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <DType T>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) inline __m512 load16_as_f32(
    const void* x, int64_t i, __mmask16 m) {
  if constexpr (T == DType::kFloat32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(x) + i);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(x) + i);
    if constexpr (T == DType::kFloat16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <DType T>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) int64_t argmax_avx512(
    const void* x, int64_t o, int64_t n) {
  const __m512 lowest = _mm512_set1_ps(-INFINITY);
  __m512 mx = lowest;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes16(n - i);
    const __m512 v = _mm512_mask_mov_ps(lowest, m, load16_as_f32<T>(x, o + i, m));
    if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) return argmax_scalar<T>(x, o, n);  // a NaN
    mx = _mm512_max_ps(mx, v);
  }
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes16(n - i);
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(m, load16_as_f32<T>(x, o + i, m), top, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  return 0;  // unreachable: the maximum is one of the values
}
#pragma GCC diagnostic pop
#endif

template <DType T>
void argmax_impl(const void* x, int64_t n, int64_t* out, int64_t r0, int64_t r1) {
#if defined(__x86_64__)
  const CpuFeatures& f = cpu_features();
  if (f.avx512f && f.avx512bw && f.avx512vl && f.f16c && isa_limit() == Isa::kAvx512) {
    for (int64_t r = r0; r < r1; ++r) out[r] = argmax_avx512<T>(x, r * n, n);
    return;
  }
#endif
  for (int64_t r = r0; r < r1; ++r) out[r] = argmax_scalar<T>(x, r * n, n);
}

}  // namespace

void argmax_rows(const void* x, DType t, int64_t n, int64_t* out, int64_t r0, int64_t r1) {
  switch (t) {
    case DType::kBFloat16: return argmax_impl<DType::kBFloat16>(x, n, out, r0, r1);
    case DType::kFloat16: return argmax_impl<DType::kFloat16>(x, n, out, r0, r1);
    default: return argmax_impl<DType::kFloat32>(x, n, out, r0, r1);
  }
}

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
