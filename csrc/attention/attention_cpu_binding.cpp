// Torch binding of the CPU attention kernels (attention_cpu.h): checks, views, threads. All
// the arithmetic is in the framework-free kernels; threads come from at::parallel_for (the
// forward: common/parallel.h's parallel_items, llmcore's helpers under inference mode),
// torch.get_num_threads() of them.
//
// Layout: inputs are used through their strides (any batch / token / head strides) as long
// as the last dim is contiguous; one that is not is copied with .contiguous(). Outputs are
// contiguous. The backward is deterministic whatever `deterministic` says: each pass owns
// the rows it writes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>

#include "attention/attention_cpu.h"
#include "common/check.h"
#include "common/parallel.h"

namespace llmcore {
namespace {

namespace cpu = attention::cpu;

at::Tensor lastdim_contiguous(const at::Tensor& x) {
  return x.size(-1) <= 1 || x.stride(-1) == 1 ? x : x.contiguous();
}

// [.., tokens, heads, dim] (dense: [batch, tokens, heads, dim]) as a kernel view.
cpu::ConstView const_view(const at::Tensor& x, bool packed) {
  const int64_t n = x.dim();
  return {x.data_ptr(), packed ? 0 : x.stride(0), x.stride(n - 3), x.stride(n - 2)};
}
cpu::View view(at::Tensor& x, bool packed) {
  const int64_t n = x.dim();
  return {x.data_ptr(), packed ? 0 : x.stride(0), x.stride(n - 3), x.stride(n - 2)};
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool packed,
               double scale) {
  const at::Device cpu_dev(at::kCPU);
  CHECK_DEVICE(q, cpu_dev);
  CHECK_DEVICE(k, cpu_dev);
  CHECK_DEVICE(v, cpu_dev);
  CHECK_FLOAT_INPUT(q);
  CHECK_DTYPE(k, q.scalar_type());
  CHECK_DTYPE(v, q.scalar_type());
  const int64_t nd = packed ? 3 : 4;
  CHECK_DIM(q, nd);
  CHECK_DIM(k, nd);
  CHECK_DIM(v, nd);
  LLMCORE_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ",
                shape_str(k.sizes()), " and ", shape_str(v.sizes()));
  if (!packed) CHECK_SIZE(k, 0, q.size(0));
  CHECK_SIZE(k, -1, q.size(-1));
  LLMCORE_CHECK(q.size(-1) >= 1, "q.size(-1) (head_dim) must be >= 1, got shape ",
                shape_str(q.sizes()));
  const int64_t h = q.size(-2), hkv = k.size(-2);
  LLMCORE_CHECK(hkv >= 1 && h % hkv == 0, "q's heads (", h,
                ") must be a multiple of k/v's heads (", hkv, ") (GQA/MQA)");
  LLMCORE_CHECK(std::isfinite(scale), "softmax_scale must be finite, got ", scale);
}

// grad_out / out: q's shape and dtype; lse: float32 of the given shape.
void check_saved(const at::Tensor& q, const at::Tensor& grad_out, const at::Tensor& out,
                 const at::Tensor& lse, at::IntArrayRef lse_shape) {
  const at::Device cpu_dev(at::kCPU);
  CHECK_DEVICE(grad_out, cpu_dev);
  CHECK_DEVICE(out, cpu_dev);
  CHECK_DEVICE(lse, cpu_dev);
  LLMCORE_CHECK(grad_out.sizes() == q.sizes(), "grad_out must have q's shape ",
                shape_str(q.sizes()), ", got ", shape_str(grad_out.sizes()));
  LLMCORE_CHECK(out.sizes() == q.sizes(), "out must have q's shape ", shape_str(q.sizes()),
                ", got ", shape_str(out.sizes()));
  CHECK_DTYPE(grad_out, q.scalar_type());
  CHECK_DTYPE(out, q.scalar_type());
  CHECK_DTYPE(lse, at::kFloat);
  LLMCORE_CHECK(lse.sizes() == lse_shape, "lse must have shape ", shape_str(lse_shape),
                ", got ", shape_str(lse.sizes()));
}

std::string list_str(const int32_t* p, int64_t n) {
  std::ostringstream os;
  os << "[";
  for (int64_t i = 0; i < std::min<int64_t>(n, 16); ++i) os << (i ? ", " : "") << p[i];
  os << (n > 16 ? ", ...]" : "]");
  return os.str();
}

// cu_seqlens: int32 [batch + 1] on the CPU, 0 .. total, non-decreasing. Returns the longest
// sequence, which must not exceed max_seqlen (the bound the caller promised).
int64_t check_cu_seqlens(const at::Tensor& cu, const char* name, int64_t batch1, int64_t total,
                         int64_t max_seqlen, const char* max_name) {
  CHECK_DEVICE(cu, at::Device(at::kCPU));
  LLMCORE_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1, name,
                " must be an int32 1-D tensor [batch + 1], got ", dtype_name(cu.scalar_type()),
                " ", shape_str(cu.sizes()));
  LLMCORE_CHECK(cu.size(0) == batch1 && batch1 >= 1, name, " must have ", batch1,
                " entries (those of cu_seqlens_q, >= 1), got shape ", shape_str(cu.sizes()));
  const at::Tensor c = cu.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  int64_t longest = 0;
  bool ok = p[0] == 0 && p[batch1 - 1] == total;
  for (int64_t b = 0; ok && b + 1 < batch1; ++b) {
    ok = p[b + 1] >= p[b];
    longest = std::max<int64_t>(longest, p[b + 1] - p[b]);
  }
  LLMCORE_CHECK(ok, name, " must start at 0, be non-decreasing and end at ", total,
                " (the rows of the packed tensor), got ", list_str(p, batch1));
  LLMCORE_CHECK(longest <= max_seqlen, "a sequence in ", name, " has ", longest,
                " rows, more than ", max_name, " (", max_seqlen, ")");
  return longest;
}

cpu::Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          bool packed, bool causal, double scale) {
  cpu::Problem p{};
  p.dtype = to_dtype(q.scalar_type());
  p.batch = packed ? 0 : q.size(0);
  p.heads = q.size(-2);
  p.kv_heads = k.size(-2);
  p.head_dim = q.size(-1);
  p.seq_q = q.size(-3);
  p.seq_k = k.size(-3);
  p.max_seqlen_q = p.seq_q;
  p.max_seqlen_k = p.seq_k;
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  p.q = const_view(q, packed);
  p.k = const_view(k, packed);
  p.v = const_view(v, packed);
  // lse / delta: dense [B, H, Sq], packed [H, Tq] (contiguous).
  p.lse_batch_stride = packed ? 0 : p.heads * p.seq_q;
  p.lse_head_stride = p.seq_q;
  return p;
}

void set_varlen(cpu::Problem& p, const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                int64_t max_k) {
  p.batch = cu_q.size(0) - 1;
  p.cu_seqlens_q = cu_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_k.data_ptr<int32_t>();
  p.max_seqlen_q = max_q;
  p.max_seqlen_k = max_k;
}

std::tuple<at::Tensor, at::Tensor> run_fwd(cpu::Problem& p, const at::Tensor& q, bool packed) {
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = packed ? at::empty({p.heads, p.seq_q}, q.options().dtype(at::kFloat))
                          : at::empty({p.batch, p.heads, p.seq_q}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  const cpu::View ov = view(out, packed);
  float* lp = lse.data_ptr<float>();
  parallel_items(cpu::fwd_items(p), 1, [&](int64_t i0, int64_t i1) {
    cpu::attention_fwd(p, ov, lp, i0, i1);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_bwd(cpu::Problem& p, const at::Tensor& q,
                                                       const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& grad_out,
                                                       const at::Tensor& out,
                                                       const at::Tensor& lse, bool packed) {
  at::Tensor gq = at::empty(q.sizes(), q.options());
  at::Tensor gk = at::empty(k.sizes(), k.options());
  at::Tensor gv = at::empty(v.sizes(), v.options());
  if (k.numel() == 0) return {gq.zero_(), gk, gv};
  if (q.numel() == 0) return {gq, gk.zero_(), gv.zero_()};
  const at::Tensor go = lastdim_contiguous(grad_out), o = lastdim_contiguous(out);
  const at::Tensor l = lse.contiguous();
  at::Tensor delta = at::empty_like(l);
  cpu::Backward g{const_view(o, packed), const_view(go, packed), l.data_ptr<float>(),
                  delta.data_ptr<float>(), view(gq, packed), view(gk, packed), view(gv, packed)};
  const int64_t nq = cpu::fwd_items(p), nkv = cpu::bwd_kv_items(p);
  at::parallel_for(0, nq, 1, [&](int64_t i0, int64_t i1) {
    cpu::attention_bwd_delta(p, g, i0, i1);
  });
  if (cpu::bwd_fused(p)) {
    at::parallel_for(0, cpu::bwd_fused_items(p), 1, [&](int64_t i0, int64_t i1) {
      cpu::attention_bwd_fused(p, g, i0, i1);
    });
    return {gq, gk, gv};
  }
  at::parallel_for(0, nkv, 1, [&](int64_t i0, int64_t i1) {
    cpu::attention_bwd_kv(p, g, i0, i1);
  });
  at::parallel_for(0, nq, 1, [&](int64_t i0, int64_t i1) {
    cpu::attention_bwd_q(p, g, i0, i1);
  });
  return {gq, gk, gv};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, bool causal,
                                                     double softmax_scale) {
  check_qkv(q_in, k_in, v_in, false, softmax_scale);
  const at::Tensor q = lastdim_contiguous(q_in), k = lastdim_contiguous(k_in),
                   v = lastdim_contiguous(v_in);
  cpu::Problem p = make_problem(q, k, v, false, causal, softmax_scale);
  return run_fwd(p, q, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse, bool causal,
    double softmax_scale, bool deterministic) {
  (void)deterministic;  // always deterministic (see the file comment)
  check_qkv(q_in, k_in, v_in, false, softmax_scale);
  check_saved(q_in, grad_out, out, lse, {q_in.size(0), q_in.size(2), q_in.size(1)});
  const at::Tensor q = lastdim_contiguous(q_in), k = lastdim_contiguous(k_in),
                   v = lastdim_contiguous(v_in);
  cpu::Problem p = make_problem(q, k, v, false, causal, softmax_scale);
  return run_bwd(p, q, k, v, grad_out, out, lse, false);
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double softmax_scale) {
  check_qkv(q_in, k_in, v_in, true, softmax_scale);
  const int64_t b1 = cu_seqlens_q.dim() == 1 ? cu_seqlens_q.size(0) : -1;
  const int64_t mq = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", b1, q_in.size(0),
                                      max_seqlen_q, "max_seqlen_q");
  const int64_t mk = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", b1, k_in.size(0),
                                      max_seqlen_k, "max_seqlen_k");
  const at::Tensor q = lastdim_contiguous(q_in), k = lastdim_contiguous(k_in),
                   v = lastdim_contiguous(v_in);
  const at::Tensor cq = cu_seqlens_q.contiguous(), ck = cu_seqlens_k.contiguous();
  cpu::Problem p = make_problem(q, k, v, true, causal, softmax_scale);
  set_varlen(p, cq, ck, mq, mk);
  return run_fwd(p, q, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double softmax_scale, bool deterministic) {
  (void)deterministic;
  check_qkv(q_in, k_in, v_in, true, softmax_scale);
  check_saved(q_in, grad_out, out, lse, {q_in.size(1), q_in.size(0)});
  const int64_t b1 = cu_seqlens_q.dim() == 1 ? cu_seqlens_q.size(0) : -1;
  const int64_t mq = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", b1, q_in.size(0),
                                      max_seqlen_q, "max_seqlen_q");
  const int64_t mk = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", b1, k_in.size(0),
                                      max_seqlen_k, "max_seqlen_k");
  const at::Tensor q = lastdim_contiguous(q_in), k = lastdim_contiguous(k_in),
                   v = lastdim_contiguous(v_in);
  const at::Tensor cq = cu_seqlens_q.contiguous(), ck = cu_seqlens_k.contiguous();
  cpu::Problem p = make_problem(q, k, v, true, causal, softmax_scale);
  set_varlen(p, cq, ck, mq, mk);
  return run_bwd(p, q, k, v, grad_out, out, lse, true);
}

}  // namespace
}  // namespace llmcore

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("attention_fwd", &llmcore::attention_fwd_cpu);
  m.impl("attention_bwd", &llmcore::attention_bwd_cpu);
  m.impl("attention_varlen_fwd", &llmcore::attention_varlen_fwd_cpu);
  m.impl("attention_varlen_bwd", &llmcore::attention_varlen_bwd_cpu);
}
