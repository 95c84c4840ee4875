// The torch binding of the fused attention CUDA kernels: TORCH_LIBRARY_IMPL(llmcore, CUDA, m)
// for attention_fwd, attention_bwd, attention_varlen_fwd and attention_varlen_bwd (schemas
// in csrc/ops.cpp). Checks every argument, copies an input only when the kernels cannot
// read it in place (last dim not contiguous, another stride not a multiple of 8 elements,
// data not 16-byte aligned), allocates outputs and scratch, and calls the framework-free
// launchers of attention_cuda.cuh on the current stream.
//
// CUDA kernels: float16 / bfloat16; the head dims of generated/head_dims.h (from
// llmcore/ops/capabilities.py; the backward has fewer); anything else is a ValueError
// naming the supported set (the Python face sends other cases to the reference). Varlen: cu_seqlens are trusted to be the table the
// Python face validated on the host (the kernels clamp them to the packed tensors, so a bad
// table gives wrong rows, never an out-of-bounds access).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "attention/attention_cuda.cuh"
#include "common/check.h"
#include "common/cuda_check.h"

namespace llmcore {
namespace attention {
namespace {

namespace kc = llmcore::attention::cuda;

constexpr int64_t kIntMax = std::numeric_limits<int>::max();

// x itself when the kernels can read it in place, else a fresh contiguous copy.
at::Tensor kernel_ready(const at::Tensor& x) {
  bool ok = x.numel() == 0 || (x.stride(-1) == 1 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0);
  for (int64_t d = 0; ok && d + 1 < x.dim(); ++d)
    if (x.size(d) > 1 && x.stride(d) % 8 != 0) ok = false;
  return ok ? x : x.clone(at::MemoryFormat::Contiguous);
}

// q, k, v: CUDA, one device, fp16/bf16, dims, shapes, supported head_dim.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool packed,
               bool backward, const char* op) {
  CHECK_CUDA(q);
  CHECK_SAME_DEVICE(q, k);
  CHECK_SAME_DEVICE(q, v);
  TORCH_CHECK_VALUE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
                    ": q must be float16 or bfloat16 on CUDA, got ", dtype_name(q.scalar_type()));
  CHECK_DTYPE(k, q.scalar_type());
  CHECK_DTYPE(v, q.scalar_type());
  const int64_t nd = packed ? 3 : 4;
  CHECK_DIM(q, nd);
  CHECK_DIM(k, nd);
  CHECK_DIM(v, nd);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "k and v must have the same shape, got ",
                    shape_str(k.sizes()), " and ", shape_str(v.sizes()));
  if (!packed) CHECK_SIZE(k, 0, q.size(0));
  CHECK_SIZE(k, -1, q.size(-1));
  const int64_t h = q.size(-2), hkv = k.size(-2), d = q.size(-1);
  TORCH_CHECK_VALUE(hkv > 0 && h % hkv == 0, "q's heads (", h,
                    ") must be a multiple of k/v's heads (", hkv, ") (GQA/MQA)");
  const bool ok = d <= kIntMax && (backward ? kc::bwd_head_dim_supported(static_cast<int>(d))
                                            : kc::fwd_head_dim_supported(static_cast<int>(d)));
  TORCH_CHECK_VALUE(ok, op, ": the CUDA kernels support head_dim ",
                    backward ? LLMCORE_ATTENTION_BWD_HEAD_DIMS_STR
                             : LLMCORE_ATTENTION_FWD_HEAD_DIMS_STR,
                    ", got ", d);
  TORCH_CHECK_VALUE(h <= 65535, op, ": at most 65535 heads, got ", h);
  if (!packed) TORCH_CHECK_VALUE(q.size(0) <= 65535, op, ": at most 65535 batches, got ", q.size(0));
  TORCH_CHECK_VALUE(q.size(-3) <= kIntMax && k.size(-3) <= kIntMax, op,
                    ": sequence lengths must be < 2^31, got ", q.size(-3), " and ", k.size(-3));
}

void check_varlen(const at::Tensor& q, const at::Tensor& cu_q, const at::Tensor& cu_k,
                  int64_t max_q, int64_t max_k, const char* op) {
  CHECK_SAME_DEVICE(q, cu_q);
  CHECK_SAME_DEVICE(q, cu_k);
  CHECK_DTYPE(cu_q, at::kInt);
  CHECK_DTYPE(cu_k, at::kInt);
  CHECK_DIM(cu_q, 1);
  CHECK_DIM(cu_k, 1);
  TORCH_CHECK_VALUE(cu_q.numel() >= 1 && cu_q.numel() == cu_k.numel(), op,
                    ": cu_seqlens_q and cu_seqlens_k must have the same length >= 1, got ",
                    cu_q.numel(), " and ", cu_k.numel());
  TORCH_CHECK_VALUE(cu_q.numel() - 1 <= 65535, op, ": at most 65535 sequences, got ", cu_q.numel() - 1);
  TORCH_CHECK_VALUE(max_q >= 0 && max_q <= kIntMax && max_k >= 0 && max_k <= kIntMax, op,
                    ": max_seqlen_q / max_seqlen_k must be in [0, 2^31), got ", max_q, " and ", max_k);
}

// The q/k/v/out strides and sizes of FwdParams. Dense [B, S, H, D]; packed [T, H, D].
void set_qkv(kc::FwdParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor& out, bool packed) {
  const int o = packed ? 1 : 0;  // index shift of the row/head dims
  p.dtype = to_dtype(q.scalar_type());
  p.head_dim = static_cast<int>(q.size(-1));
  p.heads = static_cast<int>(q.size(-2));
  p.kv_heads = static_cast<int>(k.size(-2));
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.q_batch_stride = packed ? 0 : q.stride(0);
  p.k_batch_stride = packed ? 0 : k.stride(0);
  p.v_batch_stride = packed ? 0 : v.stride(0);
  p.o_batch_stride = packed ? 0 : out.stride(0);
  p.q_row_stride = q.stride(1 - o);
  p.k_row_stride = k.stride(1 - o);
  p.v_row_stride = v.stride(1 - o);
  p.o_row_stride = out.stride(1 - o);
  p.q_head_stride = q.stride(2 - o);
  p.k_head_stride = k.stride(2 - o);
  p.v_head_stride = v.stride(2 - o);
  p.o_head_stride = out.stride(2 - o);
}

// Sequence geometry and lse layout: dense lse [B, H, Sq], varlen lse [H, Tq].
void set_geometry(kc::FwdParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor* cu_q,
                  const at::Tensor* cu_k, int64_t max_q, int64_t max_k) {
  if (cu_q == nullptr) {
    p.batch = static_cast<int>(q.size(0));
    p.seqlen_q = static_cast<int>(q.size(1));
    p.seqlen_k = static_cast<int>(k.size(1));
    p.lse_batch_stride = q.size(2) * q.size(1);
    p.lse_head_stride = q.size(1);
  } else {
    p.batch = static_cast<int>(cu_q->numel() - 1);
    p.seqlen_q = static_cast<int>(max_q);
    p.seqlen_k = static_cast<int>(max_k);
    p.cu_seqlens_q = cu_q->data_ptr<int>();
    p.cu_seqlens_k = cu_k->data_ptr<int>();
    p.total_q = q.size(0);
    p.total_k = k.size(0);
    p.lse_batch_stride = 0;
    p.lse_head_stride = q.size(0);
  }
}

std::tuple<at::Tensor, at::Tensor> fwd_impl(const at::Tensor& q_in, const at::Tensor& k_in,
                                            const at::Tensor& v_in, const at::Tensor* cu_q,
                                            const at::Tensor* cu_k, int64_t max_q, int64_t max_k,
                                            bool causal, double scale, const char* op) {
  const bool packed = cu_q != nullptr;
  check_qkv(q_in, k_in, v_in, packed, false, op);
  if (packed) check_varlen(q_in, *cu_q, *cu_k, max_q, max_k, op);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": softmax_scale must be finite, got ", scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = kernel_ready(q_in), k = kernel_ready(k_in), v = kernel_ready(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options());
  const int64_t h = q.size(-2);
  at::Tensor lse = packed ? at::empty({h, q.size(0)}, q.options().dtype(at::kFloat))
                          : at::empty({q.size(0), h, q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  if (k.numel() == 0) {  // no keys at all: every row sees none
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  at::Tensor cu_qc, cu_kc;
  if (packed) {
    cu_qc = cu_q->contiguous();
    cu_kc = cu_k->contiguous();
  }
  kc::FwdParams p;
  set_qkv(p, q, k, v, out, packed);
  set_geometry(p, q, k, packed ? &cu_qc : nullptr, packed ? &cu_kc : nullptr, max_q, max_k);
  p.lse = lse.data_ptr<float>();
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  CHECK_LAUNCH(kc::attention_fwd(p, current_stream()), "attention_fwd");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_impl(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor* cu_q, const at::Tensor* cu_k, int64_t max_q, int64_t max_k, bool causal,
    double scale, bool deterministic, const char* op) {
  const bool packed = cu_q != nullptr;
  check_qkv(q_in, k_in, v_in, packed, true, op);
  if (packed) check_varlen(q_in, *cu_q, *cu_k, max_q, max_k, op);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": softmax_scale must be finite, got ", scale);
  CHECK_SAME_DEVICE(q_in, dout_in);
  CHECK_SAME_DEVICE(q_in, out_in);
  CHECK_SAME_DEVICE(q_in, lse_in);
  TORCH_CHECK_VALUE(dout_in.sizes() == q_in.sizes(), op, ": grad_out must have q's shape ",
                    shape_str(q_in.sizes()), ", got ", shape_str(dout_in.sizes()));
  TORCH_CHECK_VALUE(out_in.sizes() == q_in.sizes(), op, ": out must have q's shape ",
                    shape_str(q_in.sizes()), ", got ", shape_str(out_in.sizes()));
  CHECK_DTYPE(dout_in, q_in.scalar_type());
  CHECK_DTYPE(out_in, q_in.scalar_type());
  CHECK_DTYPE(lse_in, at::kFloat);
  const int64_t h = q_in.size(-2);
  const std::vector<int64_t> lse_shape =
      packed ? std::vector<int64_t>{h, q_in.size(0)} : std::vector<int64_t>{q_in.size(0), h, q_in.size(1)};
  TORCH_CHECK_VALUE(lse_in.sizes() == at::IntArrayRef(lse_shape), op, ": lse must have shape ",
                    shape_str(lse_shape), ", got ", shape_str(lse_in.sizes()));

  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = kernel_ready(q_in), k = kernel_ready(k_in), v = kernel_ready(v_in);
  const at::Tensor dout = kernel_ready(dout_in), out = kernel_ready(out_in);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) {  // no queries or no keys: all gradients are 0
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  at::Tensor cu_qc, cu_kc;
  if (packed) {
    cu_qc = cu_q->contiguous();
    cu_kc = cu_k->contiguous();
  }
  kc::BwdParams p;
  set_qkv(p, q, k, v, out, packed);
  set_geometry(p, q, k, packed ? &cu_qc : nullptr, packed ? &cu_kc : nullptr, max_q, max_k);
  p.lse = const_cast<float*>(lse.data_ptr<float>());  // read only
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.deterministic = deterministic;
  const int o = packed ? 1 : 0;
  p.dout = dout.data_ptr();
  p.do_batch_stride = packed ? 0 : dout.stride(0);
  p.do_row_stride = dout.stride(1 - o);
  p.do_head_stride = dout.stride(2 - o);
  p.dq = dq.data_ptr();
  p.dq_batch_stride = packed ? 0 : dq.stride(0);
  p.dq_row_stride = dq.stride(1 - o);
  p.dq_head_stride = dq.stride(2 - o);
  p.dk = dk.data_ptr();
  p.dk_batch_stride = packed ? 0 : dk.stride(0);
  p.dk_row_stride = dk.stride(1 - o);
  p.dk_head_stride = dk.stride(2 - o);
  p.dv = dv.data_ptr();
  p.dv_batch_stride = packed ? 0 : dv.stride(0);
  p.dv_row_stride = dv.stride(1 - o);
  p.dv_head_stride = dv.stride(2 - o);

  const int64_t d = q.size(-1);
  const int64_t tq = packed ? q.size(0) : q.size(0) * q.size(1);
  const int64_t tk = packed ? k.size(0) : k.size(0) * k.size(1);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dsum = at::empty(lse.sizes(), f32);
  p.dsum = dsum.data_ptr<float>();
  at::Tensor dq_accum, dk_accum, dv_accum;
  if (!deterministic) {
    dq_accum = at::zeros({tq, h, d}, f32);
    p.dq_accum = dq_accum.data_ptr<float>();
    p.acc_q_batch_stride = packed ? 0 : q.size(1) * h * d;
  }
  if (h != k.size(-2)) {
    dk_accum = at::empty({tk, h, d}, f32);
    dv_accum = at::empty({tk, h, d}, f32);
    p.dk_accum = dk_accum.data_ptr<float>();
    p.dv_accum = dv_accum.data_ptr<float>();
    p.acc_k_batch_stride = packed ? 0 : k.size(1) * h * d;
  }
  CHECK_LAUNCH(kc::attention_bwd(p, current_stream()), "attention_bwd");
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, bool causal,
                                                      double softmax_scale) {
  return fwd_impl(q, k, v, nullptr, nullptr, 0, 0, causal, softmax_scale, "attention_fwd");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double softmax_scale,
    bool deterministic) {
  return bwd_impl(grad_out, q, k, v, out, lse, nullptr, nullptr, 0, 0, causal, softmax_scale,
                  deterministic, "attention_bwd");
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
    double softmax_scale) {
  return fwd_impl(q, k, v, &cu_seqlens_q, &cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                  softmax_scale, "attention_varlen_fwd");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
    double softmax_scale, bool deterministic) {
  return bwd_impl(grad_out, q, k, v, out, lse, &cu_seqlens_q, &cu_seqlens_k, max_seqlen_q,
                  max_seqlen_k, causal, softmax_scale, deterministic, "attention_varlen_bwd");
}

}  // namespace
}  // namespace attention
}  // namespace llmcore

TORCH_LIBRARY_IMPL(llmcore, CUDA, m) {
  m.impl("attention_fwd", &llmcore::attention::attention_fwd_cuda);
  m.impl("attention_bwd", &llmcore::attention::attention_bwd_cuda);
  m.impl("attention_varlen_fwd", &llmcore::attention::attention_varlen_fwd_cuda);
  m.impl("attention_varlen_bwd", &llmcore::attention::attention_varlen_bwd_cuda);
}
