// Portable scalar BFP kernels: the definition every vector path must reproduce
// (bit-exactly for quantise/dequantise), and the path on non-x86 machines.
#include "bfp/bfp_cpu_internal.h"

#include <string.h>

namespace llmcore {
namespace bfp {
namespace cpu {
namespace scalar {
namespace {

void quantize(const void* x, DType xt, int64_t x_row_stride, int64_t k, int bits, int block,
              bool round_even, uint8_t* mant, int64_t mant_row_stride, uint8_t* exp,
              int64_t exp_row_stride, int64_t row_begin, int64_t row_end) {
  const int64_t nb = exponent_cols(k, block);
  const size_t esize = xt == DType::kFloat32 ? 4 : 2;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const void* xr = static_cast<const char*>(x) + r * x_row_stride * static_cast<int64_t>(esize);
    uint8_t* mr = mant + r * mant_row_stride;
    uint8_t* er = exp + r * exp_row_stride;
    if (is_packed(bits)) memset(mr, 0, static_cast<size_t>(mantissa_cols(k, bits)));
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t i0 = b * block;
      const int64_t i1 = i0 + block < k ? i0 + block : k;
      float amax = 0.0f;
      bool finite = true;
      for (int64_t i = i0; i < i1; ++i) {
        const float a = __builtin_fabsf(load_float(xr, xt, i));
        if (!(a <= 3.4028234663852886e38f)) finite = false;  // Inf or NaN
        else if (a > amax) amax = a;
      }
      const int e = block_exponent(amax);
      er[b] = finite ? static_cast<uint8_t>(e + kExpBias) : kNaNExponent;
      for (int64_t i = i0; i < i1; ++i) {
        const int q = finite ? quantize_element(load_float(xr, xt, i), e, bits, round_even) : 0;
        if (is_packed(bits)) {
          mr[i >> 1] |= static_cast<uint8_t>((q & 0xf) << ((i & 1) * 4));
        } else {
          mr[i] = static_cast<uint8_t>(static_cast<int8_t>(q));
        }
      }
    }
  }
}

void dequantize(const uint8_t* mant, int64_t mant_row_stride, const uint8_t* exp,
                int64_t exp_row_stride, int64_t k, int bits, int block, void* out, DType ot,
                int64_t out_row_stride, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* mr = mant + r * mant_row_stride;
    const uint8_t* er = exp + r * exp_row_stride;
    for (int64_t i = 0; i < k; ++i) {
      const float s = block_scale(er[i / block], bits);
      store_float(out, ot, r * out_row_stride + i, static_cast<float>(load_mantissa(mr, bits, i)) * s);
    }
  }
}

void linear(const float* x, int64_t M, int64_t ldx, int64_t K, const uint8_t* w_mant,
            int64_t w_row_stride, const uint8_t* w_exp, int64_t exp_row_stride, int bits,
            int block, const float* bias, float* y, int64_t ldy, int64_t n_begin,
            int64_t n_end) {
  const int64_t nb = exponent_cols(K, block);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* wr = w_mant + n * w_row_stride;
    const uint8_t* er = w_exp + n * exp_row_stride;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * ldx;
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t i1 = (b + 1) * block < K ? (b + 1) * block : K;
        float part = 0.0f;
        for (int64_t i = b * block; i < i1; ++i) part += static_cast<float>(load_mantissa(wr, bits, i)) * xr[i];
        acc += part * block_scale(er[b], bits);
      }
      y[m * ldy + n] = bias ? acc + bias[n] : acc;
    }
  }
}

void gemm(const GemmPlan& p, const uint8_t* a_pack, const float* a_scale, const int8_t* b_pack,
          const float* b_scale, const int32_t* b_corr, const float* bias, float* c, int64_t ldc,
          int64_t m_begin, int64_t m_end, int64_t p_begin, int64_t p_end) {
  const int64_t k4 = p.kp / 4, per_block = p.bpad / 4;
  for (int64_t m = m_begin; m < m_end; ++m) {
    const uint8_t* ar = a_pack + m * p.kp;
    for (int64_t pn = p_begin; pn < p_end; ++pn) {
      const int8_t* bp = b_pack + pn * k4 * 64;
      for (int j = 0; j < 16; ++j) {
        const int64_t n = pn * 16 + j;
        if (n >= p.N) break;
        float acc = 0.0f;
        for (int64_t b = 0; b < p.nb; ++b) {
          int32_t isum = b_corr[(pn * p.nb + b) * 16 + j];
          for (int64_t q = b * per_block; q < (b + 1) * per_block; ++q)
            for (int t = 0; t < 4; ++t) isum += static_cast<int32_t>(ar[q * 4 + t]) * bp[q * 64 + j * 4 + t];
          acc += static_cast<float>(isum) * (a_scale[m * p.nb + b] * b_scale[(pn * p.nb + b) * 16 + j]);
        }
        c[m * ldc + n] = bias ? acc + bias[n] : acc;
      }
    }
  }
}

}  // namespace

const Kernels kKernels = {quantize, dequantize, linear, gemm, gemm_pack_b_portable};

}  // namespace scalar
}  // namespace cpu
}  // namespace bfp
}  // namespace llmcore
