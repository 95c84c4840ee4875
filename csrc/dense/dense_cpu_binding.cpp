// Torch binding of the dense CPU GEMV (dense_cpu.h): checks, layout, threads. The
// activation rows are laid out in per-thread scratch kept between calls, so a call
// allocates only its output; the weight's columns go to the chunk pool in tasks of a
// quarter of a thread's share of the weight, at least 32 KB (common/parallel.h), so a
// thread whose core is busy holds up little.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/check.h"
#include "common/parallel.h"
#include "dense/dense_cpu.h"

namespace llmcore {
namespace {

namespace cpu = dense::cpu;

std::vector<uint8_t>& scratch() {
  thread_local std::vector<uint8_t> s;
  return s;
}

at::Tensor linear_gemv_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias_arg) {
  CHECK_DEVICE(x, at::Device(at::kCPU));
  CHECK_FLOAT_INPUT(x);
  LLMCORE_CHECK(x.dim() >= 1, "x must have at least 1 dim ([..., K]), got shape ",
                shape_str(x.sizes()));
  const int64_t K = x.size(-1);
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  LLMCORE_CHECK(M <= cpu::kMaxRows, "x must have at most ", cpu::kMaxRows,
                " rows (the product of its leading dims) for linear_gemv, got shape ",
                shape_str(x.sizes()), " (", M, " rows); use F.linear for more");
  CHECK_DEVICE(weight, at::Device(at::kCPU));
  CHECK_DTYPE(weight, x.scalar_type());
  CHECK_DIM(weight, 2);
  LLMCORE_CHECK(weight.size(1) == K, "weight must be [N, ", K, "] (K = x.size(-1)), got shape ",
                shape_str(weight.sizes()), " for x of shape ", shape_str(x.sizes()));
  LLMCORE_CHECK(weight.stride(1) == 1 || K <= 1,
                "weight must be contiguous in its last dim (any row stride), got strides ",
                shape_str(weight.strides()));
  const int64_t N = weight.size(0);
  at::Tensor b;
  if (bias_arg.has_value()) {
    const at::Tensor& bias = *bias_arg;
    CHECK_DEVICE(bias, at::Device(at::kCPU));
    CHECK_DTYPE(bias, x.scalar_type());
    LLMCORE_CHECK(bias.dim() == 1 && bias.size(0) == N, "bias must have shape [", N,
                  "] (weight.size(0)), got ", shape_str(bias.sizes()));
    b = bias.contiguous();
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  if (M == 0 || N == 0) return y;

  const at::Tensor x2 = x.reshape({M, K});
  const at::Tensor xc = x2.stride(1) == 1 ? x2 : x2.contiguous();
  const cpu::GemvPlan p = cpu::gemv_plan(M, K, to_dtype(x.scalar_type()));
  std::vector<uint8_t>& s = scratch();
  const auto bytes = static_cast<size_t>(cpu::gemv_scratch_bytes(p));
  if (s.size() < bytes) s.resize(bytes);
  if (K > 0) cpu::gemv_prepare(p, xc.data_ptr(), M > 1 ? xc.stride(0) : K, s.data());

  const void* xs = s.data();
  const void* wp = weight.data_ptr();
  const int64_t ldw = N > 1 ? weight.stride(0) : K;
  const void* bp = b.defined() ? b.data_ptr() : nullptr;
  void* yp = y.data_ptr();
  const int64_t row_bytes = std::max<int64_t>(1, K * weight.element_size());
  // (a multiple of 4 columns: the kernels' blocks of weight rows stay whole)
  const int64_t task = gemv_task_bytes(N * row_bytes);
  const int64_t chunk = N * row_bytes <= task ? N : std::max<int64_t>(4, task / row_bytes / 4 * 4);
  parallel_chunks(N, chunk, [&](int64_t n0, int64_t n1) {
    cpu::gemv(p, xs, wp, ldw, bp, yp, N, n0, n1);
  });
  return y;
}

}  // namespace
}  // namespace llmcore

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("linear_gemv", &llmcore::linear_gemv_cpu);
}
