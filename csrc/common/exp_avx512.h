// e^x in 16 fp32 lanes (AVX-512F), shared by the CPU kernels that need it (softmax in
// attention and decode attention, SiLU): x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two
// parts, Cody-Waite), Cephes' degree-6 minimax polynomial for e^r, then the scale by 2^n
// with vscalefps. Within 2 ulp of e^x; x is clamped to [-104, 88.7] first, so e^x
// underflows to 0 below (the scale goes through the subnormals) and stays finite above.
// NaN stays NaN: max/min return their second operand when either is NaN.
// Framework-free; the function carries its own target attribute, so the library still
// loads on CPUs without AVX-512 (callers check the CPU first).
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>

namespace llmcore {

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// kNormal: the variant the attention kernels (prefill and training) were validated with,
// kept bit for bit: x clamped to [-87.34, 88.38] (e^x stays a normal number), the last
// step p * r^2 + (r + 1), and 2^n built in the exponent field. The default clamps to
// [-104, 88.7] (e^x underflows through the subnormals to 0) and scales with vscalefps.
template <bool kNormal = false>
__attribute__((target("avx512f"), always_inline)) inline __m512 exp_avx512(__m512 x) {
  if constexpr (kNormal) {
    x = _mm512_min_ps(_mm512_set1_ps(88.3762626f), _mm512_max_ps(_mm512_set1_ps(-87.336544f), x));
  } else {
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
    x = _mm512_min_ps(_mm512_set1_ps(88.7f), x);
  }
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  if constexpr (kNormal) {
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
  }
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#pragma GCC diagnostic pop

}  // namespace llmcore

#endif  // __x86_64__
