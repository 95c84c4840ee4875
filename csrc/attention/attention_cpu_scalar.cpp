// Portable tile primitives of the CPU attention kernels (plain C++, left to the compiler's
// auto-vectoriser; std::exp). The reference for the AVX-512 path and the path on any CPU
// without AVX-512 or under LLMCORE_CPU_ISA=scalar.
#include <math.h>

#include "attention/attention_cpu_internal.h"

namespace llmcore {
namespace attention {
namespace cpu {
namespace scalar {
namespace {

void dot_tile(const float* a, int64_t lda, int64_t m, int64_t kdim, const float* bt, float* c) {
  for (int64_t i = 0; i < m; ++i) {
    float acc[kBlockK] = {};
    const float* ar = a + i * lda;
    for (int64_t d = 0; d < kdim; ++d) {
      const float x = ar[d];
      const float* br = bt + d * kBlockK;
      for (int64_t j = 0; j < kBlockK; ++j) acc[j] += x * br[j];
    }
    for (int64_t j = 0; j < kBlockK; ++j) c[i * kBlockK + j] = acc[j];
  }
}

void axpy_tile(const float* a, int64_t a_rs, int64_t a_cs, int64_t m, int64_t k, const float* b,
               int64_t ldb, int64_t n, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    float* cr = c + i * ldc;
    for (int64_t j = 0; j < k; ++j) {
      const float x = a[i * a_rs + j * a_cs];
      if (x == 0.0f) continue;  // masked probabilities: common on the causal diagonal
      const float* br = b + j * ldb;
      for (int64_t t = 0; t < n; ++t) cr[t] += x * br[t];
    }
  }
}

float row_max(const float* s, int64_t n) {
  float m = s[0];
  for (int64_t j = 1; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

float exp_row(const float* s, int64_t n, float sub, float* p) {
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    p[j] = expf(s[j] - sub);
    sum += p[j];
  }
  return sum;
}

void load_rows(const void* src, FloatType t, int64_t row_stride, int64_t rows, int64_t dim,
               float scale, float* dst, int64_t ldd) {
  const size_t es = elem_size(t);
  for (int64_t r = 0; r < rows; ++r) {
    const void* sr = static_cast<const char*>(src) + r * row_stride * static_cast<int64_t>(es);
    float* dr = dst + r * ldd;
    for (int64_t d = 0; d < dim; ++d) dr[d] = scale * load_float(sr, t, d);
    for (int64_t d = dim; d < ldd; ++d) dr[d] = 0.0f;
  }
}

void load_rows_t(const void* src, FloatType t, int64_t row_stride, int64_t rows, int64_t dim,
                 float* dst) {
  const size_t es = elem_size(t);
  for (int64_t r = 0; r < rows; ++r) {
    const void* sr = static_cast<const char*>(src) + r * row_stride * static_cast<int64_t>(es);
    for (int64_t d = 0; d < dim; ++d) dst[d * kBlockK + r] = load_float(sr, t, d);
  }
  for (int64_t d = 0; d < dim; ++d)
    for (int64_t r = rows; r < kBlockK; ++r) dst[d * kBlockK + r] = 0.0f;
}

}  // namespace

extern const Kernels kKernels = {dot_tile, axpy_tile, row_max, exp_row, load_rows, load_rows_t};

}  // namespace scalar
}  // namespace cpu
}  // namespace attention
}  // namespace llmcore
