// AVX-512F tile primitives of the CPU attention kernels: 16 fp32 lanes per vector. Compiled
// with a target pragma, not -march, so the library still loads on any x86-64;
// attention_cpu.cpp only calls in here after __builtin_cpu_supports said yes.
//
// dot_tile   S = A Bt, 6 rows x 64 columns per block: per d, 4 loads of the transposed K
//            (or V) tile, one broadcast per row, 24 FMAs into 24 accumulators.
// axpy_tile  C += A B, 6 rows x 64 columns of C per block held in registers while the
//            k products stream (a broadcast of A, 4 loads of B, 24 FMAs per k).
// exp        Cephes-style expf (common/exp_avx512.h, its kNormal variant): n = round(x log2 e),
//            r = x - n ln2 (two-part ln2), a degree-6 polynomial, times 2^n built in the
//            exponent field; within 2 ulp.
#include "attention/attention_cpu_internal.h"

#if defined(__x86_64__)

#include <immintrin.h>
#include <math.h>

#include <algorithm>

#include "common/exp_avx512.h"

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
// GCC 12's intrinsic headers fill don't-care lanes from _mm512_undefined_*(), a
// self-initialised variable that -Wuninitialized reports at every use; not our code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace llmcore {
namespace attention {
namespace cpu {
namespace avx512 {
namespace {

static_assert(kBlockK == 64, "the microkernels hold a 64-wide score row in 4 vectors");
constexpr int kRows = 6;  // rows per register block

inline __mmask16 tail_mask(int64_t n) {
  if (n <= 0) return 0;
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

template <int R>
void dot_block(const float* a, int64_t lda, int64_t kdim, const float* bt, int64_t ldb, float* c,
               int64_t ldc) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < kdim; ++d) {
    const float* br = bt + d * ldb;
    const __m512 b0 = _mm512_load_ps(br), b1 = _mm512_load_ps(br + 16);
    const __m512 b2 = _mm512_load_ps(br + 32), b3 = _mm512_load_ps(br + 48);
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * lda + d]);
      acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(x, b2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(x, b3, acc[r][3]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

void dot_tile(const float* a, int64_t lda, int64_t m, int64_t kdim, const float* bt, int64_t ldb,
              int64_t n, float* c, int64_t ldc) {
  for (int64_t x = 0; x < n; x += 64) {
    int64_t i = 0;
    for (; i + kRows <= m; i += kRows)
      dot_block<kRows>(a + i * lda, lda, kdim, bt + x, ldb, c + i * ldc + x, ldc);
    const float* ai = a + i * lda;
    float* ci = c + i * ldc + x;
    switch (m - i) {
      case 5: dot_block<5>(ai, lda, kdim, bt + x, ldb, ci, ldc); break;
      case 4: dot_block<4>(ai, lda, kdim, bt + x, ldb, ci, ldc); break;
      case 3: dot_block<3>(ai, lda, kdim, bt + x, ldb, ci, ldc); break;
      case 2: dot_block<2>(ai, lda, kdim, bt + x, ldb, ci, ldc); break;
      case 1: dot_block<1>(ai, lda, kdim, bt + x, ldb, ci, ldc); break;
      default: break;
    }
  }
}

// Skip: a term whose a is exactly 0 leaves C as it was (a masked-out probability never
// multiplies a masked-out value: 0 * NaN is NaN). One compare per broadcast, so only the
// tiles with masked entries pay it.
template <int R, int NV, bool Skip>
void axpy_block(const float* a, int64_t a_rs, int64_t a_cs, int64_t k, const float* b,
                int64_t ldb, float* c, int64_t ldc) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_loadu_ps(c + r * ldc + 16 * v);
  for (int64_t j = 0; j < k; ++j) {
    __m512 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + j * ldb + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * a_rs + j * a_cs]);
      if constexpr (Skip) {
        const __mmask16 nz = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NEQ_UQ);
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_mask3_fmadd_ps(x, bv[v], acc[r][v], nz);
      } else {
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(x, bv[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

using AxpyFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, int64_t, float*,
                        int64_t);
template <int R, bool Skip>
constexpr AxpyFn axpy_fn(int nv) {
  return nv == 1 ? axpy_block<R, 1, Skip> : nv == 2 ? axpy_block<R, 2, Skip>
                                          : nv == 3 ? axpy_block<R, 3, Skip>
                                                    : axpy_block<R, 4, Skip>;
}
template <bool Skip>
AxpyFn axpy_block_fn(int64_t rows, int nv) {
  switch (rows) {
    case 1: return axpy_fn<1, Skip>(nv);
    case 2: return axpy_fn<2, Skip>(nv);
    case 3: return axpy_fn<3, Skip>(nv);
    case 4: return axpy_fn<4, Skip>(nv);
    case 5: return axpy_fn<5, Skip>(nv);
    default: return axpy_fn<6, Skip>(nv);
  }
}

void axpy_tile(const float* a, int64_t a_rs, int64_t a_cs, int64_t m, int64_t k, const float* b,
               int64_t ldb, int64_t n, float* c, int64_t ldc, bool skip_zeros) {
  for (int64_t x = 0; x < n; x += 64) {
    const int nv = static_cast<int>(std::min<int64_t>(4, (n - x) / 16));
    for (int64_t i = 0; i < m; i += kRows) {
      const int64_t rows = std::min<int64_t>(kRows, m - i);
      const AxpyFn fn = skip_zeros ? axpy_block_fn<true>(rows, nv) : axpy_block_fn<false>(rows, nv);
      fn(a + i * a_rs, a_rs, a_cs, k, b + x, ldb, c + i * ldc + x, ldc);
    }
  }
}

inline __m512 exp512(__m512 x) { return exp_avx512<true>(x); }  // common/exp_avx512.h

float dot_row(const void* a, const void* b, DType t, int64_t n) {
  float acc = 0.0f;
  for (int64_t d = 0; d < n; ++d) acc = __builtin_fmaf(load_float(a, t, d), load_float(b, t, d), acc);
  return acc;
}

float exp_row(const float* s, int64_t n, float sub, float* p) {
  const __m512 vs = _mm512_set1_ps(sub);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vs));
    _mm512_mask_storeu_ps(p + j, m, e);
    sum = _mm512_mask_add_ps(sum, m, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

void softmax_t(float* st, int64_t ld, int64_t nk, int64_t nq, int64_t cut, float* m, float* l,
               float* alpha) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t c = 0; c < nq; c += 16) {
    const __mmask16 live = tail_mask(nq - c);
    // Key j is visible to query c + lane when lane >= cut + j - c.
    auto visible = [&](int64_t j) {
      const int64_t first = cut + j - c;
      if (first <= 0) return live;
      if (first >= 16) return static_cast<__mmask16>(0);
      return static_cast<__mmask16>(live & _mm512_cmpge_epi32_mask(lane, _mm512_set1_epi32(static_cast<int>(first))));
    };
    const __m512 mold = _mm512_maskz_loadu_ps(live, m + c);
    __m512 mx = mold;
    // vmaxps drops a NaN in its first operand: track the lanes that saw one (or had m NaN).
    __mmask16 nan = _mm512_cmp_ps_mask(mold, mold, _CMP_UNORD_Q);
    for (int64_t j = 0; j < nk; ++j) {
      const __mmask16 vis = visible(j);
      const __m512 s = _mm512_loadu_ps(st + j * ld + c);
      nan |= _mm512_mask_cmp_ps_mask(vis, s, s, _CMP_UNORD_Q);
      mx = _mm512_mask_max_ps(mx, vis, mx, s);
    }
    mx = _mm512_mask_mov_ps(mx, nan, _mm512_set1_ps(NAN));
    // Lanes that see nothing yet keep m = -inf, alpha = 1 and get p = 0; NaN lanes go on
    // with NaN.
    const __mmask16 any = _mm512_cmp_ps_mask(mx, ninf, _CMP_NEQ_UQ);
    const __m512 msafe = _mm512_mask_mov_ps(_mm512_setzero_ps(), any, mx);
    const __m512 a = _mm512_mask_mov_ps(_mm512_set1_ps(1.0f), any, exp512(_mm512_sub_ps(mold, msafe)));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < nk; ++j) {
      float* row = st + j * ld + c;
      const __mmask16 vis = visible(j) & any;
      const __m512 p = _mm512_maskz_mov_ps(vis, exp512(_mm512_sub_ps(_mm512_loadu_ps(row), msafe)));
      _mm512_storeu_ps(row, p);
      sum = _mm512_add_ps(sum, p);
    }
    const __m512 lnew = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, l + c), a, sum);
    _mm512_mask_storeu_ps(l + c, live, lnew);
    _mm512_mask_storeu_ps(m + c, live, mx);
    _mm512_mask_storeu_ps(alpha + c, live, a);
  }
}

template <DType T>
inline __m512 load16_any(const void* p, int64_t i, int64_t n) {
  const __mmask16 m = tail_mask(n);
  if (T == DType::kFloat32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
  // 16-bit elements: copy the valid ones into a zeroed buffer (AVX-512F has no 16-bit
  // masked load), widen to 32 bits.
  alignas(32) uint16_t tmp[16];
  const uint16_t* src = static_cast<const uint16_t*>(p) + i;
  __m256i h;
  if (n >= 16) {
    h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  } else {
    for (int x = 0; x < 16; ++x) tmp[x] = x < n ? src[x] : 0;
    h = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
  }
  if (T == DType::kFloat16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <DType T>
void load_rows_t_(const void* src, int64_t row_stride, int64_t rows, int64_t dim, float scale,
                  float* dst, int64_t ldd) {
  const __m512 vs = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < rows; ++r) {
    const char* sr = static_cast<const char*>(src) + r * row_stride * static_cast<int64_t>(dtype_size(T));
    float* dr = dst + r * ldd;
    for (int64_t d = 0; d < ldd; d += 16) {
      const __m512 v = _mm512_mul_ps(load16_any<T>(sr, d, dim - d), vs);
      _mm512_mask_storeu_ps(dr + d, tail_mask(ldd - d), v);
    }
  }
}

void load_rows(const void* src, DType t, int64_t row_stride, int64_t rows, int64_t dim,
               float scale, float* dst, int64_t ldd) {
  switch (t) {
    case DType::kBFloat16: load_rows_t_<DType::kBFloat16>(src, row_stride, rows, dim, scale, dst, ldd); break;
    case DType::kFloat16: load_rows_t_<DType::kFloat16>(src, row_stride, rows, dim, scale, dst, ldd); break;
    default: load_rows_t_<DType::kFloat32>(src, row_stride, rows, dim, scale, dst, ldd);
  }
}

// Transposed load: convert 16 rows at a time into a 16x16 buffer, then write its columns
// with gathers (the tile is reused by a whole block of rows, so this is off the hot path).
void load_rows_t(const void* src, DType t, int64_t row_stride, int64_t rows, int64_t dim,
                 float scale, float* dst, int64_t ldt) {
  alignas(64) float buf[16 * 16];
  const size_t es = dtype_size(t);
  const __m512i idx = _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64,
                                       48, 32, 16, 0);
  for (int64_t r0 = 0; r0 < ldt; r0 += 16) {
    const int64_t nr = std::max<int64_t>(0, std::min<int64_t>(16, rows - r0));
    for (int64_t d0 = 0; d0 < dim; d0 += 16) {
      const int64_t nd = std::min<int64_t>(16, dim - d0);
      if (nr > 0) {
        const char* sr = static_cast<const char*>(src) +
                         (r0 * row_stride + d0) * static_cast<int64_t>(es);
        load_rows(sr, t, row_stride, nr, nd, scale, buf, 16);
      }
      for (int64_t r = nr; r < 16; ++r) _mm512_store_ps(buf + r * 16, _mm512_setzero_ps());
      for (int64_t d = 0; d < nd; ++d)
        _mm512_storeu_ps(dst + (d0 + d) * ldt + r0,
                         _mm512_i32gather_ps(_mm512_add_epi32(idx, _mm512_set1_epi32(static_cast<int>(d))), buf, 4));
    }
  }
}

}  // namespace

extern const Kernels kKernels = {dot_tile, axpy_tile, dot_row, exp_row, softmax_t, load_rows, load_rows_t};

}  // namespace avx512
}  // namespace cpu
}  // namespace attention
}  // namespace llmcore

#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif  // __x86_64__
