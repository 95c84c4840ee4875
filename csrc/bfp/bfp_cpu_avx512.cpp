// AVX-512 (F/BW/VL/VNNI) BFP kernels: 16 fp32 lanes per vector. Compiled with a target
// pragma, not -march, so the library still loads on any x86-64; bfp_cpu_dispatch.cpp only
// calls in here after __builtin_cpu_supports said yes.
//
// quantize   per block: integer max of |x| bits (NaN/Inf compare above 0x7f800000, so one
//            vpmaxsd finds both amax and non-finite blocks), e from the exponent field,
//            v = (x * 2^-e) * 2^(b-2) in the same order as bfp_rule.h (bit-exact),
//            vrndscaleps (nearest-even, or truncate + |frac| >= 0.5 for half-away), clamp,
//            vpmovdb. 4-bit formats quantise to an int8 row, then pack nibbles.
// linear     4 weight rows x up to 4 x rows per tile: each dequantised weight vector
//            (vpmovsxbd, vcvtdq2ps, * block scale) feeds every x row with one FMA.
// gemm       6 rows of A x 2 panels of 16 columns: vpbroadcastd 4 bytes of A (u8 = s8 ^ 0x80),
//            vpdpbusd against the [k/4][16][4] panel; the int32 accumulators start at
//            -128 * column sum, so after each block they hold the exact s8 x s8 dot product.
#include "bfp/bfp_cpu_internal.h"

#if defined(__x86_64__)

#include <immintrin.h>
#include <string.h>

#include <vector>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")
// GCC 12's intrinsic headers fill don't-care lanes from _mm512_undefined_*(), a
// self-initialised variable that -Wuninitialized reports at every use; not our code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace llmcore {
namespace bfp {
namespace cpu {
namespace avx512 {
namespace {

inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

template <FloatType T>
inline __m512 load16(const void* p, int64_t i, __mmask16 m) {
  if (T == FloatType::kF32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i);
  if (T == FloatType::kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <FloatType T>
inline void store16(void* p, int64_t i, __m512 v, __mmask16 m) {
  if (T == FloatType::kF32) {
    _mm512_mask_storeu_ps(static_cast<float*>(p) + i, m, v);
    return;
  }
  __m256i h;
  if (T == FloatType::kF16) {
    h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {  // bf16, round to nearest even; NaN stays quiet NaN (as f32_to_bf16)
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    h = _mm512_cvtepi32_epi16(r);
  }
  _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, m, h);
}

// ---- quantize -------------------------------------------------------------------------
template <FloatType T, bool kEven>
void quantize_row(const void* xr, int64_t k, int bits, int block, int8_t* q, uint8_t* er) {
  const int64_t nb = exponent_cols(k, block);
  const __m512 lim = _mm512_set1_ps(static_cast<float>(max_mantissa(bits)));
  const __m512 nlim = _mm512_set1_ps(-static_cast<float>(max_mantissa(bits)));
  const __m512 s2 = _mm512_set1_ps(exp2i(bits - 2));
  const __m512 half = _mm512_set1_ps(0.5f), nhalf = _mm512_set1_ps(-0.5f);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t i0 = b * block, i1 = i0 + block < k ? i0 + block : k;
    __m512i mx = _mm512_setzero_si512();
    for (int64_t i = i0; i < i1; i += 16) {
      const __m512 v = load16<T>(xr, i, tail_mask(i1 - i));
      mx = _mm512_max_epi32(mx, _mm512_and_si512(_mm512_castps_si512(v), absmask));
    }
    const uint32_t amax_bits = static_cast<uint32_t>(_mm512_reduce_max_epi32(mx));
    if (amax_bits >= 0x7f800000u) {  // Inf or NaN in the block
      er[b] = kNaNExponent;
      memset(q + i0, 0, static_cast<size_t>(i1 - i0));
      continue;
    }
    const int e = block_exponent(bits_to_float(amax_bits));
    er[b] = static_cast<uint8_t>(e + kExpBias);
    const __m512 s1 = _mm512_set1_ps(exp2i(-e));
    for (int64_t i = i0; i < i1; i += 16) {
      const __mmask16 m = tail_mask(i1 - i);
      const __m512 v = _mm512_mul_ps(_mm512_mul_ps(load16<T>(xr, i, m), s1), s2);
      __m512 r;
      if (kEven) {
        r = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      } else {
        const __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        const __m512 frac = _mm512_sub_ps(v, t);
        r = _mm512_mask_add_ps(t, _mm512_cmp_ps_mask(frac, half, _CMP_GE_OQ), t, one);
        r = _mm512_mask_sub_ps(r, _mm512_cmp_ps_mask(frac, nhalf, _CMP_LE_OQ), r, one);
      }
      r = _mm512_min_ps(_mm512_max_ps(r, nlim), lim);
      _mm_mask_storeu_epi8(q + i, m, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r)));
    }
  }
}

// int8 [k] in [-8, 7] -> nibbles [ceil(k/2)], element 2i low.
void pack_row(const int8_t* q, int64_t k, uint8_t* out) {
  int64_t i = 0;
  const __m512i lo_mask = _mm512_set1_epi16(0x000f), hi_mask = _mm512_set1_epi16(0x00f0);
  for (; i + 64 <= k; i += 64) {
    const __m512i w = _mm512_loadu_si512(q + i);
    const __m512i p = _mm512_or_si512(_mm512_and_si512(w, lo_mask),
                                      _mm512_and_si512(_mm512_srli_epi16(w, 4), hi_mask));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i / 2), _mm512_cvtepi16_epi8(p));
  }
  for (; i < k; i += 2) out[i / 2] = pack_nibbles(q[i], i + 1 < k ? q[i + 1] : 0);
}

// nibbles [ceil(k/2)] -> int8 [k], sign-extended.
void unpack_row(const uint8_t* p, int64_t k, int8_t* q) {
  int64_t i = 0;
  for (; i + 64 <= k; i += 64) {
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i / 2)));
    const __m512i lo = _mm512_and_si512(_mm512_srai_epi16(_mm512_slli_epi16(w, 12), 12), _mm512_set1_epi16(0xff));
    const __m512i hi = _mm512_slli_epi16(_mm512_srai_epi16(_mm512_slli_epi16(w, 8), 12), 8);
    _mm512_storeu_si512(q + i, _mm512_or_si512(lo, hi));
  }
  for (; i < k; ++i) q[i] = static_cast<int8_t>(load_mantissa(p, 4, i));
}

template <FloatType T>
void quantize_t(const void* x, int64_t x_row_stride, int64_t k, int bits, int block,
                bool round_even, uint8_t* mant, int64_t mant_row_stride, uint8_t* exp,
                int64_t exp_row_stride, int64_t row_begin, int64_t row_end) {
  const int64_t esize = T == FloatType::kF32 ? 4 : 2;
  std::vector<int8_t> tmp(is_packed(bits) ? static_cast<size_t>(k) : 0);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const void* xr = static_cast<const char*>(x) + r * x_row_stride * esize;
    uint8_t* mr = mant + r * mant_row_stride;
    int8_t* q = is_packed(bits) ? tmp.data() : reinterpret_cast<int8_t*>(mr);
    if (round_even) quantize_row<T, true>(xr, k, bits, block, q, exp + r * exp_row_stride);
    else quantize_row<T, false>(xr, k, bits, block, q, exp + r * exp_row_stride);
    if (is_packed(bits)) pack_row(q, k, mr);
  }
}

void quantize(const void* x, FloatType xt, int64_t x_row_stride, int64_t k, int bits, int block,
              bool round_even, uint8_t* mant, int64_t mant_row_stride, uint8_t* exp,
              int64_t exp_row_stride, int64_t row_begin, int64_t row_end) {
  auto f = xt == FloatType::kBF16 ? quantize_t<FloatType::kBF16>
         : xt == FloatType::kF16  ? quantize_t<FloatType::kF16>
                                  : quantize_t<FloatType::kF32>;
  f(x, x_row_stride, k, bits, block, round_even, mant, mant_row_stride, exp, exp_row_stride,
    row_begin, row_end);
}

// ---- dequantize -----------------------------------------------------------------------
template <FloatType T>
void dequantize_t(const uint8_t* mant, int64_t mant_row_stride, const uint8_t* exp,
                  int64_t exp_row_stride, int64_t k, int bits, int block, void* out,
                  int64_t out_row_stride, int64_t row_begin, int64_t row_end) {
  const int64_t nb = exponent_cols(k, block);
  const int64_t osize = T == FloatType::kF32 ? 4 : 2;
  std::vector<int8_t> tmp(is_packed(bits) ? static_cast<size_t>(k) : 0);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int8_t* q = reinterpret_cast<const int8_t*>(mant + r * mant_row_stride);
    if (is_packed(bits)) {
      unpack_row(mant + r * mant_row_stride, k, tmp.data());
      q = tmp.data();
    }
    void* orow = static_cast<char*>(out) + r * out_row_stride * osize;
    const uint8_t* er = exp + r * exp_row_stride;
    for (int64_t b = 0; b < nb; ++b) {
      const __m512 s = _mm512_set1_ps(block_scale(er[b], bits));
      const int64_t i1 = (b + 1) * block < k ? (b + 1) * block : k;
      for (int64_t i = b * block; i < i1; i += 16) {
        const __mmask16 m = tail_mask(i1 - i);
        const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q + i)));
        store16<T>(orow, i, _mm512_mul_ps(v, s), m);
      }
    }
  }
}

void dequantize(const uint8_t* mant, int64_t mant_row_stride, const uint8_t* exp,
                int64_t exp_row_stride, int64_t k, int bits, int block, void* out, FloatType ot,
                int64_t out_row_stride, int64_t row_begin, int64_t row_end) {
  auto f = ot == FloatType::kBF16 ? dequantize_t<FloatType::kBF16>
         : ot == FloatType::kF16  ? dequantize_t<FloatType::kF16>
                                  : dequantize_t<FloatType::kF32>;
  f(mant, mant_row_stride, exp, exp_row_stride, k, bits, block, out, out_row_stride, row_begin,
    row_end);
}

// ---- weight-only linear ---------------------------------------------------------------
// 16 weights starting at element i (even for packed rows) as int32 lanes.
template <bool kPacked>
inline __m512i load_w16(const uint8_t* row, int64_t i, int64_t n) {
  if (!kPacked) return _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(tail_mask(n), row + i));
  const __m128i v = _mm_maskz_loadu_epi8(tail_mask((n + 1) / 2), row + i / 2);
  const __m128i nib = _mm_set1_epi8(0x0f);
  const __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
  const __m128i both = _mm_unpacklo_epi8(lo, hi);  // lo0 hi0 lo1 hi1 ... = elements in order
  const __m128i eight = _mm_set1_epi8(8);
  return _mm512_cvtepi8_epi32(_mm_sub_epi8(_mm_xor_si128(both, eight), eight));
}

template <int MR, int NR, bool kPacked>
void linear_tile(const float* x, int64_t ldx, int64_t K, const uint8_t* w, int64_t ws,
                 const uint8_t* we, int64_t es, const float* scale_lut, int block, const float* bias,
                 float* y, int64_t ldy, int64_t n) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  const int64_t nb = exponent_cols(K, block);
  for (int64_t b = 0; b < nb; ++b) {
    __m512 s[NR];
    for (int r = 0; r < NR; ++r) s[r] = _mm512_set1_ps(scale_lut[we[(n + r) * es + b]]);
    const int64_t i1 = (b + 1) * block < K ? (b + 1) * block : K;
    for (int64_t i = b * block; i < i1; i += 16) {
      const __mmask16 mask = tail_mask(i1 - i);
      __m512 wf[NR];
      for (int r = 0; r < NR; ++r)
        wf[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(load_w16<kPacked>(w + (n + r) * ws, i, i1 - i)), s[r]);
      for (int m = 0; m < MR; ++m) {
        const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * ldx + i);
        for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(wf[r], xv, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      const float v = _mm512_reduce_add_ps(acc[m][r]);
      y[m * ldy + n + r] = bias ? v + bias[n + r] : v;
    }
}

template <int NR, bool kPacked>
void linear_rows_of(const float* x, int64_t M, int64_t ldx, int64_t K, const uint8_t* w,
                    int64_t ws, const uint8_t* we, int64_t es, const float* scale_lut, int block,
                    const float* bias, float* y, int64_t ldy, int64_t n) {
  for (int64_t m = 0; m < M; m += 4) {
    const float* xm = x + m * ldx;
    float* ym = y + m * ldy;
    switch (M - m < 4 ? M - m : 4) {
      case 1: linear_tile<1, NR, kPacked>(xm, ldx, K, w, ws, we, es, scale_lut, block, bias, ym, ldy, n); break;
      case 2: linear_tile<2, NR, kPacked>(xm, ldx, K, w, ws, we, es, scale_lut, block, bias, ym, ldy, n); break;
      case 3: linear_tile<3, NR, kPacked>(xm, ldx, K, w, ws, we, es, scale_lut, block, bias, ym, ldy, n); break;
      default: linear_tile<4, NR, kPacked>(xm, ldx, K, w, ws, we, es, scale_lut, block, bias, ym, ldy, n);
    }
  }
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
  } else if (block % 2 == 0) {  // every 16-element chunk starts on a byte
    linear_t<true>(x, M, ldx, K, w_mant, w_row_stride, w_exp, exp_row_stride, bits, block, bias,
                   y, ldy, n_begin, n_end);
  } else {
    scalar::kKernels.linear(x, M, ldx, K, w_mant, w_row_stride, w_exp, exp_row_stride, bits,
                            block, bias, y, ldy, n_begin, n_end);
  }
}

// ---- BFP x BFP GEMM (VNNI) ------------------------------------------------------------
template <int MR, int NP>
void gemm_tile(const GemmPlan& p, const uint8_t* a_pack, const float* a_scale,
               const int8_t* b_pack, const float* b_scale, const int32_t* b_corr,
               const float* bias, float* c, int64_t ldc, int64_t m, int64_t pn) {
  const int64_t k4 = p.kp / 4, per_block = p.bpad / 4, nb = p.nb;
  __m512 facc[MR][NP];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NP; ++j) facc[r][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i iacc[MR][NP];
    const int8_t* bp[NP];
    for (int j = 0; j < NP; ++j) {
      const __m512i corr = _mm512_loadu_si512(b_corr + ((pn + j) * nb + b) * 16);
      for (int r = 0; r < MR; ++r) iacc[r][j] = corr;
      bp[j] = b_pack + ((pn + j) * k4 + b * per_block) * 64;
    }
    const uint8_t* ap = a_pack + m * p.kp + b * p.bpad;
    for (int64_t q = 0; q < per_block; ++q) {
      __m512i bv[NP];
      for (int j = 0; j < NP; ++j) bv[j] = _mm512_loadu_si512(bp[j] + q * 64);
      for (int r = 0; r < MR; ++r) {
        int32_t a4;
        memcpy(&a4, ap + r * p.kp + q * 4, 4);
        const __m512i av = _mm512_set1_epi32(a4);
        for (int j = 0; j < NP; ++j) iacc[r][j] = _mm512_dpbusd_epi32(iacc[r][j], av, bv[j]);
      }
    }
    for (int j = 0; j < NP; ++j) {
      const __m512 sb = _mm512_loadu_ps(b_scale + ((pn + j) * nb + b) * 16);
      for (int r = 0; r < MR; ++r) {
        const __m512 sc = _mm512_mul_ps(_mm512_set1_ps(a_scale[(m + r) * nb + b]), sb);
        facc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r][j]), sc, facc[r][j]);
      }
    }
  }
  for (int j = 0; j < NP; ++j) {
    const int64_t n0 = (pn + j) * 16;
    if (n0 >= p.N) break;
    const __mmask16 mask = tail_mask(p.N - n0);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r)
      _mm512_mask_storeu_ps(c + (m + r) * ldc + n0, mask, _mm512_add_ps(facc[r][j], bv));
  }
}

template <int NP>
void gemm_panels(const GemmPlan& p, const uint8_t* a_pack, const float* a_scale,
                 const int8_t* b_pack, const float* b_scale, const int32_t* b_corr,
                 const float* bias, float* c, int64_t ldc, int64_t m_begin, int64_t m_end,
                 int64_t pn) {
  constexpr int kMR = 6;
  for (int64_t m = m_begin; m < m_end; m += kMR) {
    switch (m_end - m < kMR ? m_end - m : kMR) {
#define LLMCORE_GEMM_ROWS(R)                                                                   \
  case R: gemm_tile<R, NP>(p, a_pack, a_scale, b_pack, b_scale, b_corr, bias, c, ldc, m, pn); \
    break;
      LLMCORE_GEMM_ROWS(1)
      LLMCORE_GEMM_ROWS(2)
      LLMCORE_GEMM_ROWS(3)
      LLMCORE_GEMM_ROWS(4)
      LLMCORE_GEMM_ROWS(5)
      LLMCORE_GEMM_ROWS(6)
#undef LLMCORE_GEMM_ROWS
    }
  }
}

void gemm(const GemmPlan& p, const uint8_t* a_pack, const float* a_scale, const int8_t* b_pack,
          const float* b_scale, const int32_t* b_corr, const float* bias, float* c, int64_t ldc,
          int64_t m_begin, int64_t m_end, int64_t p_begin, int64_t p_end) {
  int64_t pn = p_begin;
  for (; pn + 2 <= p_end; pn += 2)
    gemm_panels<2>(p, a_pack, a_scale, b_pack, b_scale, b_corr, bias, c, ldc, m_begin, m_end, pn);
  if (pn < p_end)
    gemm_panels<1>(p, a_pack, a_scale, b_pack, b_scale, b_corr, bias, c, ldc, m_begin, m_end, pn);
}

// B panels for the common case (8-bit mantissas, block a multiple of 4, K a multiple of
// the block, 16 real rows): the panel is a 4-byte transpose, one gather per 64 bytes, and
// the column sums come from vpdpbusd against all-ones. Other panels go the portable way.
void pack_b(const GemmPlan& p, const uint8_t* b_mant, int64_t b_row_stride, const uint8_t* b_exp,
            int64_t b_exp_stride, int8_t* b_pack, float* b_scale, int32_t* b_corr,
            int64_t p_begin, int64_t p_end) {
  const bool fast_format = !is_packed(p.b_bits) && p.block % 4 == 0 && p.K % p.block == 0 &&
                           b_row_stride % 4 == 0 && b_row_stride / 4 < (int64_t{1} << 27);
  const int64_t k4 = p.kp / 4, per_block = p.bpad / 4;
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int>(b_row_stride / 4)));
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t pn = p_begin; pn < p_end; ++pn) {
    if (!fast_format || pn * 16 + 16 > p.N) {
      gemm_pack_b_portable(p, b_mant, b_row_stride, b_exp, b_exp_stride, b_pack, b_scale, b_corr,
                           pn, pn + 1);
      continue;
    }
    const uint8_t* rows = b_mant + pn * 16 * b_row_stride;
    int8_t* panel = b_pack + pn * k4 * 64;
    for (int64_t b = 0; b < p.nb; ++b) {
      __m512i sum = _mm512_setzero_si512();
      for (int64_t q = b * per_block; q < (b + 1) * per_block; ++q) {
        const __m512i v = _mm512_i32gather_epi32(idx, rows + q * 4, 4);
        _mm512_storeu_si512(panel + q * 64, v);
        sum = _mm512_dpbusd_epi32(sum, ones, v);
      }
      _mm512_storeu_si512(b_corr + (pn * p.nb + b) * 16, _mm512_mullo_epi32(sum, _mm512_set1_epi32(-128)));
      for (int j = 0; j < 16; ++j)
        b_scale[(pn * p.nb + b) * 16 + j] = block_scale(b_exp[(pn * 16 + j) * b_exp_stride + b], p.b_bits);
    }
  }
}

}  // namespace

const Kernels kKernels = {quantize, dequantize, linear, gemm, pack_b};

}  // namespace avx512
}  // namespace cpu
}  // namespace bfp
}  // namespace llmcore

#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif  // __x86_64__
