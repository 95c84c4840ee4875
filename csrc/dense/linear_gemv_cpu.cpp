// Dense GEMV for decoding (M <= 16 rows): y = x @ w^T (+ bias) with fp32, bf16 or fp16
// weights, streamed once at memory bandwidth (dense_cpu.h gives the contract).
//
// At M = 1 a GEMV does one multiply-add per weight element it reads, so it is bound by
// memory; torch's F.linear reached 4-5 GB/s of bf16 weights on the 2-core Xeon against
// ~9 GB/s per core of streaming bandwidth. Here weight rows go in blocks of 4, four
// sequential streams loaded 64 bytes at a time with a software prefetch a few KB ahead,
// and every activation row multiplies the same loads (activation rows in tiles of up to 4;
// after the first tile the block comes from L1):
//   AVX-512 + AVX512_BF16  bf16: vdpbf16ps multiplies 32 bf16 pairs exactly and adds them
//                          into 16 fp32 lanes (inputs' subnormals read as zero, the
//                          instruction's rule); the activation rows stay bf16.
//   AVX-512                fp32 as is; fp16 widened with vcvtph2ps, bf16 (without
//                          AVX512_BF16) with a 16-bit shift; FMAs into fp32 lanes against
//                          activation rows widened to fp32 once per call.
//   AVX2                   the same with 8 fp32 lanes, the row tail through a zeroed buffer.
//   scalar                 the definition, one fp32 sum per output.
// The activation rows are laid out once per call (gemv_prepare) with zeros from K to a
// multiple of 32, so only the weight needs masked loads at the end of a row. Each output
// has its own accumulator, summed in the same order whatever block or tile it falls in,
// so any column split (any thread count) gives the same bits.
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
// How far ahead in a weight row the AVX2 kernel prefetches. The AVX-512 kernel prefetches
// the next block of rows instead, into L2 (prefetcht1): with four row streams prefetched
// into L1 the AMD EPYC VM read 9 GB/s of cold bf16 weights at one thread.
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
  const auto* h = reinterpret_cast<const uint16_t*>(w);
  if constexpr (T == DType::kBFloat16) return bf16_to_f32(h[i]);
  else if constexpr (T == DType::kFloat16) return f16_to_f32(h[i]);
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

// NR weight rows (wr[i]) against MT activation rows (fp32, row stride kp): out[i * MT + r].
// One accumulator per (weight row, activation row): NR * MT independent FMA chains, and
// each output's sum runs in the same order whatever NR and MT are.
template <DType T, int NR, int MT>
LLMCORE_AVX512_TARGET void block_avx512(const GemvPlan& p, const float* xs,
                                        const uint8_t* const* wr, int64_t pf, float* out) {
  constexpr int64_t kEl = T == DType::kFloat32 ? 4 : 2;
  __m512 acc[NR][MT];
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MT; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < p.K; k += 32) {
    __m512 w0[NR], w1[NR];
    for (int i = 0; i < NR; ++i) {
      const uint8_t* wk = wr[i] + k * kEl;
      _mm_prefetch(reinterpret_cast<const char*>(wk + pf), _MM_HINT_T1);
      if constexpr (kEl == 4)
        _mm_prefetch(reinterpret_cast<const char*>(wk + pf + 64), _MM_HINT_T1);
      load32_avx512<T>(wk, p.K - k, w0[i], w1[i]);
    }
    for (int r = 0; r < MT; ++r) {
      const float* xr = xs + r * p.kp + k;
      const __m512 x0 = _mm512_loadu_ps(xr), x1 = _mm512_loadu_ps(xr + 16);
      for (int i = 0; i < NR; ++i)
        acc[i][r] = _mm512_fmadd_ps(w1[i], x1, _mm512_fmadd_ps(w0[i], x0, acc[i][r]));
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MT; ++r) out[i * MT + r] = _mm512_reduce_add_ps(acc[i][r]);
}

// bf16 with AVX512_BF16, as block_avx512 with bf16 activation rows: vdpbf16ps adds the
// exact products of 32 bf16 pairs into 16 fp32 lanes.
template <int NR, int MT>
LLMCORE_AVX512BF16_TARGET void block_avx512_bf16dot(const GemvPlan& p, const uint16_t* xs,
                                                    const uint8_t* const* wr, int64_t pf,
                                                    float* out) {
  __m512 acc[NR][MT];
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MT; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < p.K; k += 32) {
    const int64_t left = p.K - k;
    __m512i w[NR];
    for (int i = 0; i < NR; ++i) {
      const auto* wk = reinterpret_cast<const uint16_t*>(wr[i]) + k;
      _mm_prefetch(reinterpret_cast<const char*>(wk) + pf, _MM_HINT_T1);
      w[i] = left >= 32 ? _mm512_loadu_si512(wk) : _mm512_maskz_loadu_epi16(mask32(left), wk);
    }
    for (int r = 0; r < MT; ++r) {
      const __m512i x = _mm512_loadu_si512(xs + r * p.kp + k);
      for (int i = 0; i < NR; ++i)
        acc[i][r] = _mm512_dpbf16_ps(acc[i][r], (__m512bh)w[i], (__m512bh)x);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MT; ++r) out[i * MT + r] = _mm512_reduce_add_ps(acc[i][r]);
}

template <DType T, bool kDot, int NR, int MT>
void block_call(const GemvPlan& p, const void* x, const uint8_t* const* wr, int64_t pf,
                float* out) {
  if constexpr (kDot) block_avx512_bf16dot<NR, MT>(p, static_cast<const uint16_t*>(x), wr, pf, out);
  else block_avx512<T, NR, MT>(p, static_cast<const float*>(x), wr, pf, out);
}

// MT <= 4 with NR = 4 weight rows, <= 8 with 1 or 2 (at most 16 accumulators).
template <DType T, bool kDot, int NR>
void block_rows(const GemvPlan& p, const void* x, int64_t mt, const uint8_t* const* wr,
                int64_t pf, float* out) {
  switch (mt) {
    case 1: block_call<T, kDot, NR, 1>(p, x, wr, pf, out); break;
    case 2: block_call<T, kDot, NR, 2>(p, x, wr, pf, out); break;
    case 3: block_call<T, kDot, NR, 3>(p, x, wr, pf, out); break;
    case 4: block_call<T, kDot, NR, 4>(p, x, wr, pf, out); break;
    default:
      if constexpr (NR <= 2) {
        switch (mt) {
          case 5: block_call<T, kDot, NR, 5>(p, x, wr, pf, out); break;
          case 6: block_call<T, kDot, NR, 6>(p, x, wr, pf, out); break;
          case 7: block_call<T, kDot, NR, 7>(p, x, wr, pf, out); break;
          default: block_call<T, kDot, NR, 8>(p, x, wr, pf, out);
        }
      }
  }
}

// Weight rows in blocks (four streams from memory, each activation load shared by the
// block; one by one at the end of the range): 4 rows for up to 4 activation rows, else 2
// rows and activation tiles of up to 8, as even as possible (for the next tile the block
// comes from L1 or L2). Each row's prefetch runs ahead to the same offset of the next
// block, into L2. (A fixed 4 KB ahead in the row, the rule for long rows before, lands
// inside the block being read whenever a row is at most 4 KB: 768 fp32 or 2048 bf16
// elements. One thread, cold weights, AMD EPYC VM: bf16 8192x2048 11-13 -> 15.5-16 GB/s,
// 2048x8192 13-15 -> 16-19; fp32 3072x768 9-13 -> 16, 8192x2048 15-16 -> 16-17.)
template <DType T, bool kDot>
void gemv_avx512(const GemvPlan& p, const void* xs, const uint8_t* w, int64_t ldw_bytes,
                 const void* bias, void* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  const int kNR = p.M <= 4 ? 4 : 2;
  const int64_t max_mt = p.M <= 4 ? 4 : 8;
  const int64_t tiles = (p.M + max_mt - 1) / max_mt;
  const int64_t x_el = kDot ? 2 : 4;
  const int64_t pf = kNR * ldw_bytes;  // the next block's same offset
  float out[16];
  const uint8_t* wr[4];
  for (int64_t n = n_begin; n < n_end;) {
    const int nr = n_end - n >= kNR ? kNR : 1;
    for (int i = 0; i < nr; ++i) wr[i] = w + (n + i) * ldw_bytes;
    for (int64_t t = 0, m = 0; t < tiles; ++t) {
      const int64_t mt = (p.M - m) / (tiles - t);
      const void* x = static_cast<const uint8_t*>(xs) + m * p.kp * x_el;
      if (nr == 4) block_rows<T, kDot, 4>(p, x, mt, wr, pf, out);
      else if (nr == 2) block_rows<T, kDot, 2>(p, x, mt, wr, pf, out);
      else block_rows<T, kDot, 1>(p, x, mt, wr, pf, out);
      for (int i = 0; i < nr; ++i) {
        const float b = bias ? load_float(bias, T, n + i) : 0.0f;
        for (int64_t r = 0; r < mt; ++r)
          store_float(y, T, (m + r) * ldy + n + i, out[i * mt + r] + b);
      }
      m += mt;
    }
    n += nr;
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
      const uint16_t* xr = static_cast<const uint16_t*>(x) + m * ldx;
      memcpy(xs + m * p.kp, xr, static_cast<size_t>(p.K * 2));
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
