// Shared pieces of the CPU attention kernels (not part of the API in attention_cpu.h): the
// per-ISA tile primitives that attention_cpu.cpp builds the algorithm from, and row stores
// by DType. Element conversions (IEEE round to nearest even, as torch): common/half_convert.h.
#pragma once

#include "attention/attention_cpu.h"
#include "common/half_convert.h"

namespace llmcore {
namespace attention {
namespace cpu {

// The tile primitives. Score tiles are kBlockK or kBlockQ floats wide; "n" of axpy_tile and
// every padded head_dim are multiples of 16.
struct Kernels {
  // c[i*ldc + j] = sum_{d < kdim} a[i*lda + d] * bt[d*ldb + j],  i < m, j < n;
  // n a multiple of 64, bt 64-byte aligned, ldb a multiple of 16.
  void (*dot_tile)(const float* a, int64_t lda, int64_t m, int64_t kdim, const float* bt,
                   int64_t ldb, int64_t n, float* c, int64_t ldc);
  // c[i*ldc + x] += sum_{j < k} a[i*a_rs + j*a_cs] * b[j*ldb + x],  i < m, x < n.
  // skip_zeros: a term whose a is exactly 0 is left out, so a masked probability (0) never
  // multiplies a masked value (0 * NaN is NaN); callers set it for tiles with masked entries.
  void (*axpy_tile)(const float* a, int64_t a_rs, int64_t a_cs, int64_t m, int64_t k,
                    const float* b, int64_t ldb, int64_t n, float* c, int64_t ldc,
                    bool skip_zeros);
  // sum_{d < n} a(d) * b(d) in order, rounded as dot_tile rounds (so that a row that sees
  // one key gets dP - delta = 0 exactly); a, b of type t.
  float (*dot_row)(const void* a, const void* b, DType t, int64_t n);
  // p[j] = exp(s[j] - sub) for j < n (NaN stays NaN); returns their sum.
  float (*exp_row)(const float* s, int64_t n, float sub, float* p);
  // Online softmax step on a transposed score tile st[j*ld + i] (key j < nk, query i < nq):
  // key j is hidden from queries i < cut + j. Per query: m_new = max(m, visible scores),
  // alpha = exp(m - m_new) (1 while nothing is visible), l = l * alpha + sum p; st becomes
  // p = exp(s - m_new) (0 where hidden). A NaN among the visible scores (or in m) makes
  // m_new NaN, so the row's p, l and output are NaN; hidden scores are never read.
  // m, l, alpha: [nq].
  void (*softmax_t)(float* st, int64_t ld, int64_t nk, int64_t nq, int64_t cut, float* m,
                    float* l, float* alpha);
  // dst[r*ldd + d] = scale * src(r, d) for d < dim, 0 for dim <= d < ldd; src(r, d) at
  // src + r * row_stride + d of type t.
  void (*load_rows)(const void* src, DType t, int64_t row_stride, int64_t rows,
                    int64_t dim, float scale, float* dst, int64_t ldd);
  // Transposed: dst[d*ldt + r] = scale * src(r, d) for r < rows, 0 for rows <= r < ldt
  // (ldt a multiple of 16, rows <= ldt).
  void (*load_rows_t)(const void* src, DType t, int64_t row_stride, int64_t rows,
                      int64_t dim, float scale, float* dst, int64_t ldt);
};

namespace scalar { extern const Kernels kKernels; }
namespace avx512 { extern const Kernels kKernels; }

// dst[0:n] (type t) = src[0:n] * mul.
inline void store_row(const float* src, int64_t n, float mul, void* dst, DType t) {
  switch (t) {
    case DType::kBFloat16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i] * mul);
      break;
    }
    case DType::kFloat16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i] * mul);
      break;
    }
    default: {
      auto* d = static_cast<float*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = src[i] * mul;
    }
  }
}

}  // namespace cpu
}  // namespace attention
}  // namespace llmcore
