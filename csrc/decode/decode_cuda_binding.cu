// The torch binding of the decoding CUDA kernels: TORCH_LIBRARY_IMPL(llmcore, CUDA, m) for
// decode_attention and kv_cache_append (schemas in csrc/ops.cpp). Checks every argument,
// fills the framework-free parameter structs of decode_cuda.cuh and launches on the
// current stream.
//
//   decode_attention   q fp16/bf16, head_dim 64, 128 or 256; cache of q's dtype or MXINT8
//                      (int8 + k/v_exponent). Cache rows must start 16-byte aligned: a
//                      cache that is not (an odd view) is copied first. The split count
//                      comes from decode_attention_num_splits; its fp32 workspace is
//                      allocated here (caching allocator).
//   kv_cache_append    k/v fp32/bf16/fp16 into a cache of their dtype or MXINT8; the cache
//                      is written in place through its strides (last dim contiguous).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/check.h"
#include "common/cuda_check.h"
#include "decode/decode_cuda.cuh"

namespace llmcore {
namespace decode {
namespace {

namespace kc = llmcore::decode::cuda;

kc::Strides3 strides3(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// The cache pair (and exponents) against each other and against head_dim / kv_heads.
// Returns whether it is an MXINT8 cache.
bool check_cache(const at::Tensor& k_cache, const at::Tensor& vc, const std::optional<at::Tensor>& ke,
                 const std::optional<at::Tensor>& ve, at::ScalarType float_dtype,
                 const at::Tensor& like, int64_t head_dim, const char* op) {
  CHECK_SAME_DEVICE(like, k_cache);
  CHECK_SAME_DEVICE(like, vc);
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && vc.dim() == 4, op, ": k_cache and v_cache must be 4-D, got ",
                    shape_str(k_cache.sizes()), " and ", shape_str(vc.sizes()));
  TORCH_CHECK_VALUE(k_cache.sizes() == vc.sizes() && k_cache.scalar_type() == vc.scalar_type(), op,
                    ": k_cache and v_cache must match, got ", dtype_name(k_cache.scalar_type()), " ",
                    shape_str(k_cache.sizes()), " and ", dtype_name(vc.scalar_type()), " ",
                    shape_str(vc.sizes()));
  TORCH_CHECK_VALUE(k_cache.size(3) == head_dim, op, ": cache head_dim must be ", head_dim,
                    ", got shape ", shape_str(k_cache.sizes()));
  CHECK_LASTDIM_CONTIGUOUS(k_cache);
  CHECK_LASTDIM_CONTIGUOUS(vc);
  TORCH_CHECK_VALUE(ke.has_value() == ve.has_value(), op,
                    ": k_exponent and v_exponent must be given together");
  const bool int8 = ke.has_value();
  if (!int8) {
    TORCH_CHECK_VALUE(k_cache.scalar_type() == float_dtype, op, ": k_cache must have dtype ",
                      dtype_name(float_dtype), " (or be int8 with exponents), got ",
                      dtype_name(k_cache.scalar_type()));
    return false;
  }
  CHECK_DTYPE(k_cache, at::kChar);
  const int64_t nb = (head_dim + 31) / 32;
  for (const at::Tensor* e : {&*ke, &*ve}) {
    CHECK_SAME_DEVICE(like, *e);
    TORCH_CHECK_VALUE(e->scalar_type() == at::kByte, op, ": exponents must have dtype uint8, got ",
                      dtype_name(e->scalar_type()));
    TORCH_CHECK_VALUE(e->dim() == 4 && e->size(0) == k_cache.size(0) && e->size(1) == k_cache.size(1) &&
                          e->size(2) == k_cache.size(2) && e->size(3) == nb,
                      op, ": exponents must have shape [", k_cache.size(0), ", ", k_cache.size(1), ", ",
                      k_cache.size(2), ", ", nb, "], got ", shape_str(e->sizes()));
    TORCH_CHECK_VALUE(e->stride(3) == 1 || nb == 1, op,
                      ": exponents must be contiguous in their last dim, got strides ",
                      shape_str(e->strides()));
  }
  return true;
}

// Geometry from the cache and the optional block table (made contiguous into *bt_keep).
kc::CacheGeometry geometry(const at::Tensor& cache, const std::optional<at::Tensor>& block_table,
                           int64_t batch, const at::Tensor& like, at::Tensor* bt_keep,
                           const char* op) {
  kc::CacheGeometry g;
  g.dim0 = cache.size(0);
  g.dim1 = cache.size(1);
  if (!block_table.has_value()) {
    TORCH_CHECK_VALUE(cache.size(0) == batch, op, ": a contiguous cache must have batch ", batch,
                      " in dim 0, got shape ", shape_str(cache.sizes()));
    return g;
  }
  const at::Tensor& bt = *block_table;
  CHECK_SAME_DEVICE(like, bt);
  CHECK_DTYPE(bt, at::kInt);
  CHECK_DIM(bt, 2);
  CHECK_SIZE(bt, 0, batch);
  TORCH_CHECK_VALUE(cache.size(1) >= 1, op, ": page_size (cache dim 1) must be >= 1");
  *bt_keep = bt.contiguous();
  g.block_table = bt_keep->data_ptr<int32_t>();
  g.bt_stride = bt_keep->size(1);
  g.max_pages = bt_keep->size(1);
  return g;
}

// A cache whose rows are not 16-byte aligned (an unusual view) is copied; the kernel's
// cp.async needs aligned 16-byte chunks.
at::Tensor aligned_cache(const at::Tensor& c) {
  const int64_t es = c.element_size();
  const bool ok = reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 &&
                  (c.stride(0) * es) % 16 == 0 && (c.stride(1) * es) % 16 == 0 &&
                  (c.stride(2) * es) % 16 == 0;
  if (ok) return c;
  at::Tensor out = at::empty(c.sizes(), c.options());  // fresh: aligned, contiguous
  out.copy_(c);
  return out;
}

std::tuple<at::Tensor, at::Tensor> decode_attention_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, double softmax_scale,
    const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& k_exponent,
    const std::optional<at::Tensor>& v_exponent) {
  CHECK_CUDA(q);
  CHECK_DIM(q, 4);
  TORCH_CHECK_VALUE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                    "decode_attention: q must be float16 or bfloat16 on CUDA, got ",
                    dtype_name(q.scalar_type()));
  const int64_t batch = q.size(0), q_len = q.size(1), heads = q.size(2), head_dim = q.size(3);
  const DType dt = to_dtype(q.scalar_type());
  TORCH_CHECK_VALUE(kc::decode_attention_supported(dt, static_cast<int>(head_dim)),
                    "decode_attention: the CUDA kernel supports head_dim 64, 128 and 256, got ",
                    head_dim);
  const bool int8 = check_cache(k_cache, v_cache, k_exponent, v_exponent, q.scalar_type(), q,
                                head_dim, "decode_attention");
  const int64_t kv_heads = k_cache.size(2);
  TORCH_CHECK_VALUE(kv_heads >= 1 && heads % kv_heads == 0, "q's heads (", heads,
                    ") must be a multiple of the cache's kv_heads (", kv_heads, "), got q ",
                    shape_str(q.sizes()), " and k_cache ", shape_str(k_cache.sizes()));
  CHECK_SAME_DEVICE(q, cache_seqlens);
  CHECK_DTYPE(cache_seqlens, at::kInt);
  CHECK_DIM(cache_seqlens, 1);
  CHECK_SIZE(cache_seqlens, 0, batch);
  TORCH_CHECK_VALUE(batch <= 65535, "decode_attention: batch must be <= 65535, got ", batch);
  TORCH_CHECK_VALUE(batch * q_len * heads * head_dim < (int64_t{1} << 31),
                    "decode_attention: q must have fewer than 2^31 elements, got shape ",
                    shape_str(q.sizes()));

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor bt_keep;
  kc::DecodeAttentionParams p;
  p.geo = geometry(k_cache, block_table, batch, q, &bt_keep, "decode_attention");
  TORCH_CHECK_VALUE(kc::cache_capacity(p.geo) < (int64_t{1} << 31),
                    "decode_attention: the cache capacity must be below 2^31 positions");
  at::Tensor out = at::empty({batch, q_len, heads, head_dim}, q.options());
  at::Tensor lse = at::empty({batch, heads, q_len}, q.options().dtype(at::kFloat));
  if (batch == 0 || q_len == 0 || heads == 0) return {out, lse};

  const at::Tensor qc = q.contiguous();
  const at::Tensor lens = cache_seqlens.contiguous();
  const at::Tensor kcache = aligned_cache(k_cache), vcache = aligned_cache(v_cache);
  p.q = qc.data_ptr();
  p.k_cache = kcache.data_ptr();
  p.v_cache = vcache.data_ptr();
  p.k_strides = strides3(kcache);
  p.v_strides = strides3(vcache);
  p.int8_cache = int8;
  if (int8) {
    p.k_exponent = k_exponent->data_ptr<uint8_t>();
    p.v_exponent = v_exponent->data_ptr<uint8_t>();
    p.ke_strides = strides3(*k_exponent);
    p.ve_strides = strides3(*v_exponent);
  }
  p.cache_seqlens = lens.data_ptr<int32_t>();
  p.batch = static_cast<int>(batch);
  p.q_len = static_cast<int>(q_len);
  p.heads = static_cast<int>(heads);
  p.kv_heads = static_cast<int>(kv_heads);
  p.head_dim = static_cast<int>(head_dim);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.dtype = dt;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.num_splits = kc::decode_attention_num_splits(p, q.device().index());
  at::Tensor workspace;
  if (p.num_splits > 1) {
    const int64_t rows = batch * heads * q_len * p.num_splits;
    workspace = at::empty({kc::decode_attention_workspace_floats(p, p.num_splits)},
                          q.options().dtype(at::kFloat));
    p.partial_out = workspace.data_ptr<float>();
    p.partial_lse = p.partial_out + rows * head_dim;
  }
  CHECK_LAUNCH(kc::decode_attention(p, current_stream()), "decode_attention");
  return {out, lse};
}

void kv_cache_append_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& k, const at::Tensor& v, const at::Tensor& start_pos,
                          const std::optional<at::Tensor>& block_table,
                          const std::optional<at::Tensor>& k_exponent,
                          const std::optional<at::Tensor>& v_exponent) {
  CHECK_CUDA(k);
  CHECK_DIM(k, 4);
  CHECK_FLOAT_INPUT(k);
  CHECK_SAME_DEVICE(k, v);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type(),
                    "k and v must have the same shape and dtype, got ",
                    dtype_name(k.scalar_type()), " ", shape_str(k.sizes()), " and ",
                    dtype_name(v.scalar_type()), " ", shape_str(v.sizes()));
  const int64_t batch = k.size(0), t = k.size(1), kv_heads = k.size(2), head_dim = k.size(3);
  const bool int8 = check_cache(k_cache, v_cache, k_exponent, v_exponent, k.scalar_type(), k,
                                head_dim, "kv_cache_append");
  TORCH_CHECK_VALUE(k_cache.size(2) == kv_heads, "k_cache.size(2) (kv_heads) must be ",
                    kv_heads, " (k.size(2)), got shape ", shape_str(k_cache.sizes()));
  CHECK_SAME_DEVICE(k, start_pos);
  CHECK_DTYPE(start_pos, at::kInt);
  CHECK_DIM(start_pos, 1);
  CHECK_SIZE(start_pos, 0, batch);
  const c10::cuda::CUDAGuard guard(k.device());
  at::Tensor bt_keep;
  kc::KvCacheAppendParams p;
  p.geo = geometry(k_cache, block_table, batch, k, &bt_keep, "kv_cache_append");
  if (batch == 0 || t == 0 || kv_heads == 0 || head_dim == 0) return;
  const at::Tensor kk = k.contiguous(), vv = v.contiguous(), sp = start_pos.contiguous();
  p.k = kk.data_ptr();
  p.v = vv.data_ptr();
  p.dtype = to_dtype(k.scalar_type());
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k_strides = strides3(k_cache);
  p.v_strides = strides3(v_cache);
  p.int8_cache = int8;
  if (int8) {
    p.k_exponent = k_exponent->data_ptr<uint8_t>();
    p.v_exponent = v_exponent->data_ptr<uint8_t>();
    p.ke_strides = strides3(*k_exponent);
    p.ve_strides = strides3(*v_exponent);
  }
  p.start_pos = sp.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(batch * t * kv_heads <= std::numeric_limits<int32_t>::max() &&
                        batch * t * kv_heads * head_dim < (int64_t{1} << 40),
                    "kv_cache_append: k is too large, shape ", shape_str(k.sizes()));
  p.batch = static_cast<int>(batch);
  p.new_tokens = static_cast<int>(t);
  p.kv_heads = static_cast<int>(kv_heads);
  p.head_dim = static_cast<int>(head_dim);
  CHECK_LAUNCH(kc::kv_cache_append(p, current_stream()), "kv_cache_append");
}

}  // namespace
}  // namespace decode
}  // namespace llmcore

TORCH_LIBRARY_IMPL(llmcore, CUDA, m) {
  m.impl("decode_attention", &llmcore::decode::decode_attention_cuda);
  m.impl("kv_cache_append", &llmcore::decode::kv_cache_append_cuda);
}
