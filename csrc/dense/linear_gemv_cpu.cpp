// Dense GEMV for decoding (M <= 16 rows): y = x @ w^T (+ bias) with fp32, bf16 or fp16
// weights, streamed once at memory bandwidth (dense_cpu.h gives the contract).
//
// At M = 1 a GEMV does one multiply-add per weight element it reads, so it is bound by
// memory; torch's F.linear reached 4-5 GB/s of bf16 weights on the 2-core Xeon against
// ~9 GB/s per core of streaming bandwidth. Here each weight row is one sequential stream,
// loaded 64 bytes at a time with a software prefetch a few KB ahead, and every activation
// row multiplies the same load (rows in tiles of up to 8 whose weight row comes from L1
// after the first tile):
//   AVX-512 + AVX512_BF16  bf16: vdpbf16ps multiplies 32 bf16 pairs exactly and adds them
//                          into 16 fp32 lanes (inputs' subnormals read as zero, the
//                          instruction's rule); the activation rows stay bf16.
//   AVX-512                fp32 as is; fp16 widened with vcvtph2ps, bf16 (without
//                          AVX512_BF16) with a 16-bit shift; FMAs into fp32 lanes against
//                          activation rows widened to fp32 once per call.
//   AVX2                   the same with 8 fp32 lanes, the row tail through a zeroed buffer.
//   scalar                 the definition, one fp32 sum per output.
// The activation rows are laid out once per call (gemv_prepare) with zeros from K to a
// multiple of 32, so only the weight needs masked loads at the end of a row. Two
// accumulators per row keep the FMA latency off the critical path; the sum of a row
// depends on M (its tile) and K only, so any column split gives the same bits.
//
// Build: part of llmcore._C (python setup.py build_ext --inplace).
#include "dense/dense_cpu.h"

#include <stdlib.h>
#include <string.h>

#include "common/half_convert.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace llmcore {
namespace dense {
namespace cpu {
namespace {

constexpr int64_t kPad = 32;  // the activation rows' length is a multiple of this
// How far ahead of the bytes in use the weight stream is prefetched (as the BFP GEMV).
#ifndef LLMCORE_GEMV_PREFETCH
#define LLMCORE_GEMV_PREFETCH 4096
#endif
constexpr int64_t kPrefetchBytes = LLMCORE_GEMV_PREFETCH;

Isa best_isa() {
  const CpuFeatures& f = cpu_features();
  if (f.avx512f && f.avx512bw && f.avx512vl && f.fma) return Isa::kAvx512;
  if (f.avx2 && f.fma && f.f16c) return Isa::kAvx2;
  return Isa::kScalar;
}

bool bf16_dot_enabled() {
  const char* env = getenv("LLMCORE_CPU_BF16_DOT");
  return cpu_features().avx512bf16 && !(env && !strcmp(env, "0"));
}

template <DType T>
inline float wload(const uint8_t* w, int64_t i) {
  if constexpr (T == DType::kBFloat16) return bf16_to_f32(reinterpret_cast<const uint16_t*>(w)[i]);
  else if constexpr (T == DType::kFloat16) return f16_to_f32(reinterpret_cast<const uint16_t*>(w)[i]);
  else return reinterpret_cast<const float*>(w)[i];
}

// ---- scalar ----------------------------------------------------------------------------
template <DType T>
void gemv_scalar(const GemvPlan& p, const float* xs, const uint8_t* w, int64_t ldw_bytes,
                 const void* bias, void* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* wr = w + n * ldw_bytes;
    const float b = bias ? load_float(bias, T, n) : 0.0f;
    for (int64_t m = 0; m < p.M; ++m) {
      const float* xr = xs + m * p.kp;
      float acc = 0.0f;
      for (int64_t k = 0; k < p.K; ++k) acc += wload<T>(wr, k) * xr[k];
      store_float(y, T, m * ldy + n, acc + b);
    }
  }
}

#if defined(__x86_64__)
// GCC 12's intrinsic headers build _mm512_reduce_add_ps and the 256-bit casts on
// _mm256_undefined_*(), which its own -Wuninitialized then flags.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// ---- AVX2 ------------------------------------------------------------------------------
#define LLMCORE_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))

// 16 weight elements from p (left of them in the row; fewer than 16: the rest read as 0)
// as two vectors of 8 fp32.
template <DType T>
LLMCORE_AVX2_TARGET inline void load16_avx2(const uint8_t* p, int64_t left, __m256& w0,
                                            __m256& w1) {
  constexpr int64_t kEl = T == DType::kFloat32 ? 4 : 2;
  alignas(32) uint8_t tail[64];
  if (left < 16) {
    memset(tail, 0, sizeof(tail));
    memcpy(tail, p, static_cast<size_t>(left * kEl));
    p = tail;
  }
  if constexpr (T == DType::kFloat32) {
    w0 = _mm256_loadu_ps(reinterpret_cast<const float*>(p));
    w1 = _mm256_loadu_ps(reinterpret_cast<const float*>(p) + 8);
  } else {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
    if constexpr (T == DType::kFloat16) {
      w0 = _mm256_cvtph_ps(a);
      w1 = _mm256_cvtph_ps(b);
    } else {
      w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(a), 16));
      w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
    }
  }
}

LLMCORE_AVX2_TARGET inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// MT activation rows (fp32, row stride kp) against weight row wr: out[r].
template <DType T, int MT>
LLMCORE_AVX2_TARGET void rows_avx2(const GemvPlan& p, const float* xs, const uint8_t* wr,
                                   float* out) {
  constexpr int64_t kEl = T == DType::kFloat32 ? 4 : 2;
  __m256 acc0[MT], acc1[MT];
  for (int r = 0; r < MT; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < p.K; k += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(wr + k * kEl + kPrefetchBytes), _MM_HINT_T0);
    __m256 w0, w1;
    load16_avx2<T>(wr + k * kEl, p.K - k, w0, w1);
    for (int r = 0; r < MT; ++r) {
      const float* xr = xs + r * p.kp + k;
      acc0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc0[r]);
      acc1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc1[r]);
    }
  }
  for (int r = 0; r < MT; ++r) out[r] = hsum256(_mm256_add_ps(acc0[r], acc1[r]));
}

template <DType T>
LLMCORE_AVX2_TARGET void gemv_avx2(const GemvPlan& p, const float* xs, const uint8_t* w,
                                   int64_t ldw_bytes, const void* bias, void* y, int64_t ldy,
                                   int64_t n_begin, int64_t n_end) {
  constexpr int kMaxMT = 4;
  const int64_t tiles = (p.M + kMaxMT - 1) / kMaxMT;
  float out[kMaxMT];
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* wr = w + n * ldw_bytes;
    const float b = bias ? load_float(bias, T, n) : 0.0f;
    for (int64_t t = 0, m = 0; t < tiles; ++t) {
      const int64_t mt = (p.M - m) / (tiles - t);
      const float* x = xs + m * p.kp;
      switch (mt) {
        case 1: rows_avx2<T, 1>(p, x, wr, out); break;
        case 2: rows_avx2<T, 2>(p, x, wr, out); break;
        case 3: rows_avx2<T, 3>(p, x, wr, out); break;
        default: rows_avx2<T, 4>(p, x, wr, out);
      }
      for (int64_t r = 0; r < mt; ++r) store_float(y, T, (m + r) * ldy + n, out[r] + b);
      m += mt;
    }
  }
}
#undef LLMCORE_AVX2_TARGET

// ---- AVX-512 -----------------------------------------------------------------------------
#define LLMCORE_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))
#define LLMCORE_AVX512BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma,f16c")))

LLMCORE_AVX512_TARGET inline __mmask32 mask32(int64_t left) {
  return left >= 32 ? static_cast<__mmask32>(0xffffffffu)
                    : static_cast<__mmask32>((uint32_t{1} << left) - 1u);
}

LLMCORE_AVX512_TARGET inline __mmask16 mask16(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff)
                    : left <= 0 ? static_cast<__mmask16>(0)
                                : static_cast<__mmask16>((1u << left) - 1u);
}

// 32 weight elements from p (left of them in the row; past it they read as 0) as two
// vectors of 16 fp32.
template <DType T>
LLMCORE_AVX512_TARGET inline void load32_avx512(const uint8_t* p, int64_t left, __m512& w0,
                                                __m512& w1) {
  if constexpr (T == DType::kFloat32) {
    const auto* f = reinterpret_cast<const float*>(p);
    w0 = left >= 16 ? _mm512_loadu_ps(f) : _mm512_maskz_loadu_ps(mask16(left), f);
    w1 = left >= 32 ? _mm512_loadu_ps(f + 16) : _mm512_maskz_loadu_ps(mask16(left - 16), f + 16);
  } else {
    const __m256i a = left >= 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                 : _mm256_maskz_loadu_epi16(mask16(left), p);
    const __m256i b = left >= 32 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))
                                 : _mm256_maskz_loadu_epi16(mask16(left - 16), p + 32);
    if constexpr (T == DType::kFloat16) {
      w0 = _mm512_cvtph_ps(a);
      w1 = _mm512_cvtph_ps(b);
    } else {
      w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(a), 16));
      w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
    }
  }
}

// MT activation rows (fp32, row stride kp) against weight row wr: out[r].
template <DType T, int MT>
LLMCORE_AVX512_TARGET void rows_avx512(const GemvPlan& p, const float* xs, const uint8_t* wr,
                                       float* out) {
  constexpr int64_t kEl = T == DType::kFloat32 ? 4 : 2;
  __m512 acc0[MT], acc1[MT];
  for (int r = 0; r < MT; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < p.K; k += 32) {
    const uint8_t* wk = wr + k * kEl;
    _mm_prefetch(reinterpret_cast<const char*>(wk + kPrefetchBytes), _MM_HINT_T0);
    if constexpr (kEl == 4)
      _mm_prefetch(reinterpret_cast<const char*>(wk + kPrefetchBytes + 64), _MM_HINT_T0);
    __m512 w0, w1;
    load32_avx512<T>(wk, p.K - k, w0, w1);
    for (int r = 0; r < MT; ++r) {
      const float* xr = xs + r * p.kp + k;
      acc0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc0[r]);
      acc1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc1[r]);
    }
  }
  for (int r = 0; r < MT; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
}

// bf16 with AVX512_BF16: MT activation rows (bf16, row stride kp) against weight row wr;
// steps of 32 elements alternate between two accumulators per row.
template <int MT>
LLMCORE_AVX512BF16_TARGET inline void dot_step(const uint16_t* xs, int64_t kp, const uint16_t* wr,
                                               int64_t k, int64_t K, __m512* acc) {
  _mm_prefetch(reinterpret_cast<const char*>(wr + k) + kPrefetchBytes, _MM_HINT_T0);
  const int64_t left = K - k;
  const __m512i w = left >= 32 ? _mm512_loadu_si512(wr + k) : _mm512_maskz_loadu_epi16(mask32(left), wr + k);
  for (int r = 0; r < MT; ++r)
    acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)w, (__m512bh)_mm512_loadu_si512(xs + r * kp + k));
}

template <int MT>
LLMCORE_AVX512BF16_TARGET void rows_avx512_bf16dot(const GemvPlan& p, const uint16_t* xs,
                                                   const uint8_t* w, float* out) {
  const auto* wr = reinterpret_cast<const uint16_t*>(w);
  __m512 acc0[MT], acc1[MT];
  for (int r = 0; r < MT; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 < p.K; k += 64) {
    dot_step<MT>(xs, p.kp, wr, k, p.K, acc0);
    dot_step<MT>(xs, p.kp, wr, k + 32, p.K, acc1);
  }
  if (k < p.K) dot_step<MT>(xs, p.kp, wr, k, p.K, acc0);
  for (int r = 0; r < MT; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
}

// (Compiled for AVX-512 without AVX512_BF16: it calls the bf16 dot tiles, not inlines them.)
template <DType T, bool kDot>
LLMCORE_AVX512_TARGET void gemv_avx512(const GemvPlan& p, const void* xs, const uint8_t* w,
                                           int64_t ldw_bytes, const void* bias, void* y,
                                           int64_t ldy, int64_t n_begin, int64_t n_end) {
  constexpr int kMaxMT = 8;
  // Rows in tiles of at most 8, as even as possible: the weight row is read from memory
  // once and from L1 for the next tile.
  const int64_t tiles = (p.M + kMaxMT - 1) / kMaxMT;
  const int64_t x_el = kDot ? 2 : 4;
  float out[kMaxMT];
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* wr = w + n * ldw_bytes;
    const float b = bias ? load_float(bias, T, n) : 0.0f;
    for (int64_t t = 0, m = 0; t < tiles; ++t) {
      const int64_t mt = (p.M - m) / (tiles - t);
      const void* x = static_cast<const uint8_t*>(xs) + m * p.kp * x_el;
      if constexpr (kDot) {
        const auto* xb = static_cast<const uint16_t*>(x);
        switch (mt) {
          case 1: rows_avx512_bf16dot<1>(p, xb, wr, out); break;
          case 2: rows_avx512_bf16dot<2>(p, xb, wr, out); break;
          case 3: rows_avx512_bf16dot<3>(p, xb, wr, out); break;
          case 4: rows_avx512_bf16dot<4>(p, xb, wr, out); break;
          case 5: rows_avx512_bf16dot<5>(p, xb, wr, out); break;
          case 6: rows_avx512_bf16dot<6>(p, xb, wr, out); break;
          case 7: rows_avx512_bf16dot<7>(p, xb, wr, out); break;
          default: rows_avx512_bf16dot<8>(p, xb, wr, out);
        }
      } else {
        const auto* xf = static_cast<const float*>(x);
        switch (mt) {
          case 1: rows_avx512<T, 1>(p, xf, wr, out); break;
          case 2: rows_avx512<T, 2>(p, xf, wr, out); break;
          case 3: rows_avx512<T, 3>(p, xf, wr, out); break;
          case 4: rows_avx512<T, 4>(p, xf, wr, out); break;
          case 5: rows_avx512<T, 5>(p, xf, wr, out); break;
          case 6: rows_avx512<T, 6>(p, xf, wr, out); break;
          case 7: rows_avx512<T, 7>(p, xf, wr, out); break;
          default: rows_avx512<T, 8>(p, xf, wr, out);
        }
      }
      for (int64_t r = 0; r < mt; ++r) store_float(y, T, (m + r) * ldy + n, out[r] + b);
      m += mt;
    }
  }
}
#undef LLMCORE_AVX512_TARGET
#undef LLMCORE_AVX512BF16_TARGET
#pragma GCC diagnostic pop
#endif  // __x86_64__

template <DType T>
void gemv_typed(const GemvPlan& p, const void* xs, const uint8_t* w, int64_t ldw_bytes,
                const void* bias, void* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
#if defined(__x86_64__)
  if (p.isa == Isa::kAvx512) {
    if constexpr (T == DType::kBFloat16) {
      if (p.layout == XLayout::kBf16) {
        gemv_avx512<T, true>(p, xs, w, ldw_bytes, bias, y, ldy, n_begin, n_end);
        return;
      }
    }
    gemv_avx512<T, false>(p, xs, w, ldw_bytes, bias, y, ldy, n_begin, n_end);
    return;
  }
  if (p.isa == Isa::kAvx2) {
    gemv_avx2<T>(p, static_cast<const float*>(xs), w, ldw_bytes, bias, y, ldy, n_begin, n_end);
    return;
  }
#endif
  gemv_scalar<T>(p, static_cast<const float*>(xs), w, ldw_bytes, bias, y, ldy, n_begin, n_end);
}

}  // namespace

GemvPlan gemv_plan(int64_t M, int64_t K, DType dtype) {
  static const Isa best = best_isa();
  GemvPlan p;
  p.M = M;
  p.K = K;
  p.kp = (K + kPad - 1) / kPad * kPad;
  p.dtype = dtype;
  p.isa = choose_isa(best, /*has_avx2=*/true);
  p.layout = p.isa == Isa::kAvx512 && dtype == DType::kBFloat16 && bf16_dot_enabled()
                 ? XLayout::kBf16
                 : XLayout::kF32;
  return p;
}

int64_t gemv_scratch_bytes(const GemvPlan& p) {
  return p.M * p.kp * (p.layout == XLayout::kBf16 ? 2 : 4);
}

void gemv_prepare(const GemvPlan& p, const void* x, int64_t ldx, void* scratch) {
  if (p.layout == XLayout::kBf16) {
    auto* xs = static_cast<uint16_t*>(scratch);
    for (int64_t m = 0; m < p.M; ++m) {
      memcpy(xs + m * p.kp, static_cast<const uint16_t*>(x) + m * ldx, static_cast<size_t>(p.K * 2));
      memset(xs + m * p.kp + p.K, 0, static_cast<size_t>((p.kp - p.K) * 2));
    }
    return;
  }
  auto* xs = static_cast<float*>(scratch);
  for (int64_t m = 0; m < p.M; ++m) {
    float* xr = xs + m * p.kp;
    for (int64_t k = 0; k < p.K; ++k) xr[k] = load_float(x, p.dtype, m * ldx + k);
    for (int64_t k = p.K; k < p.kp; ++k) xr[k] = 0.0f;
  }
}

void gemv(const GemvPlan& p, const void* scratch, const void* w, int64_t ldw, const void* bias,
          void* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  const auto* wb = static_cast<const uint8_t*>(w);
  const int64_t ldw_bytes = ldw * dtype_size(p.dtype);
  switch (p.dtype) {
    case DType::kBFloat16:
      gemv_typed<DType::kBFloat16>(p, scratch, wb, ldw_bytes, bias, y, ldy, n_begin, n_end);
      break;
    case DType::kFloat16:
      gemv_typed<DType::kFloat16>(p, scratch, wb, ldw_bytes, bias, y, ldy, n_begin, n_end);
      break;
    default:
      gemv_typed<DType::kFloat32>(p, scratch, wb, ldw_bytes, bias, y, ldy, n_begin, n_end);
  }
}

}  // namespace cpu
}  // namespace dense
}  // namespace llmcore
