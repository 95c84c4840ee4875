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
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16,fma,f16c")
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

template <DType T>
inline __m512 load16(const void* p, int64_t i, __mmask16 m) {
  if (T == DType::kFloat32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i);
  if (T == DType::kFloat16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <DType T>
inline void store16(void* p, int64_t i, __m512 v, __mmask16 m) {
  if (T == DType::kFloat32) {
    _mm512_mask_storeu_ps(static_cast<float*>(p) + i, m, v);
    return;
  }
  __m256i h;
  if (T == DType::kFloat16) {
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
template <DType T, bool kEven>
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

template <DType T>
void quantize_t(const void* x, int64_t x_row_stride, int64_t k, int bits, int block,
                bool round_even, uint8_t* mant, int64_t mant_row_stride, uint8_t* exp,
                int64_t exp_row_stride, int64_t row_begin, int64_t row_end) {
  const int64_t esize = T == DType::kFloat32 ? 4 : 2;
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

void quantize(const void* x, DType xt, int64_t x_row_stride, int64_t k, int bits, int block,
              bool round_even, uint8_t* mant, int64_t mant_row_stride, uint8_t* exp,
              int64_t exp_row_stride, int64_t row_begin, int64_t row_end) {
  auto f = xt == DType::kBFloat16 ? quantize_t<DType::kBFloat16>
         : xt == DType::kFloat16  ? quantize_t<DType::kFloat16>
                                  : quantize_t<DType::kFloat32>;
  f(x, x_row_stride, k, bits, block, round_even, mant, mant_row_stride, exp, exp_row_stride,
    row_begin, row_end);
}

// ---- dequantize -----------------------------------------------------------------------
template <DType T>
void dequantize_t(const uint8_t* mant, int64_t mant_row_stride, const uint8_t* exp,
                  int64_t exp_row_stride, int64_t k, int bits, int block, void* out,
                  int64_t out_row_stride, int64_t row_begin, int64_t row_end) {
  const int64_t nb = exponent_cols(k, block);
  const int64_t osize = T == DType::kFloat32 ? 4 : 2;
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
                int64_t exp_row_stride, int64_t k, int bits, int block, void* out, DType ot,
                int64_t out_row_stride, int64_t row_begin, int64_t row_end) {
  auto f = ot == DType::kBFloat16 ? dequantize_t<DType::kBFloat16>
         : ot == DType::kFloat16  ? dequantize_t<DType::kFloat16>
                                  : dequantize_t<DType::kFloat32>;
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

// ---- weight-only linear, M >= 2: dequantise once, reuse for every row -----------------
// Per tile of kNR weight rows: dequantise the rows once into a scratch row (fp32, or bf16
// when x is bf16 and every product is exact), zero padded to kp; then MR x kNR register
// tiles FMA (or vdpbf16ps) it against every row of x, also zero padded to kp. So the cost
// of dequantising is paid once per weight, not once per (weight, row group).
constexpr int kNR = 3;     // weight rows per tile
constexpr int kMRMax = 8;  // x rows per register tile

template <typename T>
T* scratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// Rows [n, n + nr) of w dequantised to fp32 into out ([nr][kp], zero beyond K). Returns
// the smallest exponent byte seen (255 blocks are NaN, they do not count).
int dequant_tile_f32(const uint8_t* w, int64_t ws, const uint8_t* we, int64_t es, int bits,
                     int block, const float* lut, int64_t K, int64_t kp, int64_t n, int nr,
                     float* out) {
  const int64_t nb = exponent_cols(K, block);
  const bool packed = is_packed(bits);
  int min_byte = 255;
  for (int r = 0; r < nr; ++r) {
    const uint8_t* row = w + (n + r) * ws;
    const uint8_t* er = we + (n + r) * es;
    float* o = out + r * kp;
    for (int64_t b = 0; b < nb; ++b) {
      const int e = er[b];
      if (e < min_byte) min_byte = e;
      const __m512 s = _mm512_set1_ps(lut[e]);
      const int64_t i0 = b * block, i1 = i0 + block < K ? i0 + block : K;
      if (!packed) {
        for (int64_t i = i0; i < i1; i += 16) {
          const __mmask16 m = tail_mask(i1 - i);
          const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, row + i)));
          _mm512_mask_storeu_ps(o + i, m, _mm512_mul_ps(v, s));
        }
      } else if (i0 % 2 == 0) {
        for (int64_t i = i0; i < i1; i += 16) {
          const __mmask16 m = tail_mask(i1 - i);
          const __m512 v = _mm512_cvtepi32_ps(load_w16<true>(row, i, i1 - i));
          _mm512_mask_storeu_ps(o + i, m, _mm512_mul_ps(v, s));
        }
      } else {
        for (int64_t i = i0; i < i1; ++i) o[i] = static_cast<float>(load_mantissa(row, bits, i)) * lut[e];
      }
    }
    for (int64_t i = K; i < kp; ++i) o[i] = 0.0f;
  }
  return min_byte;
}

template <int MR, int NR>
inline void store_tile(__m512 (&acc)[MR][NR], const float* bias, float* y, int64_t ldy, int64_t n) {
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      const float v = _mm512_reduce_add_ps(acc[m][r]);
      y[m * ldy + n + r] = bias ? v + bias[n + r] : v;
    }
}

// y[m, n + r] for m < MR, r < NR from x fp32 [MR][kp] (row stride ldx) and wt [NR][kp].
template <int MR, int NR>
void tile_f32(const float* x, int64_t ldx, const float* wt, int64_t kp, const float* bias,
              float* y, int64_t ldy, int64_t n) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < kp; i += 16) {
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_loadu_ps(wt + r * kp + i);
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + i);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  store_tile<MR, NR>(acc, bias, y, ldy, n);
}

// Same with bf16 x [MR][kp] and bf16 wt [NR][kp] (kp a multiple of 32): vdpbf16ps.
template <int MR, int NR>
void tile_bf16(const uint16_t* x, int64_t ldx, const uint16_t* wt, int64_t kp, const float* bias,
               float* y, int64_t ldy, int64_t n) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < kp; i += 32) {
    __m512bh wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(wt + r * kp + i);
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * ldx + i);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  store_tile<MR, NR>(acc, bias, y, ldy, n);
}

template <bool kBF16, int NR>
void rows_tile(const void* x, int64_t M, int64_t ldx, const void* wt, int64_t kp,
               const float* bias, float* y, int64_t ldy, int64_t n) {
  for (int64_t m = 0; m < M; m += kMRMax) {
    const int64_t left = M - m;
    // Balance the row groups: 16 -> 8 + 8, 12 -> 6 + 6, 10 -> 5 + 5.
    const int64_t groups = (left + kMRMax - 1) / kMRMax;
    const int mr = static_cast<int>((left + groups - 1) / groups);
    float* ym = y + m * ldy;
#define LLMCORE_LIN_ROWS(R)                                                                     \
  case R:                                                                                       \
    if (kBF16) tile_bf16<R, NR>(static_cast<const uint16_t*>(x) + m * ldx, ldx,                \
                                static_cast<const uint16_t*>(wt), kp, bias, ym, ldy, n);        \
    else tile_f32<R, NR>(static_cast<const float*>(x) + m * ldx, ldx,                         \
                         static_cast<const float*>(wt), kp, bias, ym, ldy, n);                  \
    m += R - kMRMax;                                                                            \
    break;
    switch (mr) {
      LLMCORE_LIN_ROWS(1)
      LLMCORE_LIN_ROWS(2)
      LLMCORE_LIN_ROWS(3)
      LLMCORE_LIN_ROWS(4)
      LLMCORE_LIN_ROWS(5)
      LLMCORE_LIN_ROWS(6)
      LLMCORE_LIN_ROWS(7)
      default: LLMCORE_LIN_ROWS(8)
    }
#undef LLMCORE_LIN_ROWS
  }
}

// Smallest nonzero |x| of bf16 x [M][K] as an unbiased exponent (-127 for subnormals;
// 128 when x is all zero).
int bf16_min_exponent(const uint16_t* x, int64_t M, int64_t ldx, int64_t K) {
  __m512i mn = _mm512_set1_epi16(0x7fff);
  const __m512i absm = _mm512_set1_epi16(0x7fff);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < K; i += 32) {
      const __mmask32 lm = K - i >= 32 ? 0xffffffffu : (1u << (K - i)) - 1u;
      const __m512i v = _mm512_and_si512(_mm512_maskz_loadu_epi16(lm, x + m * ldx + i), absm);
      const __mmask32 nz = _mm512_test_epi16_mask(v, v);
      mn = _mm512_mask_min_epu16(mn, nz, mn, v);
    }
  alignas(64) uint16_t t[32];
  _mm512_store_si512(t, mn);
  int lo = 0x7fff;
  for (int j = 0; j < 32; ++j) lo = t[j] < lo ? t[j] : lo;
  if (lo == 0x7fff) return 128;
  return (lo >> 7) == 0 ? -127 : (lo >> 7) - 127;
}

bool cpu_has_bf16() { return cpu_features().avx512bf16; }

void linear_tiles(const void* x, DType xt, int64_t M, int64_t ldx, int64_t K,
                  const uint8_t* w, int64_t ws, const uint8_t* we, int64_t es, int bits,
                  int block, const float* bias, float* y, int64_t ldy, int64_t n_begin,
                  int64_t n_end) {
  float lut[256];
  for (int e = 0; e < 256; ++e) lut[e] = block_scale(static_cast<uint8_t>(e), bits);
  thread_local std::vector<float> xf_buf, wf_buf;
  thread_local std::vector<uint16_t> xb_buf, wb_buf;

  // bf16 x: vdpbf16ps on bf16 weights when that is exact. Weights m * 2^s with |m| < 2^7
  // are exact in bf16; products of two bf16 values are exact in fp32. vdpbf16ps flushes
  // subnormal inputs and results, so every nonzero product must be far above 2^-126:
  // 2^(ex + s) >= 2^-100 keeps any flushed partial sum (< 2^-126 each) well inside the
  // fp32 accumulation bound. Tiles that fail the test go the fp32 way.
  const bool try_bf16 = xt == DType::kBFloat16 && bits <= 8 && cpu_has_bf16();
  int x_min_exp = 0;
  const int64_t kp16 = (K + 15) / 16 * 16, kp32 = (K + 31) / 32 * 32;
  const uint16_t* xb = nullptr;
  int64_t ldxb = ldx;
  if (try_bf16) {
    x_min_exp = bf16_min_exponent(static_cast<const uint16_t*>(x), M, ldx, K);
    xb = static_cast<const uint16_t*>(x);
    if (K != kp32) {
      uint16_t* b = scratch(xb_buf, static_cast<size_t>(M * kp32));
      for (int64_t m = 0; m < M; ++m) {
        memcpy(b + m * kp32, static_cast<const uint16_t*>(x) + m * ldx, static_cast<size_t>(K) * 2);
        memset(b + m * kp32 + K, 0, static_cast<size_t>(kp32 - K) * 2);
      }
      xb = b;
      ldxb = kp32;
    }
  }
  // fp32 x (converted and padded lazily: the bf16 path may never need it).
  const float* xf = nullptr;
  int64_t ldxf = ldx;
  auto need_xf = [&] {
    if (xf) return;
    if (xt == DType::kFloat32 && K == kp16) {
      xf = static_cast<const float*>(x);
      return;
    }
    float* b = scratch(xf_buf, static_cast<size_t>(M * kp16));
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t i = 0; i < K; i += 16) {
        const __mmask16 mk = tail_mask(K - i);
        const __m512 v = xt == DType::kFloat32 ? load16<DType::kFloat32>(x, m * ldx + i, mk)
                       : xt == DType::kBFloat16 ? load16<DType::kBFloat16>(x, m * ldx + i, mk)
                                                : load16<DType::kFloat16>(x, m * ldx + i, mk);
        _mm512_mask_storeu_ps(b + m * kp16 + i, mk, v);
      }
      for (int64_t i = K; i < kp16; ++i) b[m * kp16 + i] = 0.0f;
    }
    xf = b;
    ldxf = kp16;
  };

  const int64_t kp_w = try_bf16 ? kp32 : kp16;
  float* wf = scratch(wf_buf, static_cast<size_t>(kNR * kp_w));
  uint16_t* wb = try_bf16 ? scratch(wb_buf, static_cast<size_t>(kNR * kp32)) : nullptr;
  for (int64_t n = n_begin; n < n_end; n += kNR) {
    const int nr = n_end - n < kNR ? static_cast<int>(n_end - n) : kNR;
    const int min_byte = dequant_tile_f32(w, ws, we, es, bits, block, lut, K, kp_w, n, nr, wf);
    bool use_bf16 = false;
    if (try_bf16) {
      // min_byte 255: all NaN blocks (bf16 NaN is fine).
      const int w_exp = min_byte - kExpBias - (bits - 2);
      // Weights must be normal in bf16 too (vcvtne2ps2bf16 flushes subnormals).
      use_bf16 = min_byte == 255 ||
                 (w_exp >= -126 && x_min_exp != -127 && (x_min_exp == 128 || x_min_exp + w_exp >= -100));
    }
    if (use_bf16) {
      for (int r = 0; r < nr; ++r)
        for (int64_t i = 0; i < kp32; i += 32) {
          const __m512bh p = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(wf + r * kp32 + i + 16),
                                                 _mm512_loadu_ps(wf + r * kp32 + i));
          _mm512_storeu_si512(wb + r * kp32 + i, (__m512i)p);
        }
      if (nr == kNR) rows_tile<true, kNR>(xb, M, ldxb, wb, kp32, bias, y, ldy, n);
      else
        for (int r = 0; r < nr; ++r)
          rows_tile<true, 1>(xb, M, ldxb, wb + r * kp32, kp32, bias, y, ldy, n + r);
    } else {
      need_xf();
      // fp32 tiles read kp16 columns; the scratch rows are kp_w apart.
      if (kp_w == kp16 && nr == kNR) rows_tile<false, kNR>(xf, M, ldxf, wf, kp16, bias, y, ldy, n);
      else
        for (int r = 0; r < nr; ++r)
          rows_tile<false, 1>(xf, M, ldxf, wf + r * kp_w, kp16, bias, y, ldy, n + r);
    }
  }
}

// ---- fused path: block % 32 == 0, 8-bit or 4-bit mantissas ------------------------------
// The first row group dequantises in registers (32 weights per step) and, when more row
// groups follow, leaves the dequantised tile in scratch for them. 4-bit weights: the 16
// bytes of a 32-element chunk are widened to 16 dword lanes; vpermps on the low nibble
// (even elements) and on the value >> 4 (odd elements) looks up nibble * block scale in a
// 16-entry table, so a chunk costs 3 shuffles and no int -> float conversion. That puts
// the weights in the order [even elements, odd elements] per chunk; x is permuted the same
// way once per call.
inline __mmask16 tail16(int64_t n) { return n <= 0 ? static_cast<__mmask16>(0) : tail_mask(n); }

template <bool kPacked>
inline void deq32(const uint8_t* row, int64_t i, int64_t left, __m512 s, __m512& a, __m512& b) {
  if (kPacked) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(tail16((left + 1) / 2), row + i / 2));
    a = _mm512_permutexvar_ps(v, s);
    b = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), s);
  } else {
    a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(tail16(left), row + i))), s);
    b = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(tail16(left - 16), row + i + 16))), s);
  }
}

template <int MR, int NR, bool kPacked, bool kBF16, bool kStore>
void tile_fused(const void* x, int64_t ldx, const uint8_t* w, int64_t ws, const uint8_t* we,
                int64_t es, const float* lut, int block, int64_t K, int64_t kp, void* wt,
                const float* bias, float* y, int64_t ldy, int64_t n) {
  const __m512 nib = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  const int64_t nb = exponent_cols(K, block);
  for (int64_t b = 0; b < nb; ++b) {
    __m512 s[NR];
    for (int r = 0; r < NR; ++r) {
      s[r] = _mm512_set1_ps(lut[we[(n + r) * es + b]]);
      if (kPacked) s[r] = _mm512_mul_ps(nib, s[r]);
    }
    const int64_t i0 = b * block, i1 = i0 + block < K ? i0 + block : K;
    for (int64_t i = i0; i < i1; i += 32) {
      if (kBF16) {
        __m512bh wv[NR];
        for (int r = 0; r < NR; ++r) {
          __m512 lo, hi;
          deq32<kPacked>(w + (n + r) * ws, i, i1 - i, s[r], lo, hi);
          wv[r] = _mm512_cvtne2ps_pbh(hi, lo);
          if (kStore) _mm512_storeu_si512(static_cast<uint16_t*>(wt) + r * kp + i, (__m512i)wv[r]);
        }
        for (int m = 0; m < MR; ++m) {
          const __m512bh xv = (__m512bh)_mm512_loadu_si512(static_cast<const uint16_t*>(x) + m * ldx + i);
          for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
        }
      } else {
        __m512 lo[NR], hi[NR];
        for (int r = 0; r < NR; ++r) {
          deq32<kPacked>(w + (n + r) * ws, i, i1 - i, s[r], lo[r], hi[r]);
          if (kStore) {
            _mm512_storeu_ps(static_cast<float*>(wt) + r * kp + i, lo[r]);
            _mm512_storeu_ps(static_cast<float*>(wt) + r * kp + i + 16, hi[r]);
          }
        }
        for (int m = 0; m < MR; ++m) {
          const float* xm = static_cast<const float*>(x) + m * ldx + i;
          const __m512 x0 = _mm512_loadu_ps(xm), x1 = _mm512_loadu_ps(xm + 16);
          for (int r = 0; r < NR; ++r) {
            acc[m][r] = _mm512_fmadd_ps(lo[r], x0, acc[m][r]);
            acc[m][r] = _mm512_fmadd_ps(hi[r], x1, acc[m][r]);
          }
        }
      }
    }
  }
  store_tile<MR, NR>(acc, bias, y, ldy, n);
}

// All row groups for weight rows [n, n + NR): the first fused (storing the tile to wt when
// more follow), the others from wt.
template <int NR, bool kPacked, bool kBF16>
void rows_fused(const void* x, int64_t M, int64_t ldx, const uint8_t* w, int64_t ws,
                const uint8_t* we, int64_t es, const float* lut, int block, int64_t K, int64_t kp,
                void* wt, const float* bias, float* y, int64_t ldy, int64_t n) {
  const int64_t groups = (M + kMRMax - 1) / kMRMax;
  const int mr = static_cast<int>((M + groups - 1) / groups);
  const bool more = M > mr;
#define LLMCORE_FUSED(R)                                                                         \
  case R:                                                                                        \
    if (more) tile_fused<R, NR, kPacked, kBF16, true>(x, ldx, w, ws, we, es, lut, block, K, kp, \
                                                       wt, bias, y, ldy, n);                      \
    else tile_fused<R, NR, kPacked, kBF16, false>(x, ldx, w, ws, we, es, lut, block, K, kp, wt,  \
                                                  bias, y, ldy, n);                               \
    break;
  switch (mr) {
    LLMCORE_FUSED(1)
    LLMCORE_FUSED(2)
    LLMCORE_FUSED(3)
    LLMCORE_FUSED(4)
    LLMCORE_FUSED(5)
    LLMCORE_FUSED(6)
    LLMCORE_FUSED(7)
    default: LLMCORE_FUSED(8)
  }
#undef LLMCORE_FUSED
  if (!more) return;
  const int64_t esz = kBF16 ? 2 : 4;
  rows_tile<kBF16, NR>(static_cast<const char*>(x) + mr * ldx * esz, M - mr, ldx, wt, kp, bias,
                       y + mr * ldy, ldy, n);
}

// Smallest exponent byte of rows [n, n + nr) (nb bytes each).
int min_exp_byte(const uint8_t* we, int64_t es, int64_t nb, int64_t n, int nr) {
  __m512i mn = _mm512_set1_epi8(static_cast<char>(0xff));
  for (int r = 0; r < nr; ++r)
    for (int64_t b = 0; b < nb; b += 64) {
      const __mmask64 lm = nb - b >= 64 ? ~__mmask64{0} : (__mmask64{1} << (nb - b)) - 1;
      mn = _mm512_min_epu8(mn, _mm512_mask_loadu_epi8(_mm512_set1_epi8(static_cast<char>(0xff)), lm, we + (n + r) * es + b));
    }
  mn = _mm512_min_epu8(mn, _mm512_srli_epi16(mn, 8));
  mn = _mm512_and_si512(mn, _mm512_set1_epi16(0xff));
  mn = _mm512_min_epu16(mn, _mm512_srli_epi32(mn, 16));
  mn = _mm512_and_si512(mn, _mm512_set1_epi32(0xffff));
  return static_cast<int>(_mm512_reduce_min_epu32(mn));
}

template <bool kPacked>
void linear_fused(const void* x, DType xt, int64_t M, int64_t ldx, int64_t K,
                  const uint8_t* w, int64_t ws, const uint8_t* we, int64_t es, int bits,
                  int block, const float* bias, float* y, int64_t ldy, int64_t n_begin,
                  int64_t n_end) {
  float lut[256];
  for (int e = 0; e < 256; ++e) lut[e] = block_scale(static_cast<uint8_t>(e), bits);
  thread_local std::vector<float> xf_buf, wf_buf;
  thread_local std::vector<uint16_t> xb_buf, wb_buf;
  const int64_t kp = (K + 31) / 32 * 32, nb = exponent_cols(K, block);
  // x scratch [M][kp], zero padded, chunk-permuted for 4-bit weights.
  auto src = [&](int64_t k) -> int64_t { return kPacked ? (k & ~int64_t{31}) + ((k & 15) << 1) + ((k >> 4) & 1) : k; };
  const bool try_bf16 = xt == DType::kBFloat16 && cpu_has_bf16();
  int x_min_exp = 0;
  uint16_t* xb = nullptr;
  if (try_bf16) {
    x_min_exp = bf16_min_exponent(static_cast<const uint16_t*>(x), M, ldx, K);
    xb = scratch(xb_buf, static_cast<size_t>(M * kp));
    const uint16_t* xs = static_cast<const uint16_t*>(x);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < kp; ++k) {
        const int64_t j = src(k);
        xb[m * kp + k] = j < K ? xs[m * ldx + j] : 0;
      }
  }
  float* xf = nullptr;
  auto need_xf = [&] {
    if (xf) return;
    xf = scratch(xf_buf, static_cast<size_t>(M * kp));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < kp; ++k) {
        const int64_t j = src(k);
        xf[m * kp + k] = j < K ? load_float(x, xt, m * ldx + j) : 0.0f;
      }
  };
  float* wf = scratch(wf_buf, static_cast<size_t>(kNR * kp));
  uint16_t* wb = try_bf16 ? scratch(wb_buf, static_cast<size_t>(kNR * kp)) : nullptr;
  for (int64_t n = n_begin; n < n_end; n += kNR) {
    const int nr = n_end - n < kNR ? static_cast<int>(n_end - n) : kNR;
    bool use_bf16 = false;
    if (try_bf16) {
      const int min_byte = min_exp_byte(we, es, nb, n, nr);
      const int w_exp = min_byte - kExpBias - (bits - 2);
      use_bf16 = min_byte == 255 ||
                 (w_exp >= -126 && x_min_exp != -127 && (x_min_exp == 128 || x_min_exp + w_exp >= -100));
    }
    if (use_bf16) {
      if (nr == kNR) rows_fused<kNR, kPacked, true>(xb, M, kp, w, ws, we, es, lut, block, K, kp, wb, bias, y, ldy, n);
      else
        for (int r = 0; r < nr; ++r)
          rows_fused<1, kPacked, true>(xb, M, kp, w, ws, we, es, lut, block, K, kp, wb, bias, y, ldy, n + r);
    } else {
      need_xf();
      if (nr == kNR) rows_fused<kNR, kPacked, false>(xf, M, kp, w, ws, we, es, lut, block, K, kp, wf, bias, y, ldy, n);
      else
        for (int r = 0; r < nr; ++r)
          rows_fused<1, kPacked, false>(xf, M, kp, w, ws, we, es, lut, block, K, kp, wf, bias, y, ldy, n + r);
    }
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

void linear_typed(const void* x, DType xt, int64_t M, int64_t ldx, int64_t K,
                  const uint8_t* w_mant, int64_t w_row_stride, const uint8_t* w_exp,
                  int64_t exp_row_stride, int bits, int block, const float* bias, float* y,
                  int64_t ldy, int64_t n_begin, int64_t n_end) {
  // Measured on Zen 4 (K = N = 4096, 2 threads): dequantising in registers wins for M <= 4
  // (and for 4-bit weights at M = 1, where the nibble table replaces unpacking); from M = 8
  // the register pressure of the fused tile loses to dequantising each tile once to scratch.
  if (block % 32 == 0 && bits <= 8 && M <= 4 && (M >= 2 || is_packed(bits))) {
    auto f = is_packed(bits) ? linear_fused<true> : linear_fused<false>;
    f(x, xt, M, ldx, K, w_mant, w_row_stride, w_exp, exp_row_stride, bits, block, bias, y, ldy,
      n_begin, n_end);
    return;
  }
  if (M >= 2) {
    linear_tiles(x, xt, M, ldx, K, w_mant, w_row_stride, w_exp, exp_row_stride, bits, block, bias,
                 y, ldy, n_begin, n_end);
    return;
  }
  const float* xf = static_cast<const float*>(x);
  std::vector<float> tmp;
  if (xt != DType::kFloat32) {
    tmp.resize(static_cast<size_t>(M * K));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < K; ++i) tmp[m * K + i] = load_float(x, xt, m * ldx + i);
    xf = tmp.data();
    ldx = K;
  }
  linear(xf, M, ldx, K, w_mant, w_row_stride, w_exp, exp_row_stride, bits, block, bias, y, ldy,
         n_begin, n_end);
}

}  // namespace avx512
}  // namespace cpu
}  // namespace bfp
}  // namespace llmcore

#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif  // __x86_64__
