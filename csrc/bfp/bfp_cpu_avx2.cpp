// AVX2 + FMA + F16C BFP kernels: 8 fp32 lanes per vector, for x86-64 machines without
// AVX-512. Same algorithms as bfp_cpu_avx512.cpp; AVX2 has no byte/word masked loads, so a
// row is first widened to a zero-padded fp32 scratch row (bf16/fp16 inputs need that pass
// anyway) and tails go through small zero-filled stack copies. The GEMM has no AVX2 kernel
// (VNNI is the point of it); the dispatcher falls back to the scalar one.
#include "bfp/bfp_cpu_internal.h"

#if defined(__x86_64__)

#include <immintrin.h>
#include <string.h>

#include <vector>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace llmcore {
namespace bfp {
namespace cpu {
namespace avx2 {
namespace {

inline __m256i lane_mask(int64_t n) {  // first min(n, 8) lanes set
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n < 8 ? n : 8)), idx);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Row of k elements -> fp32 [k] (padding beyond k is never read unmasked).
void widen_row(const void* xr, DType t, int64_t k, float* out) {
  int64_t i = 0;
  const uint16_t* h = static_cast<const uint16_t*>(xr);
  if (t == DType::kFloat16) {
    for (; i + 8 <= k; i += 8)
      _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  } else if (t == DType::kBFloat16) {
    for (; i + 8 <= k; i += 8) {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i)));
      _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
  }
  for (; i < k; ++i) out[i] = load_float(xr, t, i);
}

template <bool kEven>
void quantize_row(const float* x, int64_t k, int bits, int block, int8_t* q, uint8_t* er) {
  const int64_t nb = exponent_cols(k, block);
  const __m256 lim = _mm256_set1_ps(static_cast<float>(max_mantissa(bits)));
  const __m256 nlim = _mm256_set1_ps(-static_cast<float>(max_mantissa(bits)));
  const __m256 s2 = _mm256_set1_ps(exp2i(bits - 2));
  const __m256 half = _mm256_set1_ps(0.5f), nhalf = _mm256_set1_ps(-0.5f);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t i0 = b * block, i1 = i0 + block < k ? i0 + block : k;
    __m256i mx = _mm256_setzero_si256();
    for (int64_t i = i0; i < i1; i += 8) {
      const __m256i v = _mm256_castps_si256(_mm256_maskload_ps(x + i, lane_mask(i1 - i)));
      mx = _mm256_max_epi32(mx, _mm256_and_si256(v, absmask));  // NaN/Inf bits sort highest
    }
    __m128i m4 = _mm_max_epi32(_mm256_castsi256_si128(mx), _mm256_extracti128_si256(mx, 1));
    m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, 0x4e));
    m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, 0xb1));
    const uint32_t amax_bits = static_cast<uint32_t>(_mm_cvtsi128_si32(m4));
    if (amax_bits >= 0x7f800000u) {
      er[b] = kNaNExponent;
      memset(q + i0, 0, static_cast<size_t>(i1 - i0));
      continue;
    }
    const int e = block_exponent(bits_to_float(amax_bits));
    er[b] = static_cast<uint8_t>(e + kExpBias);
    const __m256 s1 = _mm256_set1_ps(exp2i(-e));
    for (int64_t i = i0; i < i1; i += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_maskload_ps(x + i, lane_mask(i1 - i)), s1), s2);
      __m256 r;
      if (kEven) {
        r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      } else {
        const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        const __m256 frac = _mm256_sub_ps(v, t);
        r = _mm256_add_ps(t, _mm256_and_ps(_mm256_cmp_ps(frac, half, _CMP_GE_OQ), one));
        r = _mm256_sub_ps(r, _mm256_and_ps(_mm256_cmp_ps(frac, nhalf, _CMP_LE_OQ), one));
      }
      r = _mm256_min_ps(_mm256_max_ps(r, nlim), lim);
      const __m256i i32 = _mm256_cvtps_epi32(r);
      const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
      // q has 8 bytes of slack: a short last chunk spills into it (or into the next block,
      // which is written after).
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi16(i16, i16));
    }
  }
}

void quantize(const void* x, DType xt, int64_t x_row_stride, int64_t k, int bits, int block,
              bool round_even, uint8_t* mant, int64_t mant_row_stride, uint8_t* exp,
              int64_t exp_row_stride, int64_t row_begin, int64_t row_end) {
  const int64_t esize = xt == DType::kFloat32 ? 4 : 2;
  std::vector<float> xf(xt == DType::kFloat32 ? 0 : static_cast<size_t>(k));
  std::vector<int8_t> q(static_cast<size_t>(k + 8));
  for (int64_t r = row_begin; r < row_end; ++r) {
    const void* xr = static_cast<const char*>(x) + r * x_row_stride * esize;
    const float* row = static_cast<const float*>(xr);
    if (xt != DType::kFloat32) {
      widen_row(xr, xt, k, xf.data());
      row = xf.data();
    }
    uint8_t* er = exp + r * exp_row_stride;
    if (round_even) quantize_row<true>(row, k, bits, block, q.data(), er);
    else quantize_row<false>(row, k, bits, block, q.data(), er);
    uint8_t* mr = mant + r * mant_row_stride;
    if (!is_packed(bits)) {
      memcpy(mr, q.data(), static_cast<size_t>(k));
    } else {
      for (int64_t i = 0; i < k; i += 2) mr[i / 2] = pack_nibbles(q[i], i + 1 < k ? q[i + 1] : 0);
    }
  }
}

// ---- dequantize -----------------------------------------------------------------------
void dequantize(const uint8_t* mant, int64_t mant_row_stride, const uint8_t* exp,
                int64_t exp_row_stride, int64_t k, int bits, int block, void* out, DType ot,
                int64_t out_row_stride, int64_t row_begin, int64_t row_end) {
  const int64_t nb = exponent_cols(k, block);
  const int64_t osize = ot == DType::kFloat32 ? 4 : 2;
  std::vector<int8_t> q(static_cast<size_t>(k));
  std::vector<float> f(static_cast<size_t>(k + 8));
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* mr = mant + r * mant_row_stride;
    for (int64_t i = 0; i < k; ++i) q[i] = static_cast<int8_t>(load_mantissa(mr, bits, i));
    const uint8_t* er = exp + r * exp_row_stride;
    float* dst = ot == DType::kFloat32
                     ? reinterpret_cast<float*>(static_cast<char*>(out) + r * out_row_stride * osize)
                     : f.data();
    for (int64_t b = 0; b < nb; ++b) {
      const __m256 s = _mm256_set1_ps(block_scale(er[b], bits));
      const int64_t i1 = (b + 1) * block < k ? (b + 1) * block : k;
      int64_t i = b * block;
      for (; i + 8 <= i1; i += 8) {
        int64_t w8;
        memcpy(&w8, q.data() + i, 8);
        const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(w8)));
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(v, s));
      }
      const float ss = block_scale(er[b], bits);
      for (; i < i1; ++i) dst[i] = static_cast<float>(q[i]) * ss;
    }
    if (ot != DType::kFloat32) {
      void* orow = static_cast<char*>(out) + r * out_row_stride * osize;
      for (int64_t i = 0; i < k; ++i) store_float(orow, ot, i, dst[i]);
    }
  }
}

// ---- weight-only linear ---------------------------------------------------------------
// n (1..8) weights starting at element i (even for packed rows), zero beyond n.
template <bool kPacked>
inline __m256 load_w8(const uint8_t* row, int64_t i, int64_t n) {
  int64_t raw = 0;
  if (!kPacked) {
    memcpy(&raw, row + i, static_cast<size_t>(n < 8 ? n : 8));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(raw)));
  }
  const int64_t nbytes = n < 8 ? (n + 1) / 2 : 4;
  memcpy(&raw, row + i / 2, static_cast<size_t>(nbytes));
  const __m128i v = _mm_cvtsi64_si128(raw);
  const __m128i nib = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
  const __m128i both = _mm_unpacklo_epi8(_mm_and_si128(v, nib), _mm_and_si128(_mm_srli_epi16(v, 4), nib));
  __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_sub_epi8(_mm_xor_si128(both, eight), eight)));
  if (n < 8) w = _mm256_and_ps(w, _mm256_castsi256_ps(lane_mask(n)));  // odd n: drop the pad nibble
  return w;
}

template <int MR, int NR, bool kPacked>
void linear_tile(const float* x, int64_t ldx, int64_t K, const uint8_t* w, int64_t ws,
                 const uint8_t* we, int64_t es, const float* scale_lut, int block, const float* bias,
                 float* y, int64_t ldy, int64_t n) {
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  const int64_t nb = exponent_cols(K, block);
  for (int64_t b = 0; b < nb; ++b) {
    __m256 s[NR];
    for (int r = 0; r < NR; ++r) s[r] = _mm256_set1_ps(scale_lut[we[(n + r) * es + b]]);
    const int64_t i1 = (b + 1) * block < K ? (b + 1) * block : K;
    for (int64_t i = b * block; i < i1; i += 8) {
      const __m256i mask = lane_mask(i1 - i);
      __m256 wf[NR];
      for (int r = 0; r < NR; ++r) wf[r] = _mm256_mul_ps(load_w8<kPacked>(w + (n + r) * ws, i, i1 - i), s[r]);
      for (int m = 0; m < MR; ++m) {
        const __m256 xv = _mm256_maskload_ps(x + m * ldx + i, mask);
        for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(wf[r], xv, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      const float v = hsum(acc[m][r]);
      y[m * ldy + n + r] = bias ? v + bias[n + r] : v;
    }
}

template <int NR, bool kPacked>
void linear_rows_of(const float* x, int64_t M, int64_t ldx, int64_t K, const uint8_t* w,
                    int64_t ws, const uint8_t* we, int64_t es, const float* scale_lut, int block,
                    const float* bias, float* y, int64_t ldy, int64_t n) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2)
    linear_tile<2, NR, kPacked>(x + m * ldx, ldx, K, w, ws, we, es, scale_lut, block, bias, y + m * ldy, ldy, n);
  if (m < M)
    linear_tile<1, NR, kPacked>(x + m * ldx, ldx, K, w, ws, we, es, scale_lut, block, bias, y + m * ldy, ldy, n);
}

template <bool kPacked>
void linear_t(const float* x, int64_t M, int64_t ldx, int64_t K, const uint8_t* w, int64_t ws,
              const uint8_t* we, int64_t es, int bits, int block, const float* bias, float* y,
              int64_t ldy, int64_t n_begin, int64_t n_end) {
  // Block scales from a table: the scalar exp2i per (row, block) costs as much as the FMAs.
  float scale_lut[256];
  for (int e = 0; e < 256; ++e) scale_lut[e] = block_scale(static_cast<uint8_t>(e), bits);
  int64_t n = n_begin;
  for (; n + 4 <= n_end; n += 4)
    linear_rows_of<4, kPacked>(x, M, ldx, K, w, ws, we, es, scale_lut, block, bias, y, ldy, n);
  for (; n < n_end; ++n)
    linear_rows_of<1, kPacked>(x, M, ldx, K, w, ws, we, es, scale_lut, block, bias, y, ldy, n);
}

void linear(const float* x, int64_t M, int64_t ldx, int64_t K, const uint8_t* w_mant,
            int64_t w_row_stride, const uint8_t* w_exp, int64_t exp_row_stride, int bits,
            int block, const float* bias, float* y, int64_t ldy, int64_t n_begin,
            int64_t n_end) {
  if (!is_packed(bits)) {
    linear_t<false>(x, M, ldx, K, w_mant, w_row_stride, w_exp, exp_row_stride, bits, block, bias,
                    y, ldy, n_begin, n_end);
  } else if (block % 2 == 0) {  // every 8-element chunk starts on a byte
    linear_t<true>(x, M, ldx, K, w_mant, w_row_stride, w_exp, exp_row_stride, bits, block, bias,
                   y, ldy, n_begin, n_end);
  } else {
    scalar::kKernels.linear(x, M, ldx, K, w_mant, w_row_stride, w_exp, exp_row_stride, bits,
                            block, bias, y, ldy, n_begin, n_end);
  }
}

}  // namespace

const Kernels kKernels = {quantize, dequantize, linear, nullptr, nullptr};

}  // namespace avx2
}  // namespace cpu
}  // namespace bfp
}  // namespace llmcore

#pragma GCC pop_options

#endif  // __x86_64__
