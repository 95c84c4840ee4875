// Run-time ISA choice for the CPU BFP kernels, and the GEMM operand packing (shared by
// every ISA: it is O((M + N) K), the product is O(M N K)).
#include "bfp/bfp_cpu_internal.h"

#include <string.h>

#include <vector>

namespace llmcore {
namespace bfp {
namespace cpu {
namespace {

Isa best_isa() {
  const CpuFeatures& f = cpu_features();
  if (f.avx512f && f.avx512bw && f.avx512vl && f.avx512vnni) return Isa::kAvx512;
  if (f.avx2 && f.fma && f.f16c) return Isa::kAvx2;
  return Isa::kScalar;
}

const Kernels* kernels_for(Isa isa) {
#if defined(__x86_64__)
  if (isa == Isa::kAvx512) return &avx512::kKernels;
  if (isa == Isa::kAvx2) return &avx2::kKernels;
#endif
  (void)isa;
  return &scalar::kKernels;
}

// Entry `field` of the active ISA, or of the next lower ISA that has one.
template <typename F>
F pick(F Kernels::*field) {
  for (int i = static_cast<int>(active_isa()); i > 0; --i) {
    F f = kernels_for(static_cast<Isa>(i))->*field;
    if (f) return f;
  }
  return scalar::kKernels.*field;
}

}  // namespace

Isa active_isa() {
  static const Isa best = best_isa();
  return choose_isa(best, /*has_avx2=*/true);
}

void quantize_rows(const void* x, DType xt, int64_t x_row_stride, int64_t k, int bits,
                   int block, bool round_even, uint8_t* mant, int64_t mant_row_stride,
                   uint8_t* exp, int64_t exp_row_stride, int64_t row_begin, int64_t row_end) {
  pick(&Kernels::quantize)(x, xt, x_row_stride, k, bits, block, round_even, mant,
                           mant_row_stride, exp, exp_row_stride, row_begin, row_end);
}

void dequantize_rows(const uint8_t* mant, int64_t mant_row_stride, const uint8_t* exp,
                     int64_t exp_row_stride, int64_t k, int bits, int block, void* out,
                     DType ot, int64_t out_row_stride, int64_t row_begin, int64_t row_end) {
  pick(&Kernels::dequantize)(mant, mant_row_stride, exp, exp_row_stride, k, bits, block, out, ot,
                             out_row_stride, row_begin, row_end);
}

void linear_rows(const float* x, int64_t M, int64_t ldx, int64_t K, const uint8_t* w_mant,
                 int64_t w_row_stride, const uint8_t* w_exp, int64_t exp_row_stride, int bits,
                 int block, const float* bias, float* y, int64_t ldy, int64_t n_begin,
                 int64_t n_end) {
  pick(&Kernels::linear)(x, M, ldx, K, w_mant, w_row_stride, w_exp, exp_row_stride, bits, block,
                         bias, y, ldy, n_begin, n_end);
}

void linear_rows_typed(const void* x, DType xt, int64_t M, int64_t ldx, int64_t K,
                       const uint8_t* w_mant, int64_t w_row_stride, const uint8_t* w_exp,
                       int64_t exp_row_stride, int bits, int block, const float* bias, float* y,
                       int64_t ldy, int64_t n_begin, int64_t n_end) {
#if defined(__x86_64__)
  if (active_isa() == Isa::kAvx512) {
    avx512::linear_typed(x, xt, M, ldx, K, w_mant, w_row_stride, w_exp, exp_row_stride, bits,
                         block, bias, y, ldy, n_begin, n_end);
    return;
  }
#endif
  if (xt == DType::kFloat32) {
    linear_rows(static_cast<const float*>(x), M, ldx, K, w_mant, w_row_stride, w_exp,
                exp_row_stride, bits, block, bias, y, ldy, n_begin, n_end);
    return;
  }
  std::vector<float> xf(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < K; ++i) xf[m * K + i] = load_float(x, xt, m * ldx + i);
  linear_rows(xf.data(), M, K, K, w_mant, w_row_stride, w_exp, exp_row_stride, bits, block, bias,
              y, ldy, n_begin, n_end);
}

void gemm_compute(const GemmPlan& p, const uint8_t* a_pack, const float* a_scale,
                  const int8_t* b_pack, const float* b_scale, const int32_t* b_corr,
                  const float* bias, float* c, int64_t ldc, int64_t m_begin, int64_t m_end,
                  int64_t p_begin, int64_t p_end) {
  pick(&Kernels::gemm)(p, a_pack, a_scale, b_pack, b_scale, b_corr, bias, c, ldc, m_begin, m_end,
                       p_begin, p_end);
}

// ---- GEMM packing ---------------------------------------------------------------------
GemmPlan gemm_plan(int64_t M, int64_t N, int64_t K, int a_bits, int b_bits, int block) {
  GemmPlan p;
  p.M = M;
  p.N = N;
  p.K = K;
  p.a_bits = a_bits;
  p.b_bits = b_bits;
  p.block = block;
  p.nb = exponent_cols(K, block);
  p.bpad = (block + 3) / 4 * 4;
  p.kp = p.nb * p.bpad;
  p.n_pad = (N + 15) / 16 * 16;
  return p;
}

size_t gemm_a_bytes(const GemmPlan& p) { return static_cast<size_t>(p.M * p.kp); }
size_t gemm_a_scale_bytes(const GemmPlan& p) { return static_cast<size_t>(p.M * p.nb) * 4; }
size_t gemm_b_bytes(const GemmPlan& p) { return static_cast<size_t>(p.n_pad * p.kp); }
size_t gemm_b_aux_bytes(const GemmPlan& p) { return static_cast<size_t>(p.n_pad * p.nb) * 4; }

void gemm_pack_a(const GemmPlan& p, const uint8_t* a_mant, int64_t a_row_stride,
                 const uint8_t* a_exp, int64_t a_exp_stride, uint8_t* a_pack, float* a_scale,
                 int64_t m_begin, int64_t m_end) {
  for (int64_t m = m_begin; m < m_end; ++m) {
    const uint8_t* src = a_mant + m * a_row_stride;
    uint8_t* dst = a_pack + m * p.kp;
    // u8 = s8 ^ 0x80 (= s8 + 128), so zero padding is 0x80.
    memset(dst, 0x80, static_cast<size_t>(p.kp));
    for (int64_t b = 0; b < p.nb; ++b) {
      const int64_t i0 = b * p.block;
      const int64_t i1 = i0 + p.block < p.K ? i0 + p.block : p.K;
      uint8_t* d = dst + b * p.bpad;
      if (!is_packed(p.a_bits)) {
        for (int64_t i = i0; i < i1; ++i) d[i - i0] = src[i] ^ 0x80u;
      } else {
        for (int64_t i = i0; i < i1; ++i)
          d[i - i0] = static_cast<uint8_t>(load_mantissa(src, p.a_bits, i) + 128);
      }
      a_scale[m * p.nb + b] = block_scale(a_exp[m * a_exp_stride + b], p.a_bits);
    }
  }
}

void gemm_pack_b(const GemmPlan& p, const uint8_t* b_mant, int64_t b_row_stride,
                 const uint8_t* b_exp, int64_t b_exp_stride, int8_t* b_pack, float* b_scale,
                 int32_t* b_corr, int64_t p_begin, int64_t p_end) {
  pick(&Kernels::pack_b)(p, b_mant, b_row_stride, b_exp, b_exp_stride, b_pack, b_scale, b_corr,
                         p_begin, p_end);
}

void gemm_pack_b_portable(const GemmPlan& p, const uint8_t* b_mant, int64_t b_row_stride,
                          const uint8_t* b_exp, int64_t b_exp_stride, int8_t* b_pack,
                          float* b_scale, int32_t* b_corr, int64_t p_begin, int64_t p_end) {
  const int64_t k4 = p.kp / 4;
  for (int64_t pn = p_begin; pn < p_end; ++pn) {
    int8_t* panel = b_pack + pn * k4 * 64;
    memset(panel, 0, static_cast<size_t>(k4 * 64));
    for (int j = 0; j < 16; ++j) {
      const int64_t n = pn * 16 + j;
      for (int64_t b = 0; b < p.nb; ++b) {
        const int64_t aux = (pn * p.nb + b) * 16 + j;
        if (n >= p.N) {  // padding column: never stored, keep it finite
          b_scale[aux] = 0.0f;
          b_corr[aux] = 0;
          continue;
        }
        const uint8_t* src = b_mant + n * b_row_stride;
        const int64_t i0 = b * p.block;
        const int64_t i1 = i0 + p.block < p.K ? i0 + p.block : p.K;
        int32_t sum = 0;
        for (int64_t i = i0; i < i1; ++i) {
          const int v = load_mantissa(src, p.b_bits, i);
          const int64_t kk = b * p.bpad + (i - i0);
          panel[(kk >> 2) * 64 + j * 4 + (kk & 3)] = static_cast<int8_t>(v);
          sum += v;
        }
        b_scale[aux] = block_scale(b_exp[n * b_exp_stride + b], p.b_bits);
        b_corr[aux] = -128 * sum;
      }
    }
  }
}

}  // namespace cpu
}  // namespace bfp
}  // namespace llmcore
