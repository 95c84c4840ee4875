// Dense small-M GEMV on the CPU (llmcore::linear_gemv): framework-free kernels over raw
// pointers, threaded by the caller (csrc/dense/dense_cpu_binding.cpp).
//
//   y[m, n] = round(sum_k x[m, k] w[n, k] + bias[n])   m < M <= 16, one dtype for x, w,
//                                                       bias and y (float32/bf16/fp16)
//
// with the sum in fp32 and one rounding to the dtype at the end. A call is a plan, the
// activation rows laid out once into scratch (gemv_prepare, O(M K)), then gemv over
// column ranges [n_begin, n_end) on any threads: each weight row is read once for all M
// rows. Each output element's summation order depends on M, K and the ISA path only, never
// on the column range or the thread count, so results are the same on any number of
// threads.
#pragma once

#include <stdint.h>

#include "common/cpu_isa.h"
#include "common/dtype.h"

namespace llmcore {
namespace dense {
namespace cpu {

constexpr int64_t kMaxRows = 16;

// How the activation rows are laid out in scratch: kF32 rows of kp fp32 (the weight widened
// to fp32 meets them), kBf16 rows of kp bf16 (AVX512_BF16: vdpbf16ps multiplies bf16 pairs
// exactly and accumulates in fp32). Either way zeros from K to kp.
enum class XLayout : int { kF32 = 0, kBf16 = 1 };

struct GemvPlan {
  int64_t M = 0, K = 0, kp = 0;  // kp: K rounded up to 32, the scratch row length
  DType dtype = DType::kFloat32;
  Isa isa = Isa::kScalar;
  XLayout layout = XLayout::kF32;
};

// The path this call takes: LLMCORE_CPU_ISA caps the ISA as for every family;
// LLMCORE_CPU_BF16_DOT=0 makes the AVX-512 bf16 path widen (as on a CPU without
// AVX512_BF16) so that tests reach it. Both variables are read per call.
GemvPlan gemv_plan(int64_t M, int64_t K, DType dtype);

// Bytes of scratch gemv_prepare fills.
int64_t gemv_scratch_bytes(const GemvPlan& p);

// x: M rows of K elements of p.dtype, row stride ldx (elements) -> scratch.
void gemv_prepare(const GemvPlan& p, const void* x, int64_t ldx, void* scratch);

// Columns [n_begin, n_end) of y (row stride ldy, p.dtype) from the prepared rows, the
// weight (row n at w + n * ldw elements of p.dtype, contiguous within the row) and bias
// (N elements of p.dtype, or null).
void gemv(const GemvPlan& p, const void* scratch, const void* w, int64_t ldw, const void* bias,
          void* y, int64_t ldy, int64_t n_begin, int64_t n_end);

}  // namespace cpu
}  // namespace dense
}  // namespace llmcore
