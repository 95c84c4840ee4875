// Torch binding of the fused CPU decoder-step kernels (fused_cpu.h): checks and threads.
// The ops take one dtype for all their float inputs (the Python faces fall back to the
// unfused chain otherwise).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "common/check.h"
#include "common/parallel.h"
#include "fused/fused_cpu.h"

namespace llmcore {
namespace {

namespace cpu = fused::cpu;

// Elements per parallel task, so a decode step's rows stay on one thread. Tasks go to the
// per-token ops' own helper threads (common/parallel.h), never to an OpenMP region: after
// one, libgomp's workers spin for a while and take the core a GEMV's helper needs.
constexpr int64_t kGrainElems = int64_t{1} << 16;

int64_t grain_rows(int64_t row_elems) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, row_elems));
}

void check_same(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                const char* b_name) {
  LLMCORE_CHECK(b.device() == a.device(), b_name, " must be on ", a.device(), " (", a_name,
                "'s device), got ", b.device());
  LLMCORE_CHECK(b.scalar_type() == a.scalar_type(), b_name, " must have dtype ",
                dtype_name(a.scalar_type()), " (", a_name, "'s), got ",
                dtype_name(b.scalar_type()));
}

std::tuple<at::Tensor, at::Tensor> norm_impl(const at::Tensor& x, const at::Tensor* delta,
                                             const at::Tensor& weight, double eps) {
  CHECK_DEVICE(x, at::Device(at::kCPU));
  CHECK_FLOAT_INPUT(x);
  LLMCORE_CHECK(x.dim() >= 1, "x must have >= 1 dims, got shape ", shape_str(x.sizes()));
  const int64_t n = x.size(-1);
  check_same(x, "x", weight, "weight");
  LLMCORE_CHECK(weight.dim() == 1 && weight.size(0) == n, "weight must have shape [", n,
                "] (x.size(-1)), got ", shape_str(weight.sizes()));
  if (delta != nullptr) {
    check_same(x, "x", *delta, "delta");
    LLMCORE_CHECK(delta->sizes() == x.sizes(), "delta must have x's shape ",
                  shape_str(x.sizes()), ", got ", shape_str(delta->sizes()));
  }
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor dc = delta != nullptr ? delta->contiguous() : at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor sum = delta != nullptr ? at::empty(x.sizes(), x.options()) : at::Tensor();
  if (x.numel() == 0) return {sum, y};
  const int64_t rows = x.numel() / n;
  const DType t = to_dtype(x.scalar_type());
  const void* xp = xc.data_ptr();
  const void* dp = delta != nullptr ? dc.data_ptr() : nullptr;
  void* sp = delta != nullptr ? sum.data_ptr() : nullptr;
  const void* wp = wc.data_ptr();
  void* yp = y.data_ptr();
  const float e = static_cast<float>(eps);
  parallel_chunks(rows, grain_rows(n), [&](int64_t r0, int64_t r1) {
    cpu::rms_norm_rows(xp, dp, wp, sp, yp, t, n, e, r0, r1);
  });
  return {sum, y};
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return std::get<1>(norm_impl(x, nullptr, weight, eps));
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& delta,
                                                    const at::Tensor& weight, double eps) {
  return norm_impl(x, &delta, weight, eps);
}

void rope_one(const at::Tensor& x, const char* name, const at::Tensor& c, const at::Tensor& s) {
  CHECK_DEVICE(x, at::Device(at::kCPU));
  CHECK_FLOAT_INPUT(x);
  LLMCORE_CHECK(x.dim() == 4, name, " must have 4 dims [B, T, heads, head_dim], got shape ",
                shape_str(x.sizes()));
  LLMCORE_CHECK(x.stride(3) == 1 || x.size(3) <= 1, name,
                " must be contiguous in its last dim, got strides ", shape_str(x.strides()));
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3);
  LLMCORE_CHECK(D % 2 == 0, name, " must have an even head_dim, got shape ", shape_str(x.sizes()));
  check_same(x, name, c, "cos");
  LLMCORE_CHECK(c.dim() == 3 && c.size(0) == B && c.size(1) == T && c.size(2) == D,
                "cos and sin must have shape [", B, ", ", T, ", ", D, "] (", name,
                "'s B, T, head_dim), got ", shape_str(c.sizes()));
  if (x.numel() == 0) return;
  const at::Tensor cc = c.contiguous(), sc = s.contiguous();
  const void* cp = cc.data_ptr();
  const void* sp = sc.data_ptr();
  void* xp = x.data_ptr();
  const DType t = to_dtype(x.scalar_type());
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
  parallel_chunks(B * T, grain_rows(H * D), [&](int64_t r0, int64_t r1) {
    cpu::rope_rows(xp, T, s0, s1, s2, H, D, cp, sp, t, r0, r1);
  });
}

void rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
              const at::Tensor& sin) {
  LLMCORE_CHECK(sin.sizes() == cos.sizes() && sin.scalar_type() == cos.scalar_type(),
                "sin must have cos's shape and dtype, got ", shape_str(sin.sizes()), " and ",
                shape_str(cos.sizes()));
  LLMCORE_CHECK(!q.is_same(k), "q and k must be different tensors");
  rope_one(q, "q", cos, sin);
  rope_one(k, "k", cos, sin);
}

at::Tensor silu_mul_cpu(const at::Tensor& gate, const at::Tensor& up) {
  CHECK_DEVICE(gate, at::Device(at::kCPU));
  CHECK_FLOAT_INPUT(gate);
  check_same(gate, "gate", up, "up");
  LLMCORE_CHECK(up.sizes() == gate.sizes(), "up must have gate's shape ",
                shape_str(gate.sizes()), ", got ", shape_str(up.sizes()));
  const at::Tensor gc = gate.contiguous(), uc = up.contiguous();
  at::Tensor y = at::empty(gate.sizes(), gate.options());
  const int64_t n = y.numel();
  if (n == 0) return y;
  const void* gp = gc.data_ptr();
  const void* upp = uc.data_ptr();
  void* yp = y.data_ptr();
  const DType t = to_dtype(gate.scalar_type());
  parallel_chunks(n, kGrainElems, [&](int64_t i0, int64_t i1) {
    cpu::silu_mul(gp, upp, yp, t, i0, i1);
  });
  return y;
}

at::Tensor argmax_last_cpu(const at::Tensor& x) {
  CHECK_DEVICE(x, at::Device(at::kCPU));
  CHECK_FLOAT_INPUT(x);
  LLMCORE_CHECK(x.dim() >= 1 && x.size(-1) >= 1,
                "x must have a non-empty last axis to take its argmax, got shape ",
                shape_str(x.sizes()));
  const int64_t n = x.size(-1);
  at::Tensor out = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kLong));
  const int64_t rows = out.numel();
  if (rows == 0) return out;
  const at::Tensor xc = x.contiguous();
  const void* xp = xc.data_ptr();
  int64_t* op = out.data_ptr<int64_t>();
  const DType t = to_dtype(x.scalar_type());
  parallel_chunks(rows, grain_rows(n), [&](int64_t r0, int64_t r1) {
    cpu::argmax_rows(xp, t, n, op, r0, r1);
  });
  return out;
}

}  // namespace
}  // namespace llmcore

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("argmax_last", &llmcore::argmax_last_cpu);
  m.impl("rms_norm", &llmcore::rms_norm_cpu);
  m.impl("add_rms_norm", &llmcore::add_rms_norm_cpu);
  m.impl("rope_", &llmcore::rope_cpu);
  m.impl("silu_mul", &llmcore::silu_mul_cpu);
}
