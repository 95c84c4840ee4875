// Portable tile primitives of the CPU attention kernels (plain C++, left to the compiler's
// auto-vectoriser; std::exp). The reference for the AVX-512 path and the path on any CPU
// without AVX-512 or under LLMCORE_CPU_ISA=scalar.
#include <math.h>

#include <algorithm>

#include "attention/attention_cpu_internal.h"

namespace llmcore {
namespace attention {
namespace cpu {
namespace scalar {
namespace {

void dot_tile(const float* a, int64_t lda, int64_t m, int64_t kdim, const float* bt, int64_t ldb,
              int64_t n, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    float* cr = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) cr[j] = 0.0f;
    const float* ar = a + i * lda;
    for (int64_t d = 0; d < kdim; ++d) {
      const float x = ar[d];
      const float* br = bt + d * ldb;
      for (int64_t j = 0; j < n; ++j) cr[j] += x * br[j];
    }
  }
}

void axpy_tile(const float* a, int64_t a_rs, int64_t a_cs, int64_t m, int64_t k, const float* b,
               int64_t ldb, int64_t n, float* c, int64_t ldc, bool skip_zeros) {
  for (int64_t i = 0; i < m; ++i) {
    float* cr = c + i * ldc;
    for (int64_t j = 0; j < k; ++j) {
      const float x = a[i * a_rs + j * a_cs];
      if (skip_zeros && x == 0.0f) continue;  // masked: never 0 * (a masked NaN)
      const float* br = b + j * ldb;
      for (int64_t t = 0; t < n; ++t) cr[t] += x * br[t];
    }
  }
}

float dot_row(const void* a, const void* b, DType t, int64_t n) {
  float acc = 0.0f;
  for (int64_t d = 0; d < n; ++d) acc += load_float(a, t, d) * load_float(b, t, d);
  return acc;
}

float exp_row(const float* s, int64_t n, float sub, float* p) {
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    p[j] = expf(s[j] - sub);
    sum += p[j];
  }
  return sum;
}

void softmax_t(float* st, int64_t ld, int64_t nk, int64_t nq, int64_t cut, float* m, float* l,
               float* alpha) {
  for (int64_t i = 0; i < nq; ++i) {
    // Key j is visible to query i when j <= i - cut.
    const int64_t vis = std::min<int64_t>(nk, std::max<int64_t>(0, i - cut + 1));
    float mx = m[i];
    for (int64_t j = 0; j < vis; ++j) {
      const float s = st[j * ld + i];
      mx = (s != s || mx != mx) ? NAN : std::max(mx, s);  // a visible NaN propagates
    }
    if (mx == -INFINITY) {  // nothing visible yet
      alpha[i] = 1.0f;
      for (int64_t j = 0; j < nk; ++j) st[j * ld + i] = 0.0f;
      continue;
    }
    alpha[i] = expf(m[i] - mx);
    float sum = 0.0f;
    for (int64_t j = 0; j < vis; ++j) {
      const float p = expf(st[j * ld + i] - mx);
      st[j * ld + i] = p;
      sum += p;
    }
    for (int64_t j = vis; j < nk; ++j) st[j * ld + i] = 0.0f;
    l[i] = l[i] * alpha[i] + sum;
    m[i] = mx;
  }
}

void load_rows(const void* src, DType t, int64_t row_stride, int64_t rows, int64_t dim,
               float scale, float* dst, int64_t ldd) {
  const size_t es = dtype_size(t);
  for (int64_t r = 0; r < rows; ++r) {
    const void* sr = static_cast<const char*>(src) + r * row_stride * static_cast<int64_t>(es);
    float* dr = dst + r * ldd;
    for (int64_t d = 0; d < dim; ++d) dr[d] = scale * load_float(sr, t, d);
    for (int64_t d = dim; d < ldd; ++d) dr[d] = 0.0f;
  }
}

void load_rows_t(const void* src, DType t, int64_t row_stride, int64_t rows, int64_t dim,
                 float scale, float* dst, int64_t ldt) {
  const size_t es = dtype_size(t);
  for (int64_t r = 0; r < rows; ++r) {
    const void* sr = static_cast<const char*>(src) + r * row_stride * static_cast<int64_t>(es);
    for (int64_t d = 0; d < dim; ++d) dst[d * ldt + r] = scale * load_float(sr, t, d);
  }
  for (int64_t d = 0; d < dim; ++d)
    for (int64_t r = rows; r < ldt; ++r) dst[d * ldt + r] = 0.0f;
}

}  // namespace

extern const Kernels kKernels = {dot_tile, axpy_tile, dot_row, exp_row, softmax_t, load_rows, load_rows_t};

}  // namespace scalar
}  // namespace cpu
}  // namespace attention
}  // namespace llmcore
