// int8-activation GEMV for decoding (M <= 16): activations quantised to 8-bit mantissas with
// one scale per block of 32, multiplied against BFP weights (MXINT8, MXINT4, ...) in
// integers. The weight-only kernel (linear_rows) widens every weight to fp32 and spends one
// FMA per weight and row; here 4 (8-bit) or 8 (4-bit) weights cost one vpdpbusd lane, so
// the GEMV is bound by memory again.
//
//   y[m, n] = sum_b sa[m, b] sw[n, b] sum_{k in b} a[m, k] w[n, k]   (+ bias[n])
//
// The weight is read in its storage layout, nothing is packed: one int32 lane of vpdpbusd
// covers 4 weight bytes (4 elements of an 8-bit row, 8 of a 4-bit row). The activation
// rows are laid out once per call to match (gemv_q8_prepare). vpdpbusd multiplies
// unsigned by signed bytes: the weight is made unsigned, w + 128 (8-bit) or w + 8 (4-bit,
// nibble ^ 8), and the activation's share of the offset, -128 or -8 times the sum of the
// lane's a, is the lane's starting value (corr, laid out per activation row).
//   AVX-512 VNNI  M > 1, two kernels sharing the unpacking among up to 8 rows:
//                 steps: 256 bytes of one weight row (four 64-byte loads) transposed in
//                 4-byte columns (8 unpacks), so that each int32 lane covers one 16-byte
//                 piece of the row (4-bit: a whole block; 8-bit: half of one); per row and
//                 step 4 (8-bit) or 8 (4-bit) vpdpbusd, one conversion and one FMA by the
//                 lanes' scales, and a horizontal sum per output at the end.
//                 cols: 16 weight rows (output columns) at a time, one block at a time: the
//                 rows' block bytes transposed so that int32 lane L belongs to one column,
//                 each 4-byte group meeting its 4 activation bytes broadcast; per row and
//                 block 8 vpdpbusd, one conversion and one FMA by the 16 columns' block
//                 scales (a table per tile); no horizontal sums, no half-empty steps.
//                 4-bit weights take cols (the 110M's verification GEMVs: 1.9 -> 1.65x a
//                 decode step at 1 thread), 8-bit ones steps (one sequential stream per
//                 row measured faster there); LLMCORE_CPU_GEMV=cols|steps overrides.
//                 M = 1: the single-row kernel (row1_avx512) on the plain layout.
//   AVX2          vpmaddubsw(|a|, sign(w, a)) + vpmaddwd(1): no overflow since |a| <= 127.
//   scalar        the same sums one group of 4 bytes at a time (the definition).
// Each lane's int32 sum is exact (|sum| < 2^17), converted to fp32 (exact), times
// sw * sa (powers of two: exact unless the product leaves fp32's normal range) and
// accumulated in fp32 lanes; a NaN block scale (exponent byte 255) makes the output NaN.
// The tile kernel with several rows, bound by vpdpbusd's two pipes, forms sw * sa as an
// integer sum of the two powers of two's bits where every product of the tile is a normal
// float (the same bits as the multiply; otherwise it multiplies), and folds each activation
// broadcast into vpdpbusd's memory operand.
// Threading is the caller's ([n_begin, n_end) column ranges).
#include "bfp/bfp_cpu_internal.h"

#include <stdlib.h>
#include <string.h>

#include <type_traits>
#include <vector>

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
// Several activation rows (verification, M > 1) against the tile layout: into L2
// (prefetcht1), twice as far ahead. A 5-row tile spends ~18 ns per 512-byte block on its
// arithmetic (weights in L2), a 1-row one ~7: with the single-row kernel's prefetcht0 the
// 5-row kernel's misses waited on L1's few miss buffers and its arithmetic and the memory
// did not overlap, 29-38 ns per block from DRAM (1 row: 20-26); into L2, 20-23 ns, the
// memory's own speed (AMD EPYC Zen 4 VM, 81 MB of 8-bit tiles in 2 MB pages, K = 1728;
// the single-row kernel keeps prefetcht0, 25-28 ns with prefetcht1).
#ifndef LLMCORE_GEMV_PREFETCH_ROWS
#define LLMCORE_GEMV_PREFETCH_ROWS 8192
#endif
constexpr int64_t kPrefetchRowsBytes = LLMCORE_GEMV_PREFETCH_ROWS;

// Weight bytes per step of the AVX-512 step kernel (four 64-byte chunks, transposed
// together).
constexpr int64_t kStepBytes = 256;

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
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*(), which -Wall reports as
// maybe-uninitialised once inlined through a target attribute.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
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

// 4x4 transpose of 4-byte groups: lane 4k + c of v[j] = group j of piece k of z[c].
LLMCORE_AVX512_TARGET inline void transpose4(const __m512i* z, __m512i* v) {
  const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
  const __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
  v[0] = _mm512_unpacklo_epi64(t0, t2);
  v[1] = _mm512_unpackhi_epi64(t0, t2);
  v[2] = _mm512_unpacklo_epi64(t1, t3);
  v[3] = _mm512_unpackhi_epi64(t1, t3);
}

// The unsigned weights of 4 transposed groups v: 4-bit, w + 8 of the low then the high
// nibbles (u[2j], u[2j + 1]); 8-bit, w + 128 (u[j]).
template <bool kPacked>
LLMCORE_AVX512_TARGET inline void unsigned_weights(const __m512i* v, __m512i* u) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(kPacked ? 0x88 : 0x80));
  const __m512i lo4 = _mm512_set1_epi8(0x0f);
  for (int j = 0; j < 4; ++j) {
    const __m512i f = _mm512_xor_si512(v[j], flip);
    if (kPacked) {
      u[2 * j] = _mm512_and_si512(f, lo4);
      u[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(f, 4), lo4);
    } else {
      u[j] = f;
    }
  }
}

// The activation rows in tiles of at most 8, as even as possible (16 -> 8 + 8, 10 -> 5 + 5),
// each tile's weight read from memory once and from cache for the next: f(m, R) for the
// tile of R rows from row m, R a compile-time constant (std::integral_constant).
constexpr int kMaxRowTile = 8;
template <class F>
inline void for_row_tiles(int64_t M, F&& f) {
  const int64_t tiles = (M + kMaxRowTile - 1) / kMaxRowTile;
  for (int64_t t = 0, m = 0; t < tiles; ++t) {
    const int64_t mt = (M - m) / (tiles - t);
    switch (mt) {
      case 1: f(m, std::integral_constant<int, 1>{}); break;
      case 2: f(m, std::integral_constant<int, 2>{}); break;
      case 3: f(m, std::integral_constant<int, 3>{}); break;
      case 4: f(m, std::integral_constant<int, 4>{}); break;
      case 5: f(m, std::integral_constant<int, 5>{}); break;
      case 6: f(m, std::integral_constant<int, 6>{}); break;
      case 7: f(m, std::integral_constant<int, 7>{}); break;
      default: f(m, std::integral_constant<int, 8>{});
    }
    m += mt;
  }
}

// MT activation rows against weight row wr (bytes long), one step of 256 weight bytes at a
// time: out[r] = the row's dot product.
template <int MT, bool kPacked>
LLMCORE_AVX512_TARGET void rows_avx512(const uint8_t* xq, int64_t xq_cols, const int32_t* corr,
                                       const float* xs, int64_t lanes, const uint8_t* wr,
                                       const uint8_t* er, int64_t bytes, int64_t nb, int shift,
                                       float* out) {
  constexpr int kVecs = kPacked ? 8 : 4;  // activation vectors per step and row
  // Block (from the step's first) of lane 4k + c: 4-bit 4c + k, 8-bit 2c + k / 2; an 8-bit
  // step has 8 blocks, so one weight_scales16 serves two steps.
  const __m512i lidx = kPacked
      ? _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15)
      : _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 1, 3, 5, 7, 1, 3, 5, 7);
  const int64_t steps = (bytes + kStepBytes - 1) / kStepBytes, full = bytes / kStepBytes;
  __m512 acc[MT];
  for (int r = 0; r < MT; ++r) acc[r] = _mm512_setzero_ps();
  __m512 sw16 = _mm512_setzero_ps();
  // One loop body for the full steps and the last, partial one (zeros past the row's end:
  // their activations are 0), so that the accumulators stay in registers.
  for (int64_t s = 0; s < steps; ++s) {
    const uint8_t* w = wr + s * kStepBytes;
    __m512i z[4];
    if (s < full) {
      for (int c = 0; c < 4; ++c) {
        _mm_prefetch(reinterpret_cast<const char*>(w + 64 * c + kPrefetchBytes), _MM_HINT_T0);
        z[c] = _mm512_loadu_si512(w + 64 * c);
      }
    } else {
      for (int c = 0; c < 4; ++c) {
        const int64_t left = bytes - s * kStepBytes - 64 * c;
        z[c] = left <= 0 ? _mm512_setzero_si512()
                         : _mm512_maskz_loadu_epi8(left >= 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1,
                                                   w + 64 * c);
      }
    }
    // lane 4k + c of v[j] = bytes 16k + 4j.. of chunk c
    __m512i v[4], u[kVecs];
    transpose4(z, v);
    unsigned_weights<kPacked>(v, u);
    __m512 sw;
    if (kPacked) {
      sw = _mm512_permutexvar_ps(lidx, weight_scales16(er, 16 * s, nb, shift));
    } else {
      if ((s & 1) == 0) sw16 = weight_scales16(er, 8 * s, nb, shift);
      sw = _mm512_permutexvar_ps((s & 1) ? _mm512_add_epi32(lidx, _mm512_set1_epi32(8)) : lidx,
                                 sw16);
    }
    for (int r = 0; r < MT; ++r) {
      const uint8_t* x = xq + r * xq_cols + s * kVecs * 64;
      // Two chains of vpdpbusd, so that its latency does not bound the loop.
      __m512i i0 = _mm512_loadu_si512(corr + r * lanes + s * 16), i1 = _mm512_setzero_si512();
      for (int j = 0; j < kVecs; j += 2) {
        i0 = _mm512_dpbusd_epi32(i0, u[j], _mm512_loadu_si512(x + 64 * j));
        i1 = _mm512_dpbusd_epi32(i1, u[j + 1], _mm512_loadu_si512(x + 64 * j + 64));
      }
      const __m512i isum = _mm512_add_epi32(i0, i1);
      const __m512 sc = _mm512_mul_ps(sw, _mm512_loadu_ps(xs + r * lanes + s * 16));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sc, acc[r]);
    }
  }
  for (int r = 0; r < MT; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

template <bool kPacked>
LLMCORE_AVX512_TARGET void gemv_avx512_t(const GemvQ8Plan& p, const uint8_t* xq,
                                         const int32_t* corr, const float* xs, const uint8_t* w_mant,
                                         int64_t w_row_stride, const uint8_t* w_exp,
                                         int64_t w_exp_stride, const float* bias, float* y,
                                         int64_t ldy, int64_t n_begin, int64_t n_end) {
  const int64_t M = p.M, xq_cols = p.xq_cols, lanes = p.groups;
  const int64_t bytes = mantissa_cols(p.K, p.w_bits), nb = exponent_cols(p.K, kBlock);
  const int shift = p.w_bits - 2;
  float out[kMaxRowTile];
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* wr = w_mant + n * w_row_stride;
    const uint8_t* er = w_exp + n * w_exp_stride;
    for_row_tiles(M, [&](int64_t m, auto rows) LLMCORE_AVX512_TARGET {
      constexpr int R = decltype(rows)::value;
      rows_avx512<R, kPacked>(xq + m * xq_cols, xq_cols, corr + m * lanes, xs + m * lanes, lanes,
                              wr, er, bytes, nb, shift, out);
      for (int r = 0; r < R; ++r) y[(m + r) * ldy + n] = bias ? out[r] + bias[n] : out[r];
    });
  }
}

// Rows (M >= 2) against 16 weight rows at a time, one block of 32 at a time: lane L of every
// vector belongs to output column n0 + col_of(L), so a block's int32 sums of all 16 columns
// come out in one vector, are scaled by one vector of block scales and accumulate in fp32
// lanes with no horizontal sums (one per column and row in the whole call, as stores).
// Per block and tile, the 16 columns' block bytes (16 each, 4-bit; 32, 8-bit, in two
// halves) are loaded as 128-bit pieces, four columns per vector, and transposed in 4-byte
// groups (8 unpacks, as the step kernel's): lane 4k + c then holds column 4c + k. Each group g of 4 bytes (4-bit: 8 elements, low nibbles then
// high; 8-bit: 4 elements) meets the row's matching 4 activation bytes broadcast from xq.
// The unpacking is shared by every row; each row costs 8 vpdpbusd, one conversion and one
// FMA per block and tile.
inline int col_of(int lane) { return 4 * (lane & 3) + (lane >> 2); }

// The block scales 2^(e - 127 - shift) (NaN for exponent byte 255) of the 16 columns
// whose exponent rows are cols[L] (lane order), every block: tab[b][L], fp32. Per 16
// blocks, the 16 rows' bytes are transposed (16 x 16 bytes, 64 unpacks).
LLMCORE_AVX512_TARGET void col_scales(const uint8_t* const* cols, int64_t nb, int shift,
                                      float* tab) {
  const __m512i bias = _mm512_set1_epi32(kExpBias + shift);
  const __m512i nan_e = _mm512_set1_epi32(kNaNExponent);
  const __m512 one = _mm512_set1_ps(1.0f), nan = _mm512_set1_ps(__builtin_nanf(""));
  for (int64_t b0 = 0; b0 < nb; b0 += 16) {
    const int64_t left = nb - b0 < 16 ? nb - b0 : 16;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xffff)
                                   : static_cast<__mmask16>((1u << left) - 1u);
    __m128i a[16], t[16];
    for (int i = 0; i < 16; ++i) a[i] = _mm_maskz_loadu_epi8(m, cols[i] + b0);
    for (int i = 0; i < 8; ++i) {  // byte pairs of rows 2i, 2i + 1
      t[2 * i] = _mm_unpacklo_epi8(a[2 * i], a[2 * i + 1]);
      t[2 * i + 1] = _mm_unpackhi_epi8(a[2 * i], a[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {  // rows 4i..4i+3, blocks 0-3, 4-7, 8-11, 12-15
      a[4 * i] = _mm_unpacklo_epi16(t[4 * i], t[4 * i + 2]);
      a[4 * i + 1] = _mm_unpackhi_epi16(t[4 * i], t[4 * i + 2]);
      a[4 * i + 2] = _mm_unpacklo_epi16(t[4 * i + 1], t[4 * i + 3]);
      a[4 * i + 3] = _mm_unpackhi_epi16(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int h = 0; h < 2; ++h)  // rows 8h..8h+7, two blocks each
      for (int q = 0; q < 4; ++q) {
        t[8 * h + 2 * q] = _mm_unpacklo_epi32(a[8 * h + q], a[8 * h + 4 + q]);
        t[8 * h + 2 * q + 1] = _mm_unpackhi_epi32(a[8 * h + q], a[8 * h + 4 + q]);
      }
    for (int p = 0; p < 8; ++p) {  // all 16 rows of blocks 2p, 2p + 1
      a[2 * p] = _mm_unpacklo_epi64(t[p], t[8 + p]);
      a[2 * p + 1] = _mm_unpackhi_epi64(t[p], t[8 + p]);
    }
    for (int j = 0; j < left; ++j) {
      const __m512i e = _mm512_cvtepu8_epi32(a[j]);
      const __m512 s = _mm512_scalef_ps(one, _mm512_cvtepi32_ps(_mm512_sub_epi32(e, bias)));
      _mm512_storeu_ps(tab + 16 * (b0 + j),
                      _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(e, nan_e), s, nan));
    }
  }
}

// Four columns' 16-byte pieces at byte `at` of their rows, in the 128-bit lanes of one
// vector; `tail` bytes of each (< 16: the row's last, partial block), zeros after.
LLMCORE_AVX512_TARGET inline __m512i load4(const uint8_t* const* r, int64_t at, int tail) {
  if (tail >= 16) {
    __m512i z = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r[0] + at)));
    z = _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[1] + at)), 1);
    z = _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[2] + at)), 2);
    return _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[3] + at)), 3);
  }
  const __mmask16 m = tail <= 0 ? 0 : static_cast<__mmask16>((1u << tail) - 1u);
  __m512i z = _mm512_castsi128_si512(_mm_maskz_loadu_epi8(m, r[0] + at));
  z = _mm512_inserti32x4(z, _mm_maskz_loadu_epi8(m, r[1] + at), 1);
  z = _mm512_inserti32x4(z, _mm_maskz_loadu_epi8(m, r[2] + at), 2);
  return _mm512_inserti32x4(z, _mm_maskz_loadu_epi8(m, r[3] + at), 3);
}

// acc[m] += the block-b products of MT activation rows with 16 columns whose unsigned
// weights u (8 groups of 4 bytes per lane) and scales sw (per lane) are in registers: per
// row 8 vpdpbusd (4-byte groups of the row's activation broadcast), a conversion and an FMA.
// acc + vpdpbusd(u, the 4 activation bytes at x in every lane), the broadcast folded into
// the instruction's memory operand ({1to16}): compilers emit a separate vpbroadcastd per
// call, 40 more vector ops per block of a 5-row tile on top of its 40 vpdpbusd (measured:
// 5 rows over 4-bit tiles 15.1 -> 14.2 ns per block with the weights in L2).
LLMCORE_AVX512_TARGET inline __m512i dpbusd_bcast(__m512i acc, __m512i u, const uint8_t* x) {
  __asm__("vpdpbusd %2%{1to16%}, %1, %0"
          : "+v"(acc)
          : "v"(u), "m"(*reinterpret_cast<const int32_t*>(x)));
  return acc;
}

// Per activation row m < MT: acc[m] += float(sum of the block's vpdpbusd lanes, from corr) *
// sw * xs[m][b]. kIntScale: sw holds the bits of sw / 2^127 as int32 lanes and the scale is
// the integer sum of those bits and xs's, the product of the two powers of two computed on
// the exponent field (an ALU op instead of a multiply on the two pipes vpdpbusd uses; the
// same bits as the multiply when every product is a normal float: the callers check).
template <int MT, bool kIntScale = false>
LLMCORE_AVX512_TARGET inline void block_rows(const uint8_t* xq, int64_t xq_cols,
                                             const int32_t* corr, const float* xs,
                                             int64_t groups, int64_t b, const __m512i* u,
                                             __m512 sw, __m512* acc) {
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) {
    const uint8_t* x = xq + m * xq_cols + b * 32;
    __m512i isum = _mm512_set1_epi32(corr[m * groups + b]);
    if (MT >= 6) {  // the rows' chains are independent: one chain per row hides the latency
#pragma GCC unroll 8
      for (int g = 0; g < 8; ++g) isum = dpbusd_bcast(isum, u[g], x + 4 * g);
    } else {  // two chains, so that vpdpbusd's latency does not bound the loop
      __m512i i1 = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int g = 0; g < 8; g += 2) {
        isum = dpbusd_bcast(isum, u[g], x + 4 * g);
        i1 = dpbusd_bcast(i1, u[g + 1], x + 4 * g + 4);
      }
      isum = _mm512_add_epi32(isum, i1);
    }
    __m512 sc;
    if constexpr (kIntScale) {
      int32_t xb;
      memcpy(&xb, xs + m * groups + b, sizeof(xb));
      sc = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(sw), _mm512_set1_epi32(xb)));
    } else {
      sc = _mm512_mul_ps(sw, _mm512_set1_ps(xs[m * groups + b]));
    }
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sc, acc[m]);
  }
}

// MT rows (xq / corr / xs from row 0 of these pointers) against the 16 columns at rows r
// (valid of them real; the others repeat one and are not stored): y[m][col] for m < MT.
template <int MT, bool kPacked>
LLMCORE_AVX512_TARGET void cols16_avx512(const GemvQ8Plan& p, const uint8_t* xq,
                                         const int32_t* corr, const float* xs,
                                         const uint8_t* const* r, int64_t ahead,
                                         const float* tab, const float* bias, float* y,
                                         int64_t ldy, int valid) {
  constexpr int kBlockBytes = kPacked ? 16 : 32;
  const int64_t nb = exponent_cols(p.K, kBlock), bytes = mantissa_cols(p.K, p.w_bits);
  const int64_t xq_cols = p.xq_cols, groups = p.groups;
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t at = b * kBlockBytes;
    // The next tile's rows (`ahead` bytes on), a line per row every 64 / kBlockBytes
    // blocks: the 16 interleaved rows are no stream the hardware prefetcher follows.
    constexpr int kPer = 16 * kBlockBytes / 64;
    for (int j = 0; j < kPer; ++j)
      _mm_prefetch(reinterpret_cast<const char*>(r[(b * kPer + j) & 15] + at + ahead),
                   _MM_HINT_T0);
    __m512i u[8];  // unsigned weights of group g: 4-bit w + 8 (low, high nibbles), 8-bit w + 128
    for (int h = 0; h < kBlockBytes / 16; ++h) {
      const int tail = static_cast<int>(bytes - at - 16 * h);
      __m512i z[4], v[4];
      for (int c = 0; c < 4; ++c) z[c] = load4(r + 4 * c, at + 16 * h, tail);
      transpose4(z, v);
      unsigned_weights<kPacked>(v, u + 4 * h);  // 8-bit: the half's 4 groups
    }
    block_rows<MT>(xq, xq_cols, corr, xs, groups, b, u, _mm512_loadu_ps(tab + 16 * b), acc);
  }
  // Lane L holds column col_of(L); col_of is its own inverse, so one permute puts the
  // columns in order.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __mmask16 keep = valid >= 16 ? static_cast<__mmask16>(0xffff)
                                     : static_cast<__mmask16>((1u << valid) - 1u);
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(keep, bias) : _mm512_setzero_ps();
  for (int m = 0; m < MT; ++m) {
    __m512 o = _mm512_permutexvar_ps(order, acc[m]);
    if (bias) o = _mm512_add_ps(o, bv);
    _mm512_mask_storeu_ps(y + m * ldy, keep, o);
  }
}

template <bool kPacked>
LLMCORE_AVX512_TARGET void gemv_cols_avx512_t(const GemvQ8Plan& p, const uint8_t* xq,
                                              const int32_t* corr, const float* xs,
                                              const uint8_t* w_mant, int64_t w_row_stride,
                                              const uint8_t* w_exp, int64_t w_exp_stride,
                                              const float* bias, float* y, int64_t ldy,
                                              int64_t n_begin, int64_t n_end) {
  const int64_t M = p.M, xq_cols = p.xq_cols, groups = p.groups, nb = p.groups;
  const int shift = p.w_bits - 2;
  thread_local std::vector<float> scales;  // [nb][16] of the tile
  if (static_cast<int64_t>(scales.size()) < 16 * nb) scales.resize(static_cast<size_t>(16 * nb));
  float* tab = scales.data();
  for (int64_t n0 = n_begin; n0 < n_end; n0 += 16) {
    const int valid = static_cast<int>(n_end - n0 < 16 ? n_end - n0 : 16);
    const uint8_t* r[16];
    const uint8_t* er[16];  // in lane order
    for (int i = 0; i < 16; ++i) {  // past the range: column 0 again (computed, not stored)
      r[i] = w_mant + (n0 + (i < valid ? i : 0)) * w_row_stride;
      er[i] = w_exp + (n0 + (col_of(i) < valid ? col_of(i) : 0)) * w_exp_stride;
    }
    col_scales(er, nb, shift, tab);
    const float* bn = bias ? bias + n0 : nullptr;
    for_row_tiles(M, [&](int64_t m, auto rows) LLMCORE_AVX512_TARGET {
      cols16_avx512<decltype(rows)::value, kPacked>(p, xq + m * xq_cols, corr + m * groups,
                                                    xs + m * groups, r, 16 * w_row_stride, tab,
                                                    bn, y + m * ldy + n0, ldy, valid);
    });
  }
}

// One activation row (decode, M = 1) on the plain layout (as AVX2's, with corr for 4-bit
// weights): per 64 weight bytes one (8-bit) or two (4-bit) vpdpbusd, a conversion, a
// permute of the combined block scales and one FMA, two accumulators in turn. With a single
// row there is nothing to share, so the 256-byte steps above cost more than they save
// (measured: the 110M head in MXINT4 2.2 vs 1.7 ms at 1 thread); this is the kernel for it.
template <bool kPacked>
LLMCORE_AVX512_TARGET void row1_avx512(const GemvQ8Plan& p, const uint8_t* xr,
                                       const int32_t* cr, const float* sr, const uint8_t* wr,
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
  __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t c0 = 0; c0 < nc; c0 += kChunks) {
    const int64_t b0 = c0 * kBlocksPerChunk;
    const __m512 s16 = _mm512_mul_ps(weight_scales16(er, b0, nb, shift), _mm512_loadu_ps(sr + b0));
    const int qn = nc - c0 < kChunks ? static_cast<int>(nc - c0) : kChunks;
#pragma GCC unroll 8
    for (int q = 0; q < kChunks; ++q) {
      if (q == qn) break;
      const int64_t c = c0 + q;
      const int64_t left = bytes - c * 64;
      _mm_prefetch(reinterpret_cast<const char*>(wr + c * 64 + kPrefetchBytes), _MM_HINT_T0);
      const __m512i raw = left >= 64 ? _mm512_loadu_si512(wr + c * 64)
                                     : _mm512_maskz_loadu_epi8((__mmask64{1} << left) - 1, wr + c * 64);
      __m512i isum;
      if (kPacked) {  // unsigned w + 8; the sum starts at -8 sum(a) (corr)
        const __m512i u = _mm512_xor_si512(raw, flip4);
        isum = _mm512_loadu_si512(cr + c * 16);
        isum = _mm512_dpbusd_epi32(isum, _mm512_and_si512(u, lo4), _mm512_loadu_si512(xr + c * 128));
        isum = _mm512_dpbusd_epi32(isum, _mm512_and_si512(_mm512_srli_epi16(u, 4), lo4),
                                   _mm512_loadu_si512(xr + c * 128 + 64));
      } else {  // (a + 128) w - 128 w
        const __m512i zero = _mm512_setzero_si512();
        const __m512i init = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, c128, raw));
        isum = _mm512_dpbusd_epi32(init, _mm512_loadu_si512(xr + c * 64), raw);
      }
      const __m512i idx = _mm512_add_epi32(lane_block, _mm512_set1_epi32(q * kBlocksPerChunk));
      __m512& a = acc[q & 1];
      a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_permutexvar_ps(idx, s16), a);
    }
  }
  *out = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
}

template <bool kPacked>
LLMCORE_AVX512_TARGET void gemv1_avx512_t(const GemvQ8Plan& p, const uint8_t* xq,
                                          const int32_t* corr, const float* xs,
                                          const uint8_t* w_mant, int64_t w_row_stride,
                                          const uint8_t* w_exp, int64_t w_exp_stride,
                                          const float* bias, float* y, int64_t n_begin,
                                          int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    float out;
    row1_avx512<kPacked>(p, xq, corr, xs, w_mant + n * w_row_stride, w_exp + n * w_exp_stride,
                         &out);
    y[n] = bias ? out + bias[n] : out;
  }
}
// The range of biased exponent fields among the activation scales xs (M rows of `groups`
// non-negative floats): [lo, hi], read off the bits' minimum and maximum (a non-negative
// float's bits grow with its value; NaN's exponent field reads 255).
struct ScaleRange {
  int lo, hi;
};
LLMCORE_AVX512_TARGET inline ScaleRange act_scale_range(const float* xs, int64_t n) {
  __m512i lo = _mm512_set1_epi32(INT32_MAX), hi = _mm512_set1_epi32(INT32_MIN);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xffff)
                                    : static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512i v = _mm512_maskz_loadu_epi32(m, xs + i);
    lo = _mm512_mask_min_epi32(lo, m, lo, v);
    hi = _mm512_mask_max_epi32(hi, m, hi, v);
  }
  const int32_t l = _mm512_reduce_min_epi32(lo), h = _mm512_reduce_max_epi32(hi);
  if (l < 0) return {-1, 255};  // a negative scale: never from block_scale; the slow path
  return {l >> 23, h >> 23};
}

// Whether the tile kernel may form sw * xs on the exponent fields (kIntScale): every weight
// scale 2^(e - 127 - shift) of the tile (exponent bytes te, n of them), every activation
// scale (range a) and every product of the two normal floats. Otherwise (NaN, zero or
// subnormal scales, products out of range) the multiplies, with IEEE results.
LLMCORE_AVX512_TARGET inline bool int_scales_exact(const uint8_t* te, int64_t n, int shift,
                                                   ScaleRange a) {
  if (a.lo < 1 || a.hi > 254) return false;
  __m512i lo = _mm512_set1_epi8(static_cast<char>(0xff)), hi = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 64) {
    const __mmask64 m = n - i >= 64 ? ~__mmask64{0} : (__mmask64{1} << (n - i)) - 1;
    const __m512i v = _mm512_maskz_loadu_epi8(m, te + i);
    lo = _mm512_mask_min_epu8(lo, m, lo, v);
    hi = _mm512_mask_max_epu8(hi, m, hi, v);
  }
  alignas(64) uint8_t l[64], h[64];
  _mm512_store_si512(l, lo);
  _mm512_store_si512(h, hi);
  int emin = 255, emax = 0;
  for (int i = 0; i < 64; ++i) {
    emin = l[i] < emin ? l[i] : emin;
    emax = h[i] > emax ? h[i] : emax;
  }
  if (emax == kNaNExponent) return false;
  const int wlo = emin - shift, whi = emax - shift;  // the weight scales' exponent fields
  return wlo >= 1 && whi <= 254 && wlo + a.lo - kExpBias >= 1 && whi + a.hi - kExpBias <= 254;
}

// MT rows against one tile of the tile layout (16 columns, in lane order): per block, 8
// (8-bit) or 4 (nibbles) sequential 64-byte loads, made unsigned as the other kernels do,
// the 16 columns' scales from 16 exponent bytes, and per row 8 vpdpbusd, a conversion and
// one FMA. No transposes, no horizontal sums; the whole weight is one stream. With several
// rows the arithmetic, not the memory, sets the pace (40 vpdpbusd a block for 5 rows of
// 4-bit tiles: vpdpbusd's two pipes are the bound), so the scales take the integer path
// (block_rows' kIntScale) where int_scales_exact allows: 5 rows over 4-bit tiles 14.2 ->
// 12.6 ns per block in L2, 1 row 5.1 (9.7 from DRAM).
template <int MT, bool kPacked, bool kIntScale>
LLMCORE_AVX512_TARGET void tile_blocks(const GemvQ8Plan& p, const uint8_t* xq,
                                       const int32_t* corr, const float* xs, const uint8_t* tw,
                                       const uint8_t* te, __m512* acc) {
  constexpr int kGroups = kPacked ? 4 : 8;  // 64-byte vectors per block
  // One row: 16 blocks ahead into L1 (4 KB of 4-bit tiles, 8 KB of 8-bit ones). 8-bit
  // tiles 4 KB ahead (8 blocks) left the 1-row MXINT8 GEMVs of the 110M slower per byte
  // than the same weights with 5 rows (17.7 against 22.7 GB/s, `benchmarks/decode_overhead.py
  // --parts`); 16 KB ahead slowed 4-bit tiles by 20-30%.
  constexpr int64_t kTileAhead1 = 16 * kGroups * 64;
  const int64_t nb = p.groups, xq_cols = p.xq_cols, groups = p.groups;
  const int shift = p.w_bits - 2;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* w = tw + b * kGroups * 64;
    __m512i z[4], u[8];
    for (int g = 0; g < kGroups; ++g) {
      if constexpr (MT == 1)
        _mm_prefetch(reinterpret_cast<const char*>(w + 64 * g + kTileAhead1), _MM_HINT_T0);
      else
        _mm_prefetch(reinterpret_cast<const char*>(w + 64 * g + kPrefetchRowsBytes), _MM_HINT_T1);
    }
    for (int h = 0; h < kGroups / 4; ++h) {  // 8-bit: two sets of 4 groups
      for (int j = 0; j < 4; ++j) z[j] = _mm512_loadu_si512(w + 256 * h + 64 * j);
      unsigned_weights<kPacked>(z, u + 4 * h);
    }
    // The 16 columns' 16 exponent bytes of the block, in lane order.
    __m512 sw;
    if constexpr (kIntScale) {  // (e - shift - 127) << 23: 2^(e - 127 - shift) / 2^127's bits
      const __m512i e = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(te + 16 * b)));
      sw = _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(shift + kExpBias)), 23));
    } else {
      sw = weight_scales16(te + 16 * b, 0, 16, shift);
    }
    block_rows<MT, kIntScale>(xq, xq_cols, corr, xs, groups, b, u, sw, acc);
  }
}

// int_scales: the tile passed int_scales_exact (the caller checks once per tile).
template <int MT, bool kPacked>
LLMCORE_AVX512_TARGET void tile_avx512(const GemvQ8Plan& p, const uint8_t* xq, const int32_t* corr,
                                       const float* xs, const uint8_t* tw, const uint8_t* te,
                                       bool int_scales, const float* bias, float* y, int64_t ldy) {
  __m512 acc[MT];  // in registers: the loops over rows are unrolled
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  if (int_scales)
    tile_blocks<MT, kPacked, true>(p, xq, corr, xs, tw, te, acc);
  else
    tile_blocks<MT, kPacked, false>(p, xq, corr, xs, tw, te, acc);
  const __m512 bv = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(y + m * ldy, _mm512_add_ps(acc[m], bv));
}

template <bool kPacked>
LLMCORE_AVX512_TARGET void gemv_tiles_avx512_t(const GemvQ8Plan& p, const uint8_t* xq,
                                               const int32_t* corr, const float* xs,
                                               const uint8_t* tmant, const uint8_t* texp,
                                               const float* bias, float* y, int64_t ldy,
                                               int64_t n_begin, int64_t n_end) {
  const int64_t nb = p.groups, xq_cols = p.xq_cols, groups = p.groups;
  const int64_t tile_bytes = 16 * nb * (kPacked ? 16 : 32);
  // One row is bound by the memory: the multiplies cost nothing there.
  const ScaleRange act = p.M > 1 ? act_scale_range(xs, p.M * groups) : ScaleRange{-1, 255};
  for (int64_t t = n_begin / 16; t < n_end / 16; ++t) {
    const uint8_t* tw = tmant + t * tile_bytes;
    const uint8_t* te = texp + t * nb * 16;
    const float* bt = bias ? bias + 16 * t : nullptr;
    const bool int_scales = p.M > 1 && int_scales_exact(te, 16 * nb, p.w_bits - 2, act);
    for_row_tiles(p.M, [&](int64_t m, auto rows) LLMCORE_AVX512_TARGET {
      tile_avx512<decltype(rows)::value, kPacked>(p, xq + m * xq_cols, corr + m * groups,
                                                  xs + m * groups, tw, te, int_scales, bt,
                                                  y + m * ldy + 16 * t, ldy);
    });
  }
}
// The column-tile layout of one activation row (prepare_cols_row's definition), 32 bytes a
// block: 4-bit weights take each 8-byte group's even elements then its odd ones (one
// vpshufb), 8-bit ones the bytes as they are; the block's sum from vpsadbw on a ^ 0x80
// (every one of the 32 lanes, zeros past K included, adds 128).
LLMCORE_AVX512_TARGET void prepare_cols_row_avx512(int64_t K, int64_t nb, bool packed,
                                                   const int8_t* ar, const uint8_t* er,
                                                   int a_bits, uint8_t* xr, int32_t* cr,
                                                   float* sr) {
  const __m256i order = _mm256_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15,
                                         0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t left = K - 32 * b;
    const __mmask32 m = left >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << left) - 1u);
    const __m256i v = _mm256_maskz_loadu_epi8(m, ar + 32 * b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xr + 32 * b),
                        packed ? _mm256_shuffle_epi8(v, order) : v);
    const __m256i s4 = _mm256_sad_epu8(_mm256_xor_si256(v, flip), _mm256_setzero_si256());
    const __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
    const int32_t sum = static_cast<int32_t>(_mm_cvtsi128_si64(s2) + _mm_extract_epi64(s2, 1)) -
                        32 * 128;
    cr[b] = (packed ? -8 : -128) * sum;
    sr[b] = block_scale(er[b], a_bits);
  }
}

// The step layout of one activation row for 8-bit weights (prepare_tiled_row's
// definition): per step of 256 activation bytes, the same 4x4 transpose of 4-byte groups as
// the weight's (transpose4), so xq's vector j holds the lanes' partners of weight bytes
// 4j..4j+3; each lane's sum of its 16 a from vpdpbusd with ones; the scales of the step's 8
// blocks permuted to the lanes (lane 4k + c: block 2c + k / 2).
LLMCORE_AVX512_TARGET void prepare_steps_row8_avx512(int64_t K, int64_t steps, const int8_t* ar,
                                                     const uint8_t* er, int a_bits, uint8_t* xr,
                                                     int32_t* cr, float* sr) {
  const int64_t nb = exponent_cols(K, kBlock);
  const __m512i ones = _mm512_set1_epi8(1);
  const __m512i lidx = _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 1, 3, 5, 7, 1, 3, 5, 7);
  alignas(64) float scale8[16] = {};
  for (int64_t s = 0; s < steps; ++s) {
    __m512i z[4], v[4];
    for (int c = 0; c < 4; ++c) {
      const int64_t left = K - s * kStepBytes - 64 * c;
      z[c] = left <= 0 ? _mm512_setzero_si512()
                       : _mm512_maskz_loadu_epi8(left >= 64 ? ~__mmask64{0}
                                                            : (__mmask64{1} << left) - 1,
                                                 ar + s * kStepBytes + 64 * c);
    }
    transpose4(z, v);
    __m512i sum = _mm512_setzero_si512();
    for (int j = 0; j < 4; ++j) {
      _mm512_storeu_si512(xr + s * kStepBytes + 64 * j, v[j]);
      sum = _mm512_dpbusd_epi32(sum, ones, v[j]);
    }
    _mm512_storeu_si512(cr + s * 16, _mm512_mullo_epi32(sum, _mm512_set1_epi32(-128)));
    for (int i = 0; i < 8; ++i) {
      const int64_t b = 8 * s + i;
      scale8[i] = b < nb ? block_scale(er[b], a_bits) : 0.0f;
    }
    _mm512_storeu_ps(sr + s * 16, _mm512_permutexvar_ps(lidx, _mm512_load_ps(scale8)));
  }
}

#undef LLMCORE_AVX512_TARGET
#pragma GCC diagnostic pop
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
  p.tiles = false;
#if defined(__x86_64__)
  const bool avx512 = active_isa() == Isa::kAvx512;
#else
  const bool avx512 = false;
#endif
  // M > 1: 4-bit weights take the column tiles, 8-bit ones the 256-byte steps (which
  // measured faster for them in the 110M's verification step: one sequential stream);
  // LLMCORE_CPU_GEMV=cols or =steps picks one for every weight (tests, A/B runs).
  const char* force = getenv("LLMCORE_CPU_GEMV");
  const bool cols = force && !strcmp(force, "cols")    ? true
                    : force && !strcmp(force, "steps") ? false
                                                       : is_packed(w_bits);
  p.cols = avx512 && M > 1 && cols;
  p.tiled = avx512 && M > 1 && !p.cols;
  p.row1 = avx512 && M == 1;  // one row: the single-row AVX-512 kernel, plain layout
  const int64_t bytes = mantissa_cols(K, w_bits);
  if (p.cols) {  // 32 activation bytes per block
    const int64_t nb = exponent_cols(K, kBlock);
    p.row_bytes = bytes;
    p.groups = nb;
    p.xq_cols = 32 * nb;
    return p;
  }
  if (p.tiled) {
    p.row_bytes = (bytes + kStepBytes - 1) / kStepBytes * kStepBytes;
    p.groups = p.row_bytes / kStepBytes * 16;
  } else {
    p.row_bytes = (bytes + 63) / 64 * 64;
    p.groups = p.row_bytes / 4;
  }
  p.xq_cols = is_packed(w_bits) ? 2 * p.row_bytes : p.row_bytes;
  return p;
}

GemvQ8Plan gemv_q8_plan_tiles(int64_t M, int64_t K, int w_bits) {
#if defined(__x86_64__)
  if (active_isa() == Isa::kAvx512) {
    GemvQ8Plan p = gemv_q8_plan(M, K, w_bits);
    const int64_t nb = exponent_cols(K, kBlock);
    p.tiles = p.cols = true;
    p.tiled = p.row1 = false;
    p.row_bytes = mantissa_cols(K, w_bits);
    p.groups = nb;
    p.xq_cols = 32 * nb;
    return p;
  }
#endif
  return gemv_q8_plan(M, K, w_bits);
}

bool tiles_supported(int64_t N, int64_t K, int bits, int block) {
  return block == kBlock && bits >= 2 && bits <= 8 && N >= 0 && N % 16 == 0 && K > 0 &&
         K % kBlock == 0;
}

namespace {

// Column c of one tile of the layout (tm, te) <-> its plain row (row / erow); Pack picks the
// direction. 4-byte groups move as one.
template <bool Pack>
void convert_column(uint8_t* row, uint8_t* erow, int64_t K, int bits, int c, uint8_t* tm,
                    uint8_t* te) {
  const int64_t nb = K / kBlock, bb = tile_block_bytes(bits), G = bb / 4;
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t g = 0; g < G; ++g) {
      uint8_t* packed = tm + ((b * G + g) * 16 + c) * 4;
      uint8_t* plain = row + b * bb + 4 * g;
      if (Pack) memcpy(packed, plain, 4);
      else memcpy(plain, packed, 4);
    }
    if (Pack) te[b * 16 + c] = erow[b];
    else erow[b] = te[b * 16 + c];
  }
}

// One tile <-> its 16 plain rows (row 0 at m / e, strides in bytes).
template <bool Pack>
void convert_tile(uint8_t* m, int64_t m_stride, uint8_t* e, int64_t e_stride, int64_t K,
                  int bits, uint8_t* tm, uint8_t* te) {
  for (int c = 0; c < 16; ++c)
    convert_column<Pack>(m + c * m_stride, e + c * e_stride, K, bits, c, tm, te);
}

// The AVX-512 step layout of one activation row (see gemv_q8_prepare in bfp_cpu.h).
void prepare_tiled_row(const GemvQ8Plan& p, const int8_t* ar, const uint8_t* er, int a_bits,
                       uint8_t* xr, int32_t* cr, float* sr) {
  const bool packed = is_packed(p.w_bits);
  const int64_t K = p.K, nb = exponent_cols(K, kBlock), steps = p.row_bytes / kStepBytes;
#if defined(__x86_64__)
  if (!packed && active_isa() == Isa::kAvx512) {  // as the kernels that read this layout
    prepare_steps_row8_avx512(K, steps, ar, er, a_bits, xr, cr, sr);
    return;
  }
#endif
  auto a = [&](int64_t e) -> int { return e < K ? ar[e] : 0; };
  memset(xr, 0, static_cast<size_t>(p.xq_cols));
  for (int64_t s = 0; s < steps; ++s) {
    for (int L = 0; L < 16; ++L) {
      const int c = L & 3, k = L >> 2;
      const int64_t b0 = s * kStepBytes + 64 * c + 16 * k;  // the lane's first weight byte
      int32_t sum = 0;
      for (int j = 0; j < 4; ++j) {
        for (int i = 0; i < 4; ++i) {
          const int64_t byte = b0 + 4 * j + i;
          if (packed) {
            const int lo = a(2 * byte), hi = a(2 * byte + 1);
            xr[s * 512 + j * 128 + L * 4 + i] = static_cast<uint8_t>(lo);
            xr[s * 512 + j * 128 + 64 + L * 4 + i] = static_cast<uint8_t>(hi);
            sum += lo + hi;
          } else {
            const int v = a(byte);
            xr[s * 256 + j * 64 + L * 4 + i] = static_cast<uint8_t>(v);
            sum += v;
          }
        }
      }
      cr[s * 16 + L] = (packed ? -8 : -128) * sum;
      const int64_t b = packed ? b0 / 16 : b0 / 32;
      sr[s * 16 + L] = b < nb ? block_scale(er[b], a_bits) : 0.0f;
    }
  }
}


// The AVX-512 column-tile layout of one activation row (see gemv_q8_prepare in bfp_cpu.h).
void prepare_cols_row(const GemvQ8Plan& p, const int8_t* ar, const uint8_t* er, int a_bits,
                      uint8_t* xr, int32_t* cr, float* sr) {
  const bool packed = is_packed(p.w_bits);
  const int64_t K = p.K, nb = p.groups;
#if defined(__x86_64__)
  if (active_isa() == Isa::kAvx512) {  // as the kernels that read this layout
    prepare_cols_row_avx512(K, nb, packed, ar, er, a_bits, xr, cr, sr);
    return;
  }
#endif
  for (int64_t b = 0; b < nb; ++b) {
    int32_t sum = 0;
    for (int i = 0; i < 32; ++i) {
      const int64_t e = 32 * b + i;
      const int v = e < K ? ar[e] : 0;
      // 4-bit: group 2j holds elements 8j + 0, 2, 4, 6 (the low nibbles of bytes 4j..4j+3),
      // group 2j + 1 elements 8j + 1, 3, 5, 7; 8-bit: in order.
      const int pos = packed ? (i >> 3) * 8 + (i & 1) * 4 + ((i & 7) >> 1) : i;
      xr[32 * b + pos] = static_cast<uint8_t>(v);
      sum += v;
    }
    cr[b] = (packed ? -8 : -128) * sum;
    sr[b] = block_scale(er[b], a_bits);
  }
}

}  // namespace

void gemv_q8_prepare(const GemvQ8Plan& p, const int8_t* a_mant, int64_t a_row_stride,
                     const uint8_t* a_exp, int64_t a_exp_stride, int a_bits, int8_t* xq,
                     int32_t* corr, float* xs) {
  const bool packed = is_packed(p.w_bits);
  // Locals: stores through the byte pointers could alias p's fields.
  const int64_t K = p.K, nb = exponent_cols(K, kBlock), cols = p.xq_cols, groups = p.groups;
  for (int64_t m = 0; m < p.M; ++m) {
    const int8_t* ar = a_mant + m * a_row_stride;
    auto* xr = reinterpret_cast<uint8_t*>(xq + m * cols);
    const uint8_t* er = a_exp + m * a_exp_stride;
    if (p.tiled || p.cols) {
      (p.cols ? prepare_cols_row : prepare_tiled_row)(p, ar, er, a_bits, xr, corr + m * groups,
                                                      xs + m * groups);
      continue;
    }
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
      if (p.row1) {  // the single-row kernel: -8 * (sum of the 8 a of each 4-byte group)
        int32_t* cr = corr + m * groups;
        for (int64_t g = 0; g < groups; ++g) {
          int32_t sum = 0;
          for (int64_t i = g * 8; i < g * 8 + 8 && i < K; ++i) sum += ar[i];
          cr[g] = -8 * sum;
        }
      }
    } else {  // a + 128
      for (; e < K; ++e) xr[e] = static_cast<uint8_t>(ar[e] ^ 0x80);
      memset(xr + e, 0x80, static_cast<size_t>(cols - e));
    }
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
  if (p.cols) {  // the layouts prepared for the AVX-512 kernels
    auto f = is_packed(p.w_bits) ? gemv_cols_avx512_t<true> : gemv_cols_avx512_t<false>;
    f(p, xu, corr, xs, w_mant, w_row_stride, w_exp, w_exp_stride, bias, y, ldy, n_begin, n_end);
    return;
  }
  if (p.tiled) {
    auto f = is_packed(p.w_bits) ? gemv_avx512_t<true> : gemv_avx512_t<false>;
    f(p, xu, corr, xs, w_mant, w_row_stride, w_exp, w_exp_stride, bias, y, ldy, n_begin, n_end);
    return;
  }
  if (p.row1) {  // chosen with the layout (plain, corr filled) when planned
    auto f = is_packed(p.w_bits) ? gemv1_avx512_t<true> : gemv1_avx512_t<false>;
    f(p, xu, corr, xs, w_mant, w_row_stride, w_exp, w_exp_stride, bias, y, n_begin, n_end);
    return;
  }
  if (active_isa() == Isa::kAvx2) {
    gemv_avx2(p, xu, xs, w_mant, w_row_stride, w_exp, w_exp_stride, bias, y, ldy, n_begin, n_end);
    return;
  }
#endif
  gemv_scalar(p, xu, xs, w_mant, w_row_stride, w_exp, w_exp_stride, bias, y, ldy, n_begin, n_end);
}

void tiles_pack(const uint8_t* mant, int64_t mant_stride, const uint8_t* exp, int64_t exp_stride,
                int64_t K, int bits, uint8_t* tmant, uint8_t* texp, int64_t t_begin,
                int64_t t_end) {
  const int64_t nb = K / kBlock, tile_bytes = 16 * nb * tile_block_bytes(bits);
  for (int64_t t = t_begin; t < t_end; ++t)
    convert_tile<true>(const_cast<uint8_t*>(mant + 16 * t * mant_stride), mant_stride,
                       const_cast<uint8_t*>(exp + 16 * t * exp_stride), exp_stride, K, bits,
                       tmant + t * tile_bytes, texp + t * 16 * nb);
}

void tiles_unpack(const uint8_t* tmant, const uint8_t* texp, int64_t K, int bits, uint8_t* mant,
                  int64_t mant_stride, uint8_t* exp, int64_t exp_stride, int64_t t_begin,
                  int64_t t_end) {
  const int64_t nb = K / kBlock, tile_bytes = 16 * nb * tile_block_bytes(bits);
  for (int64_t t = t_begin; t < t_end; ++t)
    convert_tile<false>(mant + 16 * t * mant_stride, mant_stride, exp + 16 * t * exp_stride,
                        exp_stride, K, bits, const_cast<uint8_t*>(tmant + t * tile_bytes),
                        const_cast<uint8_t*>(texp + t * 16 * nb));
}

void tiles_row(const uint8_t* tmant, const uint8_t* texp, int64_t K, int bits, int64_t row,
               uint8_t* mant, uint8_t* exp) {
  const int64_t nb = K / kBlock, tile_bytes = 16 * nb * tile_block_bytes(bits), t = row / 16;
  convert_column<false>(mant, exp, K, bits, static_cast<int>(row % 16),
                        const_cast<uint8_t*>(tmant + t * tile_bytes),
                        const_cast<uint8_t*>(texp + t * 16 * nb));
}

void gemv_q8_tiles(const GemvQ8Plan& p, const int8_t* xq, const int32_t* corr, const float* xs,
                   const uint8_t* tmant, const uint8_t* texp, const float* bias, float* y,
                   int64_t ldy, int64_t n_begin, int64_t n_end) {
#if defined(__x86_64__)
  if (p.tiles) {
    auto f = is_packed(p.w_bits) ? gemv_tiles_avx512_t<true> : gemv_tiles_avx512_t<false>;
    f(p, reinterpret_cast<const uint8_t*>(xq), corr, xs, tmant, texp, bias, y, ldy, n_begin,
      n_end);
    return;
  }
#endif
  // Planned without the tile kernel (another ISA): unpack 16 rows at a time and run the
  // plain kernels on them.
  const int64_t nb = p.K / kBlock, bb = tile_block_bytes(p.w_bits);
  thread_local std::vector<uint8_t> rows;
  if (static_cast<int64_t>(rows.size()) < 16 * nb * (bb + 1))
    rows.resize(static_cast<size_t>(16 * nb * (bb + 1)));
  uint8_t* m = rows.data();
  uint8_t* e = m + 16 * nb * bb;
  for (int64_t t = n_begin / 16; t < n_end / 16; ++t) {
    convert_tile<false>(m, nb * bb, e, nb, p.K, p.w_bits,
                        const_cast<uint8_t*>(tmant + t * 16 * nb * bb),
                        const_cast<uint8_t*>(texp + t * 16 * nb));
    gemv_q8(p, xq, corr, xs, m, nb * bb, e, nb, bias ? bias + 16 * t : nullptr, y + 16 * t, ldy, 0,
            16);
  }
}

}  // namespace cpu
}  // namespace bfp
}  // namespace llmcore
