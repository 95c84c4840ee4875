// Vectorised fp32 <-> bf16 / fp16 runs (convert_rows.h).
#include "common/convert_rows.h"

#include <string.h>

#include "common/cpu_isa.h"
#include "common/half_convert.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace llmcore {

bool convert_vec() {
  const CpuFeatures& f = cpu_features();
  return f.avx512f && f.avx512bw && f.avx512vl && f.f16c && isa_limit() == Isa::kAvx512;
}

namespace {

#if defined(__x86_64__)
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*(), which -Wall reports as
// maybe-uninitialised once inlined through a target attribute.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define LLMCORE_CONVERT_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,f16c")))

LLMCORE_CONVERT_TARGET inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
}

LLMCORE_CONVERT_TARGET void widen16(const uint16_t* src, DType t, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    const __m256i h = _mm256_maskz_loadu_epi16(m, src + i);
    const __m512 v = t == DType::kFloat16
                         ? _mm512_cvtph_ps(h)
                         : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    _mm512_mask_storeu_ps(dst + i, m, v);
  }
}

LLMCORE_CONVERT_TARGET void narrow16(const float* src, DType t, int64_t n, uint16_t* dst) {
  const __m512i qnan16 = _mm512_set1_epi32(0x7e00), sign16 = _mm512_set1_epi32(0x8000);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, src + i);
    const __m512i u = _mm512_castps_si512(v);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    __m512i r;
    if (t == DType::kFloat16) {  // NaN: sign | 0x7e00, as f32_to_f16
      r = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      r = _mm512_mask_or_epi32(r, nan, _mm512_and_si512(_mm512_srli_epi32(u, 16), sign16), qnan16);
    } else {  // bf16: round to nearest even; NaN: the top half | 0x40, as f32_to_bf16
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
      r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    }
    _mm256_mask_storeu_epi16(dst + i, m, _mm512_cvtepi32_epi16(r));
  }
}
#undef LLMCORE_CONVERT_TARGET
#pragma GCC diagnostic pop
#endif

}  // namespace

void widen_floats(const void* src, DType t, int64_t n, float* dst, bool vec) {
  if (t == DType::kFloat32) {
    memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
#if defined(__x86_64__)
  if (vec) return widen16(static_cast<const uint16_t*>(src), t, n, dst);
#else
  (void)vec;
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = load_float(src, t, i);
}

void narrow_floats(const float* src, DType t, int64_t n, void* dst, bool vec) {
  if (t == DType::kFloat32) {
    memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
#if defined(__x86_64__)
  if (vec) return narrow16(src, t, n, static_cast<uint16_t*>(dst));
#else
  (void)vec;
#endif
  for (int64_t i = 0; i < n; ++i) store_float(dst, t, i, src[i]);
}

}  // namespace llmcore
