// int8-activation GEMV for decoding (M <= 16): activations quantised to 8-bit mantissas with
// one scale per block of 32, multiplied against BFP weights (MXINT8, MXINT4, ...) in
// integers. The weight-only kernel (linear_rows) widens every weight to fp32 and spends one
// FMA per weight and row; here 4 (8-bit) or 8 (4-bit) weights cost one vpdpbusd lane, so
// the GEMV is bound by memory again.
//
//   y[m, n] = sum_b sa[m, b] sw[n, b] sum_{k in b} a[m, k] w[n, k]   (+ bias[n])
//
// The weight is read in its storage layout, nothing is packed: one int32 lane covers 4
// weight bytes (a "group": 4 elements of an 8-bit row, 8 of a 4-bit row). The activation
// rows are laid out once per call to match (gemv_q8_prepare). vpdpbusd multiplies
// unsigned by signed bytes, so one operand carries an offset whose share is removed from
// the lane's starting value:
//   8-bit w       activations as u8 a + 128: vpdpbusd(a + 128, w) = sum a w + 128 sum w.
//                 The weight's share, 128 sum w, is one more vpdpbusd per 64 weight bytes
//                 (against bytes of 128), shared by every activation row.
//   4-bit w       weights as u8 w + 8 (nibble ^ 8: three instructions for both nibbles),
//                 activations s8; the share -8 sum a depends on the activation only and is
//                 laid out per group (corr). The low nibbles of a 64-byte load meet the
//                 even activations, the high nibbles the odd ones.
//   AVX-512 VNNI  per 16 blocks the weight scales are formed once and multiplied by each
//                 row's activation block scales; per 64 weight bytes and activation row
//                 that leaves vpdpbusd (two for 4-bit), a conversion, a permute of the
//                 combined scales and one FMA. Up to 8 activation rows share each 64-byte
//                 weight load (the weight row is read once from memory per 8 rows).
//   AVX2          vpmaddubsw(|a|, sign(w, a)) + vpmaddwd(1): no overflow since |a| <= 127.
//   scalar        the same sums one group at a time (the definition).
// Each group's int32 sum is exact (|sum| < 2^17), converted to fp32 (exact), times
// sw * sa (powers of two: exact unless the product leaves fp32's normal range) and
// accumulated in fp32 lanes; a NaN block scale (exponent byte 255) makes the output NaN.
// Threading is the caller's ([n_begin, n_end) column ranges).
#include "bfp/bfp_cpu_internal.h"

#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace llmcore {
namespace bfp {
namespace cpu {
namespace {

constexpr int kBlock = 32;
// How far ahead of the 64 weight bytes in use the AVX-512 GEMV prefetches (bytes): the
// weight is one sequential stream (rows are contiguous), and the hardware prefetcher alone
// left a single core's stream well short of its streaming-read bandwidth.
#ifndef LLMCORE_GEMV_PREFETCH
#define LLMCORE_GEMV_PREFETCH 4096
#endif
constexpr int64_t kPrefetchBytes = LLMCORE_GEMV_PREFETCH;

inline int64_t group_elems(int w_bits) { return is_packed(w_bits) ? 8 : 4; }

// Position in the 4-bit xq layout of element e: per 128 elements, evens then odds.
inline int64_t packed_pos(int64_t e) {
  const int64_t c = e >> 7, r = e & 127;
  return c * 128 + (r & 1) * 64 + (r >> 1);
}

// An 8-bit weight's activation as stored in xq: a + 128.
inline int xq_value(const uint8_t* xr, int64_t pos) { return static_cast<int>(xr[pos]) - 128; }

// ---- scalar ----------------------------------------------------------------------------
void gemv_scalar(const GemvQ8Plan& p, const uint8_t* xq, const float* xs, const uint8_t* w_mant,
                 int64_t w_row_stride, const uint8_t* w_exp, int64_t w_exp_stride,
                 const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  const bool packed = is_packed(p.w_bits);
  const int64_t bytes = mantissa_cols(p.K, p.w_bits), ge = group_elems(p.w_bits);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* wr = w_mant + n * w_row_stride;
    const uint8_t* er = w_exp + n * w_exp_stride;
    for (int64_t m = 0; m < p.M; ++m) {
      const uint8_t* xr = xq + m * p.xq_cols;
      float acc = 0.0f;
      for (int64_t g = 0; g * 4 < bytes; ++g) {
        int32_t isum = 0;
        for (int64_t i = g * 4; i < g * 4 + 4 && i < bytes; ++i) {
          if (packed) {
            const int64_t c = i >> 6, j = i & 63;
            const auto* xs8 = reinterpret_cast<const int8_t*>(xr);
            isum += unpack_lo(wr[i]) * xs8[c * 128 + j] + unpack_hi(wr[i]) * xs8[c * 128 + 64 + j];
          } else {
            isum += static_cast<int8_t>(wr[i]) * xq_value(xr, i);
          }
        }
        const int64_t b = g * ge / kBlock;
        acc += static_cast<float>(isum) * (block_scale(er[b], p.w_bits) * xs[m * p.groups + b]);
      }
      y[m * ldy + n] = bias ? acc + bias[n] : acc;
    }
  }
}

#if defined(__x86_64__)
// ---- AVX2 ------------------------------------------------------------------------------
__attribute__((target("avx2,fma"))) inline __m256i dot_s8s8(__m256i w, __m256i x) {
  const __m256i p16 = _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(w, x));
  return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma")))
void gemv_avx2(const GemvQ8Plan& p, const uint8_t* xq, const float* xs, const uint8_t* w_mant,
               int64_t w_row_stride, const uint8_t* w_exp, int64_t w_exp_stride,
               const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  const bool packed = is_packed(p.w_bits);
  const int64_t bytes = mantissa_cols(p.K, p.w_bits), nb = exponent_cols(p.K, kBlock);
  const int64_t nv = (bytes + 31) / 32;  // 32-byte weight vectors per row
  const __m256i lo4 = _mm256_set1_epi8(0x0f), off4 = _mm256_set1_epi8(8);
  const __m256i flip4 = _mm256_set1_epi8(static_cast<char>(0x88));
  const __m256i flip8 = _mm256_set1_epi8(static_cast<char>(0x80));
  alignas(32) uint8_t tail[32];
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* wr = w_mant + n * w_row_stride;
    const uint8_t* er = w_exp + n * w_exp_stride;
    for (int64_t m = 0; m < p.M; ++m) {
      const uint8_t* xr = xq + m * p.xq_cols;
      const float* sr = xs + m * p.groups;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t v = 0; v < nv; ++v) {
        const uint8_t* src = wr + v * 32;
        if (v * 32 + 32 > bytes) {
          memset(tail, 0, sizeof(tail));
          memcpy(tail, src, static_cast<size_t>(bytes - v * 32));
          src = tail;
        }
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
        __m256i isum;
        __m256 s;
        if (packed) {  // 64 elements: blocks 2v, 2v + 1, four lanes each
          const __m256i u = _mm256_xor_si256(w, flip4);
          const __m256i wl = _mm256_sub_epi8(_mm256_and_si256(u, lo4), off4);
          const __m256i wh = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(u, 4), lo4), off4);
          const uint8_t* xe = xr + (v >> 1) * 128 + (v & 1) * 32;
          const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xe));
          const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xe + 64));
          isum = _mm256_add_epi32(dot_s8s8(wl, xl), dot_s8s8(wh, xh));
          const float s1 = 2 * v + 1 < nb ? block_scale(er[2 * v + 1], p.w_bits) * sr[2 * v + 1] : 0.0f;
          s = _mm256_setr_m128(_mm_set1_ps(block_scale(er[2 * v], p.w_bits) * sr[2 * v]),
                               _mm_set1_ps(s1));
        } else {  // 32 elements: block v
          const __m256i x = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + v * 32)), flip8);
          isum = dot_s8s8(w, x);
          s = _mm256_set1_ps(block_scale(er[v], p.w_bits) * sr[v]);
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), s, acc);
      }
      const float r = hsum256(acc);
      y[m * ldy + n] = bias ? r + bias[n] : r;
    }
  }
}

// ---- AVX-512 VNNI ----------------------------------------------------------------------
#define LLMCORE_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))

// Block scales of the weight, 16 blocks from b0 (up to nb): 2^(e - 127 - shift), NaN for
// exponent byte 255.
LLMCORE_AVX512_TARGET inline __m512 weight_scales16(const uint8_t* er, int64_t b0, int64_t nb,
                                                    int shift) {
  const int64_t left = nb - b0;
  const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xffff)
                                 : static_cast<__mmask16>((1u << left) - 1u);
  // Lanes past the row read as the exponent of 1.0: a subnormal scale, even unused, would
  // cost a microcode assist per row.
  const __m512i e = _mm512_cvtepu8_epi32(
      _mm_mask_loadu_epi8(_mm_set1_epi8(static_cast<char>(kExpBias)), m, er + b0));
  const __m512 t = _mm512_cvtepi32_ps(_mm512_sub_epi32(e, _mm512_set1_epi32(kExpBias + shift)));
  const __m512 s = _mm512_scalef_ps(_mm512_set1_ps(1.0f), t);
  const __mmask16 nan = _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(kNaNExponent));
  return _mm512_mask_blend_ps(nan, s, _mm512_set1_ps(__builtin_nanf("")));
}

// MT activation rows against weight row wr: out[r] = the row's dot product.
template <int MT, bool kPacked>
LLMCORE_AVX512_TARGET void rows_avx512(const GemvQ8Plan& p, const uint8_t* xq,
                                       const int32_t* corr, const float* xs, const uint8_t* wr,
                                       const uint8_t* er, float* out) {
  const int64_t bytes = mantissa_cols(p.K, p.w_bits), nb = exponent_cols(p.K, kBlock);
  const int64_t nc = (bytes + 63) / 64;  // 64-byte chunks
  // A chunk covers 2 blocks (8-bit, 8 lanes each) or 4 (4-bit, 4 lanes each): 16 blocks of
  // scales serve 8 or 4 chunks.
  constexpr int kChunks = kPacked ? 4 : 8, kBlocksPerChunk = kPacked ? 4 : 2;
  const int shift = p.w_bits - 2;
  const __m512i lane_block = _mm512_srli_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), kPacked ? 2 : 3);
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i lo4 = _mm512_set1_epi8(0x0f), flip4 = _mm512_set1_epi8(static_cast<char>(0x88));
  // Few rows: alternate two accumulators per row, so that the FMA latency does not bound
  // the loop.
  constexpr int kAcc = MT <= 4 ? 2 : 1;
  __m512 acc[kAcc][MT], s16[MT];
  for (int a = 0; a < kAcc; ++a)
    for (int r = 0; r < MT; ++r) acc[a][r] = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < nc; c0 += kChunks) {
    const int64_t b0 = c0 * kBlocksPerChunk;
    const __m512 sw = weight_scales16(er, b0, nb, shift);
    for (int r = 0; r < MT; ++r) s16[r] = _mm512_mul_ps(sw, _mm512_loadu_ps(xs + r * p.groups + b0));
    const int qn = nc - c0 < kChunks ? static_cast<int>(nc - c0) : kChunks;
#pragma GCC unroll 8
    for (int q = 0; q < kChunks; ++q) {
      if (q == qn) break;
      const int64_t c = c0 + q;
      const int64_t left = bytes - c * 64;
      _mm_prefetch(reinterpret_cast<const char*>(wr + c * 64 + kPrefetchBytes), _MM_HINT_T0);
      const __m512i raw = left >= 64 ? _mm512_loadu_si512(wr + c * 64)
                                     : _mm512_maskz_loadu_epi8((__mmask64{1} << left) - 1, wr + c * 64);
      __m512i wl = raw, wh = raw, init = _mm512_setzero_si512();
      if (kPacked) {  // unsigned w + 8; the rows' accumulators start at -8 sum(a) (corr)
        const __m512i u = _mm512_xor_si512(raw, flip4);
        wl = _mm512_and_si512(u, lo4);
        wh = _mm512_and_si512(_mm512_srli_epi16(u, 4), lo4);
      } else {
        init = _mm512_sub_epi32(init, _mm512_dpbusd_epi32(init, c128, wl));
      }
      const __m512i idx = _mm512_add_epi32(lane_block, _mm512_set1_epi32(q * kBlocksPerChunk));
      for (int r = 0; r < MT; ++r) {
        const uint8_t* xr = xq + r * p.xq_cols;
        __m512i isum;
        if (kPacked) {
          isum = _mm512_loadu_si512(corr + r * p.groups + c * 16);
          isum = _mm512_dpbusd_epi32(isum, wl, _mm512_loadu_si512(xr + c * 128));
          isum = _mm512_dpbusd_epi32(isum, wh, _mm512_loadu_si512(xr + c * 128 + 64));
        } else {
          isum = _mm512_dpbusd_epi32(init, _mm512_loadu_si512(xr + c * 64), wl);
        }
        __m512& a = acc[q % kAcc][r];
        a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_permutexvar_ps(idx, s16[r]), a);
      }
    }
  }
  for (int r = 0; r < MT; ++r)
    out[r] = _mm512_reduce_add_ps(kAcc == 2 ? _mm512_add_ps(acc[0][r], acc[kAcc - 1][r]) : acc[0][r]);
}

template <bool kPacked>
LLMCORE_AVX512_TARGET void gemv_avx512_t(const GemvQ8Plan& p, const uint8_t* xq,
                                         const int32_t* corr, const float* xs, const uint8_t* w_mant,
                                         int64_t w_row_stride, const uint8_t* w_exp,
                                         int64_t w_exp_stride, const float* bias, float* y,
                                         int64_t ldy, int64_t n_begin, int64_t n_end) {
  constexpr int kMaxMT = 8;
  // Rows in tiles of at most 8, as even as possible: the weight row is read from memory
  // once and from L1 for the next tile.
  const int64_t tiles = (p.M + kMaxMT - 1) / kMaxMT;
  float out[kMaxMT];
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* wr = w_mant + n * w_row_stride;
    const uint8_t* er = w_exp + n * w_exp_stride;
    const float b = bias ? bias[n] : 0.0f;
    for (int64_t t = 0, m = 0; t < tiles; ++t) {
      const int64_t mt = (p.M - m) / (tiles - t);
      const uint8_t* x = xq + m * p.xq_cols;
      const float* s = xs + m * p.groups;
      const int32_t* cr = corr + m * p.groups;
      switch (mt) {
        case 1: rows_avx512<1, kPacked>(p, x, cr, s, wr, er, out); break;
        case 2: rows_avx512<2, kPacked>(p, x, cr, s, wr, er, out); break;
        case 3: rows_avx512<3, kPacked>(p, x, cr, s, wr, er, out); break;
        case 4: rows_avx512<4, kPacked>(p, x, cr, s, wr, er, out); break;
        case 5: rows_avx512<5, kPacked>(p, x, cr, s, wr, er, out); break;
        case 6: rows_avx512<6, kPacked>(p, x, cr, s, wr, er, out); break;
        case 7: rows_avx512<7, kPacked>(p, x, cr, s, wr, er, out); break;
        default: rows_avx512<8, kPacked>(p, x, cr, s, wr, er, out);
      }
      for (int64_t r = 0; r < mt; ++r) y[(m + r) * ldy + n] = bias ? out[r] + b : out[r];
      m += mt;
    }
  }
}
#undef LLMCORE_AVX512_TARGET
#endif  // __x86_64__

}  // namespace

bool gemv_q8_supported(int a_bits, int w_bits, int block) {
  return block == kBlock && a_bits > 4 && a_bits <= 8 && w_bits >= 2 && w_bits <= 8;
}

GemvQ8Plan gemv_q8_plan(int64_t M, int64_t K, int w_bits) {
  GemvQ8Plan p;
  p.M = M;
  p.K = K;
  p.w_bits = w_bits;
  p.row_bytes = (mantissa_cols(K, w_bits) + 63) / 64 * 64;
  p.groups = p.row_bytes / 4;
  p.xq_cols = is_packed(w_bits) ? 2 * p.row_bytes : p.row_bytes;
  return p;
}

void gemv_q8_prepare(const GemvQ8Plan& p, const int8_t* a_mant, int64_t a_row_stride,
                     const uint8_t* a_exp, int64_t a_exp_stride, int a_bits, int8_t* xq,
                     int32_t* corr, float* xs) {
  const bool packed = is_packed(p.w_bits);
  // Locals: stores through the byte pointers could alias p's fields.
  const int64_t K = p.K, nb = exponent_cols(K, kBlock), cols = p.xq_cols, groups = p.groups;
  for (int64_t m = 0; m < p.M; ++m) {
    const int8_t* ar = a_mant + m * a_row_stride;
    auto* xr = reinterpret_cast<uint8_t*>(xq + m * cols);
    int64_t e = 0;
    if (packed) {  // a itself; per 128 elements the evens, then the odds
      for (; e + 128 <= K; e += 128) {
        for (int j = 0; j < 64; ++j) {
          xr[e + j] = static_cast<uint8_t>(ar[e + 2 * j]);
          xr[e + 64 + j] = static_cast<uint8_t>(ar[e + 2 * j + 1]);
        }
      }
      memset(xr + e, 0, static_cast<size_t>(cols - e));  // a = 0 past K
      for (; e < K; ++e) xr[packed_pos(e)] = static_cast<uint8_t>(ar[e]);
      int32_t* cr = corr + m * groups;  // -8 * (sum of the 8 a in the group)
      for (int64_t g = 0; g < groups; ++g) {
        int32_t sum = 0;
        for (int64_t i = g * 8; i < g * 8 + 8 && i < K; ++i) sum += ar[i];
        cr[g] = -8 * sum;
      }
    } else {  // a + 128
      for (; e < K; ++e) xr[e] = static_cast<uint8_t>(ar[e] ^ 0x80);
      memset(xr + e, 0x80, static_cast<size_t>(cols - e));
    }
    const uint8_t* er = a_exp + m * a_exp_stride;
    float* sr = xs + m * groups;
    for (int64_t b = 0; b < nb; ++b) sr[b] = block_scale(er[b], a_bits);
    for (int64_t b = nb; b < groups; ++b) sr[b] = 0.0f;
  }
}

void gemv_q8(const GemvQ8Plan& p, const int8_t* xq, const int32_t* corr, const float* xs,
             const uint8_t* w_mant, int64_t w_row_stride, const uint8_t* w_exp,
             int64_t w_exp_stride, const float* bias, float* y, int64_t ldy, int64_t n_begin,
             int64_t n_end) {
  const auto* xu = reinterpret_cast<const uint8_t*>(xq);
#if defined(__x86_64__)
  const Isa isa = active_isa();
  if (isa == Isa::kAvx512) {
    auto f = is_packed(p.w_bits) ? gemv_avx512_t<true> : gemv_avx512_t<false>;
    f(p, xu, corr, xs, w_mant, w_row_stride, w_exp, w_exp_stride, bias, y, ldy, n_begin, n_end);
    return;
  }
  if (isa == Isa::kAvx2) {
    gemv_avx2(p, xu, xs, w_mant, w_row_stride, w_exp, w_exp_stride, bias, y, ldy, n_begin, n_end);
    return;
  }
#endif
  gemv_scalar(p, xu, xs, w_mant, w_row_stride, w_exp, w_exp_stride, bias, y, ldy, n_begin, n_end);
}

}  // namespace cpu
}  // namespace bfp
}  // namespace llmcore
