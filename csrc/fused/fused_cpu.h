// Fused elementwise CPU kernels of a decoder step (framework-free): RMSNorm with the
// residual add before it, rotary embedding of q and k in place, SwiGLU's silu(gate) * up.
// Each replaces a chain of small torch ops (one dispatch and one temporary each) by one
// pass over the row, and rounds where the unfused chain rounds (a 16-bit dtype is rounded
// after each op the chain would round after), so results match the chain up to fp32
// summation order and the libm exp.
//
// Rows are contiguous; one call covers rows [r0, r1) so the bindings can split rows over
// threads.
#pragma once

#include <stdint.h>

#include "common/dtype.h"

namespace llmcore {
namespace fused {
namespace cpu {

// y[r] = weight * to_dtype(x[r] * rsqrt(mean(x[r]^2) + eps)), x, weight, y of dtype t,
// rows of n. With `delta` (not null): x[r] += delta[r] first (rounded to t, written to
// `sum`), and the norm is of that sum.
void rms_norm_rows(const void* x, const void* delta, const void* weight, void* sum, void* y,
                   DType t, int64_t n, float eps, int64_t r0, int64_t r1);

// Rotate-half RoPE in place for rows of head_dim d (d even): the first half i and the second
// half i + d/2 of each head become x_i c_i - x_{i+h} s_i and x_{i+h} c_{i+h} + x_i s_{i+h}.
// x [batch][seq][heads][d] with strides (elements) s0, s1, s2 and the last dim contiguous;
// cos / sin [batch * seq][d] contiguous; all of dtype t. Tokens r = b * seq + s in [r0, r1).
void rope_rows(void* x, int64_t seq, int64_t s0, int64_t s1, int64_t s2, int64_t heads,
               int64_t d, const void* cos, const void* sin, DType t, int64_t r0, int64_t r1);

// y[i] = to_dtype(silu(gate[i])) * up[i] for i in [i0, i1), all of dtype t.
void silu_mul(const void* gate, const void* up, void* y, DType t, int64_t i0, int64_t i1);

// out[r] = the index of the largest of row r (n values of dtype t, contiguous rows) for r
// in [r0, r1): the first one on ties, the first NaN if the row has one (torch.argmax).
void argmax_rows(const void* x, DType t, int64_t n, int64_t* out, int64_t r0, int64_t r1);

}  // namespace cpu
}  // namespace fused
}  // namespace llmcore
